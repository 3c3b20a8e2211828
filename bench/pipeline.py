"""Orchestration overhead of the pipeline: Prefect tasks against the same task functions called plainly.

Three variants run the same composition (``groundup.flows.pipeline.execute``) on the same tiny settings,
in one process, on Prefect's embedded API and MLflow on SQLite in a temp dir:

- *pipeline*: the ``groundup-pipeline`` flow, every stage a Prefect task (task runs, states, cache keys
  over file contents, persisted results, a thread pool);
- *direct*: one plain flow that calls each task's function (``task.fn``) in turn: the same library calls
  and the same MLflow logging, none of the per-task orchestration;
- the pipeline once more on one worker thread, so it waits on stages in the same order as *direct* and the
  difference is orchestration alone (with 4 workers, concurrency of the branches is in it too).

Columns: each variant from scratch (a fresh output dir: everything is computed), then again on its
finished outputs: the pipeline as a fully cached rerun (task bodies skipped), the direct calls on outputs
the library recognises as finished (pretraining, finetuning and responses return early). Best of
``--repeat`` interleaved runs, after one untimed warm-up run; Prefect's embedded API start-up is reported
apart. Sources: ../shared/data, a tiny random GPT-2 and a loopback judge.

    python -m bench.pipeline                 # ~1-2 min on a 2-core CPU
    python -m bench.pipeline --train-steps 20 --finetune-steps 10
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", default=str(SHARED), help="folder with data/ and vocab/gpt2 (default ../shared)")
    p.add_argument("--train-steps", type=int, default=4, help="pretraining steps")
    p.add_argument("--finetune-steps", type=int, default=2, help="finetuning steps")
    p.add_argument("--repeat", type=int, default=2, help="runs per variant and column; the best counts")
    return p.parse_args(argv)


class Done:
    """A finished call, shaped like the Prefect future ``Stages`` expects."""

    class state:  # noqa: N801 - mirrors PrefectFuture.state.name
        name = "Direct"

    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self) -> Any:
        return self.value


def timed(run, config) -> tuple[float, Any]:
    start = time.perf_counter()
    result = run(config=config)
    return time.perf_counter() - start, result


def best(runs: list[tuple[float, Any]]) -> tuple[float, Any]:
    return min(runs, key=lambda run: run[0])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shared = Path(args.shared)
    work = Path(tempfile.mkdtemp(prefix="groundup-bench-pipeline-"))
    from groundup import environment

    environment.prepare(work)  # the Prefect home, results and mlflow.db in the temp dir, never ~/.prefect

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.task_runners import ThreadPoolTaskRunner

    from groundup.flows.pipeline import PipelineRun, Stages, execute, pipeline
    from tests.chat_server import ChatServer
    from tests.pipeline_fixtures import judge_reply, sources_dir, tiny_config, tiny_gpt2_dir

    class DirectStages(Stages):
        def submit(self, name: str, task, *a: Any, **kw: Any) -> str:
            self.calls[name] = (task, a, kw)
            self.futures[name] = Done(task.fn(*a, **kw))
            return name

    @flow(name="direct-calls")
    def direct(config) -> PipelineRun:
        return execute(config, DirectStages())

    sources = sources_dir(
        work / "sources", shared / "data" / "the-verdict.txt", shared / "data" / "instruction-data.json",
        shared / "vocab" / "gpt2", tiny_gpt2_dir(work / "hf"),
    )  # fmt: skip
    steps = [f"train.max_steps={args.train_steps}", f"finetune.max_steps={args.finetune_steps}"]

    start = time.perf_counter()
    with get_client(sync_client=True) as client:
        client.hello()  # starts the embedded API server
    startup = time.perf_counter() - start

    variants = {
        "pipeline, 4 workers (as shipped)": pipeline,
        "pipeline, 1 worker (serial, like direct)": pipeline.with_options(task_runner=ThreadPoolTaskRunner(max_workers=1)),
        "direct task functions (reference)": direct,
    }
    rows = []
    with ChatServer(judge_reply) as judge:
        # Untimed: the first call of each library path imports and initialises things (once per process).
        direct(config=tiny_config(sources, work / "warm-up", judge.base_url, steps))
        firsts: dict[str, list] = {label: [] for label in variants}
        agains: dict[str, list] = {label: [] for label in variants}
        # Variants interleaved, so a change in the machine's load does not land on one of them alone.
        for repetition in range(args.repeat):
            for index, (label, run) in enumerate(variants.items()):
                config = tiny_config(sources, work / f"{index}-{repetition}", judge.base_url, steps)
                firsts[label].append(timed(run, config))
                agains[label].append(timed(run, config))
        for label in variants:
            (first, result), (again, rerun) = best(firsts[label]), best(agains[label])
            cached = sum(state == "Cached" for state in rerun.stages.values())
            rows.append((label, first, again, len(result.stages), cached))
    print(table(rows, startup))
    return 0


def table(rows: list[tuple[str, float, float, int, int]], startup: float) -> str:
    """One row per variant; overhead = (variant - direct) / tasks, from scratch and again."""
    *_, (_, direct_first, direct_again, _, _) = rows
    lines = [
        "| variant | from scratch, s | again, s (cache hits) | tasks | overhead per task from scratch, ms "
        "| overhead per task again, ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, first, again, tasks, cached in rows:
        over = (
            f"{1000 * (first - direct_first) / tasks:+.0f} | {1000 * (again - direct_again) / tasks:+.0f}"
            if "reference" not in label
            else "– | –"
        )
        lines.append(f"| {label} | {first:.2f} | {again:.2f} ({cached}) | {tasks} | {over} |")
    lines.append(f"| Prefect embedded API start-up, once per process | {startup:.2f} | | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
