"""Dispatch overhead of a placed stage: the same stage in-process and on a work pool's worker.

Needs a running rehearsal (``groundup cluster up --dir DIR``); registers ``groundup-stage/groundup-gpu``
itself. The stage is ``split_instructions`` on ../shared's instruction data, a cache hit after the
untimed warm-up in both variants (Prefect's cache in-process, the stage record in the store when placed),
so what is timed is the way there and back. Columns, best of ``--repeat``: wall time of the call as the
pipeline sees it and its overhead against the in-process call (the dispatch overhead); for the placed stage
also the split that Prefect recorded: flow run created → flow run started (the worker's poll and process
start), flow run started → task started (imports, the stage record read from the store), task finished →
result back in the pipeline. ``python -m bench.pipeline --cluster DIR`` prints this table after its own.

    groundup cluster up --dir /tmp/c && python -m bench.placement --cluster /tmp/c && groundup cluster down --dir /tmp/c
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
POOL = "groundup-gpu"


def _seconds(start: str | None, end: str | None) -> float:
    if not (start and end):
        return float("nan")
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cluster", required=True, help="the directory of `groundup cluster up`")
    p.add_argument("--shared", default=str(SHARED))
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    state = json.loads((Path(args.cluster) / "cluster.json").read_text())
    os.environ.update(state["environment"])
    work = Path(tempfile.mkdtemp(prefix="groundup-bench-placement-"))
    from groundup import environment

    environment.prepare(work)

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from groundup.config import InstructDataConfig
    from groundup.flows.deployments import deploy_all
    from groundup.flows.placement import submit_placed
    from groundup.tasks.finetune import split_instructions

    deploy_all([], POOL)
    config = InstructDataConfig(source=str(Path(args.shared) / "data" / "instruction-data.json"))

    @flow(name="placement-bench")
    def probe(placed: bool) -> tuple[float, dict]:
        start = time.perf_counter()
        if placed:
            future = submit_placed("split_instructions", POOL, split_instructions, (config,), {}, str(work))
        else:
            future = split_instructions.with_options(task_run_name="split_instructions").submit(config, str(work))
        result = future.result()
        return time.perf_counter() - start, result

    probe(placed=False), probe(placed=True)  # warm-up: computes and caches the split on both sides
    rows = {"in-process": [], "placed on groundup-gpu": []}
    for _ in range(args.repeat):
        rows["in-process"].append((probe(placed=False)[0], None))
        seconds, result = probe(placed=True)
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(result["placement"]["flow_run_id"])
            task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        task_run = task_runs[0]
        split = (
            _seconds(str(run.created), str(run.start_time)),
            _seconds(str(run.start_time), str(task_run.start_time)),
            _seconds(str(task_run.end_time), str(run.end_time)),
        )
        rows["placed on groundup-gpu"].append((seconds, split))
    print(
        "| variant | call, s | dispatch overhead, s | created → flow started, s | flow started → task started, s "
        "| task end → flow end, s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    reference = min(seconds for seconds, _ in rows["in-process"])
    for label, runs in rows.items():
        seconds, split = min(runs, key=lambda r: r[0])
        parts = " | ".join(f"{s:.2f}" for s in split) if split else "– | – | –"
        overhead = f"{seconds - reference:+.2f}" if split else "–"
        print(f"| {label} | {seconds:.2f} | {overhead} | {parts} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
