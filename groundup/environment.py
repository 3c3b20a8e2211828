"""Process-wide settings that must be in place before Prefect, MLflow or Lightning are imported."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from groundup.errors import SettingsError, one_line

# Prefect's ephemeral API server needs ~25 s to start on a small machine; its default timeout is 20 s.
STARTUP_TIMEOUT = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
DEFAULTS = {
    STARTUP_TIMEOUT: "180",
    "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    # Prefect's servers (embedded or `groundup ui`) would phone home; offline that only logs errors.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
    # A registry lookup (`groundup generate NAME@alias`) would draw MLflow's "Downloading artifacts" bar.
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


# "background" (default): commands share a Prefect server that outlives them (see use_prefect_server);
# "ephemeral": each process starts Prefect's temporary server, as Prefect does by default (the tests do).
PREFECT_SERVER_MODE = "GROUNDUP_PREFECT_SERVER"


def prepare(output_dir: str | Path = "artifacts", prefect_server: bool = False) -> Path:
    """Set defaults (never overriding what the user exported) and point MLflow at ``output_dir``.

    Prefect results and the local Prefect home live under ``output_dir`` too unless the user chose
    otherwise, so one folder holds everything a run produced. ``prefect_server``: the command runs flows
    or tasks, so point it at a running Prefect server (:func:`use_prefect_server`).
    """
    out = Path(output_dir).resolve()
    for key, value in DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(out / "prefect" / "results"))
    os.environ.setdefault("PREFECT_HOME", str(out / "prefect"))
    # Prefect does not create a missing home's parents: its server then cannot open its SQLite database
    # and restarts on a new port until the start-up timeout. Nothing else creates them in time when
    # MLFLOW_TRACKING_URI points elsewhere, so create them here, before Prefect is imported.
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    # Servers started by `groundup ui` for this output dir replace the embedded API and SQLite store.
    from groundup import serving

    for key, value in serving.server_environment(out).items():
        os.environ.setdefault(key, value)
    if prefect_server:
        use_prefect_server(out)
    from groundup import tracking

    tracking.configure(out)
    return out


def use_prefect_server(out: Path) -> None:
    """Point Prefect at the server recorded for ``out``, starting one in the background on first use.

    Prefect's default, a temporary server per process, costs 20-60 s of every command on a small machine;
    a recorded server costs that once. Nothing changes when the user chose a server (``PREFECT_API_URL``) or
    asked for the temporary one (``GROUNDUP_PREFECT_SERVER=ephemeral``); if the background server cannot
    start, the command says so and goes on with the temporary one.
    """
    mode = os.environ.get(PREFECT_SERVER_MODE, "background")
    if mode not in ("background", "ephemeral"):
        raise SettingsError(f"{PREFECT_SERVER_MODE}={mode!r}: use 'background' or 'ephemeral'")
    if os.environ.get("PREFECT_API_URL") or mode == "ephemeral":
        return
    from groundup import serving
    from groundup.report import command

    def announce() -> None:
        print(
            f"groundup: starting a Prefect server for {out} in the background; later commands reuse it "
            f"(stop it: {command()} ui --stop --output-dir {out}) ...",
            file=sys.stderr,
            flush=True,
        )

    try:
        server, _ = serving.start_background_prefect(out, float(os.environ[STARTUP_TIMEOUT]), announce)
    except serving.ServerError as exc:
        print(f"groundup: {one_line(exc)}; using a temporary Prefect server instead", file=sys.stderr)
        return
    os.environ["PREFECT_API_URL"] = server.url.rstrip("/") + "/api"
