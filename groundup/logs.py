"""Prefect's run logs, configured so an expected failure is one line there too.

When a task or flow fails, Prefect logs the exception with its traceback (``Task run failed with
exception: ...``, ``Encountered exception during execution: ...``). For a
:class:`~groundup.errors.GroundupError` the message already names the input and the fix, and the traceback
only buries it, in the terminal and in the Prefect UI alike. A standard :class:`logging.Filter` on
Prefect's run loggers drops the traceback of those records and keeps everything else as it is: a bug
still logs its full traceback.
"""

from __future__ import annotations

import logging

from groundup.errors import GroundupError

# The loggers Prefect's flow and task run engines log failures to (and that the Prefect UI shows).
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


class ExpectedFailureFilter(logging.Filter):
    """Drop the traceback of a record whose exception is a :class:`GroundupError`."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, GroundupError):
            record.exc_info = None
            record.exc_text = None
            record.stack_info = None
        return True


def quiet_expected_failures() -> None:
    """Install :class:`ExpectedFailureFilter` on Prefect's run loggers (idempotent; safe before or after
    Prefect configures its logging, which keeps a logger's filters)."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, ExpectedFailureFilter) for existing in logger.filters):
            logger.addFilter(ExpectedFailureFilter())
