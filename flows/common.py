"""What every flow shares: configuring MLflow where the flow runs, the pipeline-level parent run, and
:class:`Stages`, the one way a flow runs its tasks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import Task
from prefect.futures import PrefectFuture

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


@dataclass
@dataclass(frozen=True)
class StageContext:
    """What every stage of a flow run shares: the output root, the MLflow experiment and the parent run the
    stage runs nest under. ``kwargs`` are the task parameters of those names."""

    output_dir: str
    experiment: str
    parent_run_id: str | None

    @property
    def kwargs(self) -> dict[str, Any]:
        return {"output_dir": self.output_dir, "experiment": self.experiment, "parent_run_id": self.parent_run_id}


@dataclass
class Stages:
    """A flow's task runs by name: submitted as soon as their inputs are known, resolved when a later stage
    needs their results. The one place where a cached result whose file was deleted since is run again."""

    calls: dict[str, tuple[Task, tuple, dict]] = field(default_factory=dict)
    futures: dict[str, PrefectFuture] = field(default_factory=dict)

    def submit(self, name: str, task: Task, *args: Any, **kwargs: Any) -> str:
        self.calls[name] = (task, args, kwargs)
        self.futures[name] = task.with_options(task_run_name=name).submit(*args, **kwargs)
        return name

    def result(self, name: str, output: str | None = None) -> Any:
        """The stage's result; a cached one whose ``output`` path has been deleted since is computed again."""
        value = self.futures[name].result()
        if output and not Path(value[output]).exists():
            task, args, kwargs = self.calls[name]
            self.futures[name] = task.with_options(task_run_name=name, refresh_cache=True).submit(*args, **kwargs)
            value = self.futures[name].result()
        return value

    def states(self) -> dict[str, str]:
        """``Completed``, ``Cached`` or ``Failed`` per stage (what the summary and the tests report)."""
        return {name: future.state.name for name, future in self.futures.items()}
