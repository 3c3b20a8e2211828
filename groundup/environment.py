"""Process-wide settings that must be in place before Prefect, MLflow or Lightning are imported."""

from __future__ import annotations

import os
from pathlib import Path

# Prefect's ephemeral API server needs ~25 s to start on a small machine; its default timeout is 20 s.
DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    # Prefect's servers (embedded or `groundup ui`) would phone home; offline that only logs errors.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
}


def prepare(output_dir: str | Path = "artifacts") -> Path:
    """Set defaults (never overriding what the user exported) and point MLflow at ``output_dir``.

    Prefect results and the local Prefect home live under ``output_dir`` too unless the user chose
    otherwise, so one folder holds everything a run produced.
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
    from groundup import tracking

    tracking.configure(out)
    return out
