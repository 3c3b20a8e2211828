"""Lineage: MLflow's model ↔ run ↔ dataset graph read back, as a tree, as text (``groundup lineage``) and
as the Markdown description of each registered version, whose links the MLflow UI follows.

A version's chain: its LoggedModel and the run that produced it (MLflow fields); that run's dataset inputs
and model inputs, the latter leading to the parent version; the runs that logged metrics on its LoggedModel
(its evaluations). Tags fill in only what MLflow has no field for: the Prefect flow run, the config hash,
an external parent, the reverse link from a parent to the versions derived from it.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from mlflow.exceptions import MlflowException

from groundup.errors import ModelError
from groundup.tracking.registry import (
    DATASET_TAG,
    PARENT_TAG,
    RECORDED_BY_INPUT_TAG,
    model_id_of,
    resolve_version,
    version_of_model,
    version_ref,
)
from groundup.tracking.runs import SHA256_INPUT_TAG, TAG, client

PROMOTION_TAG = TAG + "promotion"
RUN_TAGS = ("stage", "config_hash", "git_commit", "flow_run_id", "flow_run_url")


# ---------------------------------------------------------------------------------------------------------
# Pages of the MLflow UI (relative links: they work wherever the UI is served)
# ---------------------------------------------------------------------------------------------------------


def version_page(ref: str) -> str:
    name, version = ref.rsplit("/", 1)
    return f"#/models/{urllib.parse.quote(name, safe='')}/versions/{version}"


def run_page(experiment_id: str, run_id: str) -> str:
    return f"#/experiments/{experiment_id}/runs/{run_id}"


def model_page(experiment_id: str, model_id: str) -> str:
    return f"#/experiments/{experiment_id}/models/{model_id}"


# ---------------------------------------------------------------------------------------------------------
# The graph
# ---------------------------------------------------------------------------------------------------------


def _datasets(run: Any, version_tags: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Dataset name -> sha256 (the run's dataset inputs, plus those no run recorded: version tags), and
    name -> the run that recorded it (this one, or the one an input was taken over from)."""
    digests, recorded_by = {}, {}
    for entry in run.inputs.dataset_inputs if run else []:
        tags = {t.key: t.value for t in entry.tags}
        digests[entry.dataset.name] = tags.get(SHA256_INPUT_TAG, entry.dataset.digest)
        recorded_by[entry.dataset.name] = tags.get(RECORDED_BY_INPUT_TAG, run.info.run_id)
    for key, digest in version_tags.items():
        if key.startswith(DATASET_TAG) and digest not in digests.values():
            digests[key.removeprefix(DATASET_TAG)] = digest
    return digests, recorded_by


def _evaluations(model_id: str | None) -> list[dict[str, Any]]:
    """The runs that logged metrics on the LoggedModel, oldest first, with all their metrics."""
    if not model_id:
        return []
    c = client()
    try:
        metrics = c.get_logged_model(model_id).metrics or []
    except MlflowException:
        return []
    evaluations = []
    for run_id in dict.fromkeys(m.run_id for m in sorted(metrics, key=lambda m: m.timestamp)):
        try:
            run = c.get_run(run_id)
        except MlflowException:
            continue
        evaluations.append({"run_id": run_id, "name": run.info.run_name, "metrics": dict(run.data.metrics)})
    return evaluations


def _parent(run: Any, version_tags: dict[str, str], depth: int) -> dict[str, Any] | None:
    """The registered version among the run's model inputs, else the external parent the tag names."""
    for model_input in run.inputs.model_inputs if run else []:
        version = version_of_model(model_input.model_id)
        if version is not None:
            return lineage(version_ref(version), depth + 1)
    parent = version_tags.get(PARENT_TAG)
    if not parent:
        return None
    try:
        return lineage(parent, depth + 1)
    except (MlflowException, ModelError):
        return {"model": parent, "external": True}


def lineage(ref: str, depth: int = 0) -> dict[str, Any]:
    """The chain behind a model version: its run, config, commit, flow run, datasets, evaluations, parent."""
    c = client()
    version = resolve_version(ref)
    tags = version.tags
    try:
        run = c.get_run(version.run_id) if version.run_id else None
    except MlflowException:
        run = None
    run_tags = run.data.tags if run else {}
    datasets, recorded_by = _datasets(run, tags)
    node: dict[str, Any] = {
        "model": version_ref(version),
        "aliases": list(getattr(version, "aliases", []) or []),
        "model_id": model_id_of(version),
        "run_id": version.run_id,
        "experiment_id": run.info.experiment_id if run else None,
        **{key: run_tags.get(TAG + key) for key in RUN_TAGS},
        "datasets": datasets,
        "dataset_runs": recorded_by,
        "evaluations": _evaluations(model_id_of(version)),
        "promotion": tags.get(PROMOTION_TAG),
        "promotion_reason": tags.get(PROMOTION_TAG + ".reason"),
        "parent": _parent(run, tags, depth) if depth < 20 else None,
    }
    return node


def derived_versions(ref: str) -> list[str]:
    """The versions registered with ``ref`` as their parent (MLflow keeps no reverse link: the tag is it)."""
    versions = client().search_model_versions(f"tags.`{PARENT_TAG}` = '{ref}'")
    return sorted(version_ref(v) for v in versions)


def format_lineage(node: dict[str, Any], indent: str = "") -> str:
    """A lineage chain as an indented tree, newest model first."""
    lines = []
    title = node["model"] + (f"  @{', @'.join(node['aliases'])}" if node.get("aliases") else "")
    lines.append(f"{indent}{title}" + ("  (external)" if node.get("external") else ""))
    pad = indent + "  "
    if not node.get("external"):
        for key in ("stage", "run_id", "model_id", *RUN_TAGS[1:]):
            if node.get(key):
                lines.append(f"{pad}{key}: {node[key]}")
        for name, digest in sorted(node.get("datasets", {}).items()):
            lines.append(f"{pad}dataset {name}: sha256 {digest}")
        if node.get("promotion"):
            lines.append(f"{pad}promotion: {node['promotion']} ({node.get('promotion_reason')})")
        for ev in node.get("evaluations", []):
            lines.append(f"{pad}evaluated by {ev['name']} ({ev['run_id']}): {_headline(ev['metrics'])}")
    if node.get("parent"):
        lines.append(f"{pad}derived from:")
        lines.append(format_lineage(node["parent"], pad + "  "))
    return "\n".join(lines)


def _headline(metrics: dict[str, float], shown: int = 6) -> str:
    # Means first: with many metrics, they are the ones worth a line.
    ranked = sorted(metrics.items(), key=lambda kv: (not kv[0].endswith(".mean"), kv[0]))
    return ", ".join(f"{k}={v:.4g}" for k, v in ranked[:shown])


# ---------------------------------------------------------------------------------------------------------
# The version's description: the same chain as links
# ---------------------------------------------------------------------------------------------------------


def describe_version(ref: str) -> str:
    """Markdown for a version's description: parent, source run, flow run, datasets, evaluations, children."""
    node = lineage(ref)
    exp = node["experiment_id"]
    lines = [f"**Lineage** of {node['model']} (`groundup lineage {node['model']}` prints it as text)", ""]
    parent = node.get("parent")
    if parent and not parent.get("external"):
        lines.append(f"- Derived from: [{parent['model']}]({version_page(parent['model'])})")
    elif parent:
        lines.append(f"- Derived from: `{parent['model']}` (outside this registry)")
    if exp and node["run_id"]:
        model = f", logged model [{node['model_id']}]({model_page(exp, node['model_id'])})" if node["model_id"] else ""
        lines.append(f"- Source run: [{node.get('stage') or node['run_id']}]({run_page(exp, node['run_id'])}){model}")
    if node.get("flow_run_url"):
        lines.append(f"- Prefect flow run: [{node['flow_run_id']}]({node['flow_run_url']})")
    elif node.get("flow_run_id"):
        lines.append(f"- Prefect flow run: `{node['flow_run_id']}`")
    if node.get("config_hash") or node.get("git_commit"):
        lines.append(f"- Settings `{node.get('config_hash')}`, code `{node.get('git_commit')}`")
    if node["datasets"]:
        lines.append("- Input datasets:")
        for name, digest in sorted(node["datasets"].items()):
            recorder = node["dataset_runs"].get(name)
            where = f"[{name}]({run_page(exp, recorder)})" if exp and recorder else name
            lines.append(f"  - {where}: sha256 `{digest}`")
    if node["evaluations"]:
        lines.append("- Evaluated by:")
        lines += [f"  - [{ev['name']}]({run_page(exp, ev['run_id'])}): {_headline(ev['metrics'], 3)}" for ev in node["evaluations"]]
    children = derived_versions(node["model"])
    if children:
        lines.append("- Derived models:")
        for child in children:
            scores = "; ".join(f"[{ev['name']}]({run_page(exp, ev['run_id'])}) {_headline(ev['metrics'], 3)}"
                               for ev in _evaluations(model_id_of(resolve_version(child))))  # fmt: skip
            lines.append(f"  - [{child}]({version_page(child)})" + (f", scored by {scores}" if scores else ""))
    if node.get("promotion"):
        lines.append(f"- Promotion: {node['promotion']} ({node.get('promotion_reason')})")
    return "\n".join(lines) + "\n"


def refresh_description(ref: str) -> None:
    """Rewrite a version's description from the graph as it is now (after a registration, an evaluation,
    a promotion)."""
    version = resolve_version(ref)
    client().update_model_version(version.name, version.version, description=describe_version(ref))
