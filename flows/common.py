"""What every flow shares: configuring MLflow where the flow runs, and the pipeline-level parent run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from groundup import environment, tracking
from groundup.logs import quiet_expected_failures


@contextlib.contextmanager
def parent_run(
    name: str,
    *,
    config: Any,
    output_dir: str,
    experiment: str,
    parent_run_id: str | None,
) -> Iterator[str]:
    """Yield the MLflow run id stage runs nest under.

    Inside the pipeline, the pipeline's run is passed down as ``parent_run_id``; a stage flow started on its
    own (CLI, Prefect UI, a schedule) opens its own parent run, tagged with its Prefect flow run. Flows also
    run in workers and served processes, so MLflow is configured here rather than trusted to be.
    """
    environment.prepare(output_dir)
    quiet_expected_failures()  # also where flows run without the CLI: workers, served deployments
    if parent_run_id:
        yield parent_run_id
        return
    with tracking.start_run(
        name, experiment=experiment, output_dir=output_dir, config=config, tags=tracking.flow_run_tags()
    ) as run:
        yield run.run_id
