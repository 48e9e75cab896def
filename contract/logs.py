"""JSON log lines, one object per line, for every process of the project.

Each line has ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message`` and
``process``, then whatever the code bound for the work in hand with
:func:`log_fields` / :func:`bind_log_fields` (the gateway binds ``request_id``),
then the record's ``extra`` fields; a traceback is one ``exception`` string,
never lines of its own. :func:`logging_config` is the ``logging.config.dictConfig``
document (gunicorn takes it as ``logconfig_dict``), :func:`configure_logging`
applies it to a process of its own.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import logging.config
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from pythonjsonlogger.json import JsonFormatter

LEVELS = ("debug", "info", "warning", "error", "critical")

# Fields bound to the current thread of work (a request, a batch): contextvars, so a
# thread or an asyncio task sees only what its own work bound.
_bound: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "imgserve_log_fields", default=MappingProxyType({})
)


class JsonLineFormatter(JsonFormatter):
    """One JSON object per record: time, level, logger, message, process, then the rest."""

    def __init__(self) -> None:
        super().__init__(
            "{levelname}{name}{message}{process}",
            style="{",
            rename_fields={
                "levelname": "level",
                "name": "logger",
                "exc_info": "exception",
                "stack_info": "stack",
            },
            json_ensure_ascii=False,
        )

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        """``time`` first (millisecond ISO 8601 in UTC, ``Z``), then the formatter's fields."""
        created = datetime.fromtimestamp(record.created, tz=UTC)
        log_data["time"] = created.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        super().add_fields(log_data, record, message_dict)


class BoundFieldsFilter(logging.Filter):
    """Adds the fields bound with :func:`log_fields` to every record a handler emits.

    A filter on the handler, not on a logger: logger filters do not see the records
    of child loggers, handler filters see every record the handler writes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _bound.get().items():
            if key not in record.__dict__:  # an explicit ``extra`` wins
                setattr(record, key, value)
        return True


def bind_log_fields(**fields: Any) -> contextvars.Token:
    """Add ``fields`` to every line logged from this context until :func:`unbind_log_fields`.

    For entry points that open and close in separate hooks (Flask's ``before_request``
    and ``teardown_request``); elsewhere prefer the :func:`log_fields` block.
    """
    return _bound.set({**_bound.get(), **fields})


def unbind_log_fields(token: contextvars.Token) -> None:
    """Restore the fields as they were before the :func:`bind_log_fields` that gave ``token``."""
    _bound.reset(token)


@contextlib.contextmanager
def log_fields(**fields: Any) -> Iterator[None]:
    """Add ``fields`` to every line logged inside the block (in this thread or task)."""
    token = bind_log_fields(**fields)
    try:
        yield
    finally:
        unbind_log_fields(token)


def bound_log_fields() -> Mapping[str, Any]:
    """The fields bound in the current context (empty outside any request)."""
    return _bound.get()


def check_level(level: str) -> str:
    """``level`` in lower case; raises ValueError unless it is one of :data:`LEVELS`."""
    if level.lower() not in LEVELS:
        raise ValueError(f"log level must be one of {LEVELS}, got {level!r}")
    return level.lower()


def logging_config(level: str = "info", *, loggers: Mapping[str, str] | None = None) -> dict:
    """The ``dictConfig`` document: JSON lines on stderr at ``level`` for the root logger.

    ``loggers``: named loggers and their own level (gunicorn's ``gunicorn.error`` and
    ``gunicorn.access``); they keep no handler of their own and write through the root's.
    """
    root_level = check_level(level).upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"bound": {"()": BoundFieldsFilter}},
        "formatters": {"json": {"()": JsonLineFormatter}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "json",
                "filters": ["bound"],
            }
        },
        "root": {"level": root_level, "handlers": ["stderr"]},
        "loggers": {
            name: {"level": check_level(lvl).upper(), "handlers": [], "propagate": True}
            for name, lvl in (loggers or {}).items()
        },
    }


def configure_logging(level: str = "info") -> None:
    """Make this process log JSON lines to stderr at ``level`` (replaces the root's handlers)."""
    logging.config.dictConfig(logging_config(level))
    logging.captureWarnings(True)  # warnings.warn lines become JSON lines too
