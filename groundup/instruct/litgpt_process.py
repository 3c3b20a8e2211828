"""Running LitGPT's command line (``python -m litgpt ...``) as a subprocess: its output passed on line by
line with secrets masked, its progress lines turned into progress reports, its failures into
:class:`LitGPTError` carrying the end of the output.

Never in-process: ``litgpt.finetune.lora.setup()`` re-parses ``sys.argv`` and Lightning's multi-device
launch re-runs the current command.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from groundup.errors import GroundupError

log = logging.getLogger(__name__)

LineCallback = Callable[[str], None]
ProgressCallback = Callable[[int, int], None]

ERROR_TAIL_LINES = 40

class LitGPTError(GroundupError, RuntimeError):
    """A LitGPT subprocess failed; the message carries the end of its output."""


def run_litgpt(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    drop_env: Sequence[str] = (),
    on_line: LineCallback | None = None,
    secrets: Sequence[str] = (),
    cwd: str | Path | None = None,
) -> None:
    """Run ``python -m litgpt <args>``, passing each output line (secrets masked) to ``on_line``.

    Raises :class:`LitGPTError` with the end of the output if it exits non-zero.
    """
    full_env = {k: v for k, v in os.environ.items() if k not in drop_env}
    full_env.update(env or {})
    full_env["PYTHONUNBUFFERED"] = "1"  # lines must arrive as they are printed, not in 8 KiB blocks
    command = [sys.executable, "-m", "litgpt", *args]
    emit = on_line or log.info
    tail: deque[str] = deque(maxlen=ERROR_TAIL_LINES)
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        env=full_env,
        cwd=cwd,
    ) as process:
        assert process.stdout is not None
        for raw in process.stdout:
            line = _mask(raw.rstrip("\n"), secrets)
            tail.append(line)
            emit(line)
        returncode = process.wait()
    if returncode != 0:
        # The exception line goes first so that a one-line view (Prefect's state message) shows the cause.
        cause = next((line for line in reversed(tail) if EXCEPTION_LINE.match(line)), "")
        raise LitGPTError(f"`litgpt {args[0]}` failed (exit code {returncode}): {cause}\n" + "\n".join(tail))


EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Interrupt)\b.*")


def _mask(line: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            line = line.replace(secret, "***")
    return line


PROGRESS_LINE = re.compile(r"\biter (\d+) step (\d+)\b")


@contextlib.contextmanager
def progress_forwarder(
    on_line: LineCallback | None, on_progress: ProgressCallback | None, total_steps: int
) -> Iterator[LineCallback]:
    """Pass lines on, and turn LitGPT's ``Epoch 1 | iter 8 step 2 | ...`` lines into progress reports."""
    from tqdm.auto import tqdm

    emit = on_line or log.info
    with tqdm(total=total_steps, desc="finetune_lora", unit="step", disable=not sys.stderr.isatty()) as bar:

        def forward(line: str) -> None:
            emit(line)
            match = PROGRESS_LINE.search(line)
            if match:
                step = min(int(match.group(2)), total_steps)
                bar.update(step - bar.n)
                if on_progress:
                    on_progress(step, total_steps)

        yield forward
