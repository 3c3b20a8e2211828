"""The deployments declared in ``deployments/prefect.yaml``, served or registered for workers.

``prefect.yaml`` is the one declaration (names, entrypoints, schedules, work pools); Prefect's own
``prefect deploy --all`` reads it, and so does this module for ``groundup serve`` (every deployment served
by this process, schedules active, no worker) and ``groundup deploy --pool NAME`` (registered for workers).
Entrypoints are module paths, so any process with groundup installed can run a flow without code storage.

A profile fills the deployments' default settings parameters, so the Prefect UI's run form starts from the
same settings as ``groundup run --profile P`` would.
"""

from __future__ import annotations

import datetime
import importlib.resources
import inspect
import typing
from pathlib import Path
from typing import Any

import yaml
from prefect import Flow, deploy, serve
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.exceptions import ObjectNotFound
from prefect.flows import load_flow_from_entrypoint
from prefect.schedules import Cron, Interval, Schedule

from groundup.config import PipelineConfig, Settings, load_config

# deployments/prefect.yaml, shipped in the package as groundup.deployments (see pyproject's package-dir), so
# a wheel install finds it as an editable one does.
DEPLOYMENTS_FILE = Path(str(importlib.resources.files("groundup.deployments") / "prefect.yaml"))


def read_declarations(path: str | Path | None = None) -> list[dict[str, Any]]:
    path = Path(path or DEPLOYMENTS_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"deployments file {str(path)!r} does not exist")
    declarations = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("deployments") or []
    if not declarations:
        raise ValueError(f"{path}: no deployments declared")
    return declarations


def schedule_of(spec: dict[str, Any]) -> Schedule:
    """One ``schedules:`` entry of prefect.yaml (``cron`` or ``interval`` seconds) as a Prefect schedule."""
    common = {"timezone": spec.get("timezone"), "active": spec.get("active", True)}
    if "cron" in spec:
        return Cron(spec["cron"], **common)
    if "interval" in spec:
        return Interval(datetime.timedelta(seconds=float(spec["interval"])), **common)
    raise ValueError(f"schedule {spec!r} has neither 'cron' nor 'interval'")


def settings_parameters(flow: Flow) -> dict[str, type[Settings]]:
    """The flow's parameters that take a settings model (each one a form in the Prefect UI)."""
    hints = typing.get_type_hints(flow.fn)
    return {name: hint for name, hint in hints.items() if isinstance(hint, type) and issubclass(hint, Settings)}


def profile_settings(model: type[Settings], profile: str | None, overrides: list[str]) -> dict[str, Any]:
    """``model``'s settings from a pipeline profile: its section of the profile (``finetune`` for
    ``FinetuneConfig``), or the sections it is made of (``PretrainConfig``, ``PipelineConfig``, ...)."""
    section = next((name for name, field in PipelineConfig.model_fields.items() if field.annotation is model), None)
    if section:
        overrides = [o.removeprefix(section + ".") for o in overrides if o.startswith(section + ".")]
    else:
        overrides = [o for o in overrides if o.partition("=")[0].split(".")[0] in model.model_fields]
    return load_config(model, profile, overrides, section=section).model_dump(mode="json")


def build(
    declaration: dict[str, Any],
    profile: str | None = None,
    overrides: list[str] | None = None,
    pool: bool = False,
    output_dir: str | Path | None = None,
) -> RunnerDeployment:
    """One declared deployment; ``pool``: with its work queue and job variables, for a work pool's workers
    (a served deployment has neither). ``output_dir`` (made absolute) becomes the flow's output location, so
    its runs write there whatever the working directory of the process that runs them."""
    flow = load_flow_from_entrypoint(declaration["entrypoint"], use_placeholder_flow=False)
    parameters = {
        name: profile_settings(model, profile, overrides or []) for name, model in settings_parameters(flow).items()
    }
    if output_dir:
        location = str(Path(output_dir).resolve())
        for name, model in settings_parameters(flow).items():
            if "output_dir" in model.model_fields:
                parameters[name]["output_dir"] = location
        if "output_dir" in inspect.signature(flow.fn).parameters:
            parameters["output_dir"] = location
    parameters.update(declaration.get("parameters") or {})
    work_pool = (declaration.get("work_pool") or {}) if pool else {}
    return flow.to_deployment(
        name=declaration["name"],
        description=declaration.get("description"),
        tags=declaration.get("tags"),
        parameters=parameters,
        schedules=[schedule_of(s) for s in declaration.get("schedules") or []],
        enforce_parameter_schema=declaration.get("enforce_parameter_schema", True),
        work_queue_name=work_pool.get("work_queue_name"),
        job_variables=work_pool.get("job_variables"),
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def build_all(
    path: str | Path | None = None,
    profile: str | None = None,
    overrides: list[str] | None = None,
    pool: bool = False,
    output_dir: str | Path | None = None,
) -> list[RunnerDeployment]:
    return [build(d, profile, overrides, pool, output_dir) for d in read_declarations(path)]


def serve_all(deployments: list[RunnerDeployment], limit: int | None = None) -> None:
    """Serve every deployment from this process until interrupted; each flow run is a subprocess."""
    serve(*deployments, limit=limit, print_starting_message=True)


def deploy_all(deployments: list[RunnerDeployment], pool: str) -> list[str]:
    """Register the deployments for workers of ``pool`` (created as a process pool if it does not exist),
    with ``groundup-stage/<pool>``, which pipeline stages placed on ``pool`` run as."""
    from groundup.flows.placement import stage_deployment

    deployments = [*deployments, stage_deployment(pool)]
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    ids = deploy(*deployments, work_pool_name=pool, build=False, push=False, print_next_steps_message=False)
    return [str(i) for i in ids]
