"""Errors in what the user gave the pipeline (data files, configuration, promotion policy).

They are the user's to fix, not the machine's: the flow reports them in one line naming the file,
line or field, never retries them and never prints a traceback for them (Prefect's engine logs a
failed task or flow with its traceback; :func:`quiet_input_error_tracebacks` drops it for these).
"""

from __future__ import annotations

import logging
from typing import Any

from fedml.checkpoint import CheckpointError
from fedml.config import ConfigError
from fedml.data.errors import DataSourceError
from fedml.data.validation import SchemaError
from fedml.gate import PolicyError

INPUT_ERRORS: tuple[type[Exception], ...] = (DataSourceError, SchemaError, ConfigError, PolicyError, CheckpointError)


def retry_unless_input_error(task: Any, task_run: Any, state: Any) -> bool:
    """A task's ``retry_condition_fn``: retry a failure unless the input is at fault."""
    return not isinstance(state.result(raise_on_failure=False), INPUT_ERRORS)


class _DropInputErrorTracebacks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, INPUT_ERRORS):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_input_error_tracebacks() -> None:
    """Log input errors of task and flow runs as their one-line message (idempotent)."""
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropInputErrorTracebacks) for f in logger.filters):
            logger.addFilter(_DropInputErrorTracebacks())
