"""What every flow shares: configuring MLflow where the flow runs, the stage context (with the parent run
stages nest under), and :class:`Stages`, the one way a flow runs its tasks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import Task
from prefect.futures import PrefectFuture

from groundup import environment, tracking
from groundup.flows.placement import submit_placed
from groundup.logs import quiet_expected_failures
from groundup.tasks.common import StageContext


@contextlib.contextmanager
def stage_context(
    name: str,
    *,
    config: Any,
    output_dir: str,
    experiment: str,
    parent_run_id: str | None,
) -> Iterator[StageContext]:
    """Yield the context this flow's stages run in: ``output_dir``, ``experiment`` and the MLflow run the
    stage runs nest under.

    Inside the pipeline, the pipeline's run is passed down as ``parent_run_id``; a stage flow started on its
    own (CLI, Prefect UI, a schedule) opens its own parent run, tagged with its Prefect flow run. Flows also
    run in workers and served processes, so MLflow is configured here rather than trusted to be.
    """
    environment.prepare(output_dir)
    quiet_expected_failures()  # also where flows run without the CLI: workers, served deployments
    if parent_run_id:
        yield StageContext(output_dir, experiment, parent_run_id)
        return
    with tracking.start_run(
        name, experiment=experiment, output_dir=output_dir, config=config, tags=tracking.flow_run_tags()
    ) as run:
        yield StageContext(output_dir, experiment, run.run_id)


@dataclass
class Stages:
    """A flow's task runs by name: submitted as soon as their inputs are known, resolved when a later stage
    needs their results. The one place where a cached result whose file was deleted since is run again."""

    calls: dict[str, tuple[Task, tuple, dict]] = field(default_factory=dict)
    futures: dict[str, PrefectFuture] = field(default_factory=dict)
    # Stage name -> work pool (``pipeline.placement``), and where placed stages' outputs are fetched to.
    placement: dict[str, str] = field(default_factory=dict)
    output_dir: str = "artifacts"
    placed: set[str] = field(default_factory=set)

    def submit(self, name: str, task: Task, *args: Any, **kwargs: Any) -> str:
        self.calls[name] = (task, args, kwargs)
        pool = self.placement.get("evaluate_mc" if name.startswith("evaluate_mc_") else name)
        if pool:
            self.placed.add(name)
            self.futures[name] = submit_placed(name, pool, task, args, kwargs, self.output_dir)
        else:
            self.futures[name] = task.with_options(task_run_name=name).submit(*args, **kwargs)
        return name

    def result(self, name: str, output: str | None = None) -> Any:
        """The stage's result (a :class:`StageResult`); a cached one whose ``output`` field names a path
        deleted since is computed again."""
        value = self.futures[name].result()
        if name in self.placed:  # the placed stage's result; its outputs are local copies, always there
            return value["result"]
        if output and not Path(getattr(value, output)).exists():
            task, args, kwargs = self.calls[name]
            self.futures[name] = task.with_options(task_run_name=name, refresh_cache=True).submit(*args, **kwargs)
            value = self.futures[name].result()
        return value

    def states(self) -> dict[str, str]:
        """``Completed``, ``Cached`` or ``Failed`` per stage (what the summary and the tests report)."""
        return {name: self._state(name, future) for name, future in self.futures.items()}

    def _state(self, name: str, future: PrefectFuture) -> str:
        # A placed stage's state is that of its task on the worker (``Cached`` there, say).
        if name in self.placed and future.state.is_completed():
            return future.result()["placement"]["state"]
        return future.state.name
