"""The one place that talks to MLflow, split by concern:

- :mod:`.runs`: where MLflow keeps things, runs with their params, metrics, datasets and artifacts, the
  Prefect flow run and git commit they came from;
- :mod:`.registry`: LoggedModels, registered versions, aliases and the evaluations recorded on them;
- :mod:`.lineage`: the model ↔ run ↔ dataset graph read back, as a tree, as text and as the Markdown
  description of each registered version (links the MLflow UI can follow).

Layout in MLflow: one experiment per pipeline (``groundup`` by default); one parent run per Prefect flow run
with every dataset its stages read; one nested run per stage (``groundup.stage`` tag) with its params,
metrics, plots, its *input* datasets and models and its *output* LoggedModels; every produced model a
LoggedModel plus a Model Registry version whose description links the whole chain.
"""

from groundup.tracking.lineage import describe_version, format_lineage, lineage, refresh_description
from groundup.tracking.registry import (
    ModelVersion,
    alias_target,
    log_versions_used,
    model_directory,
    model_id_of,
    record_evaluation,
    resolve_version,
    set_alias,
    set_version_tags,
    version_ref,
)
from groundup.tracking.runs import (
    DEFAULT_EXPERIMENT,
    TAG,
    TrackedRun,
    client,
    configure,
    default_tracking_uri,
    experiment_id,
    flatten,
    flow_run_tags,
    git_commit,
    open_run,
    start_run,
)

__all__ = [
    "DEFAULT_EXPERIMENT", "TAG", "ModelVersion", "TrackedRun", "alias_target", "client", "configure",
    "default_tracking_uri", "describe_version", "experiment_id", "flatten", "flow_run_tags", "format_lineage",
    "git_commit", "lineage", "log_versions_used", "model_directory", "model_id_of", "open_run", "record_evaluation",
    "refresh_description", "resolve_version", "set_alias", "set_version_tags", "start_run", "version_ref",
]  # fmt: skip
