"""JSON log lines in tests: capture what this process logs, parse what a server wrote."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

from contract.logs import BoundFieldsFilter, JsonLineFormatter

#: The fields every line has (contract/logs.py).
BASE_FIELDS = ("time", "level", "logger", "message", "process")
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@contextlib.contextmanager
def captured_lines(level: int = logging.DEBUG) -> Iterator[list[dict]]:
    """The JSON lines the root logger writes inside the block, parsed (filled in at exit).

    The handler is the production one (formatter and bound-fields filter), so the lines
    are what a server would print.
    """
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLineFormatter())
    handler.addFilter(BoundFieldsFilter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(level)
    lines: list[dict] = []
    try:
        yield lines
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        lines.extend(parse_lines(stream.getvalue()))


def parse_lines(text: str) -> list[dict]:
    """Every non-empty line of ``text`` as a JSON object; AssertionError names the first that is not."""
    parsed = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise AssertionError(f"line {number} is not JSON: {line[:300]!r}") from None
        assert isinstance(obj, dict), f"line {number} is not a JSON object: {line[:300]!r}"
        missing = [f for f in BASE_FIELDS if f not in obj]
        assert not missing, f"line {number} lacks {missing}: {line[:300]!r}"
        assert ISO_UTC.match(obj["time"]), f"line {number}: time {obj['time']!r} is not ISO UTC"
        parsed.append(obj)
    return parsed


def read_lines(log: Path) -> list[dict]:
    """A server's log file, every line parsed (see :func:`parse_lines`)."""
    return parse_lines(log.read_text(errors="replace"))


def as_text(log: Path) -> str:
    """A server's log as ``[process] logger: message`` lines, for substring checks; a line
    that is not JSON (one cut short by a kill) is kept as it is."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            obj = json.loads(line)
            out.append(f"[{obj['process']}] {obj['logger']}: {obj['message']}")
        except (ValueError, KeyError, TypeError):
            out.append(line)
    return "\n".join(out)
