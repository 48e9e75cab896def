"""JSON log lines: the fields, bound fields per context and thread, exceptions, levels."""

from __future__ import annotations

import io
import json
import logging
import logging.config
import threading

import pytest

from contract.logs import (
    bind_log_fields,
    bound_log_fields,
    log_fields,
    logging_config,
    unbind_log_fields,
)
from tests.helpers.log_lines import ISO_UTC, captured_lines

log = logging.getLogger("tests.contract.logs")


def test_a_line_has_the_documented_fields_in_order():
    with captured_lines() as lines:
        log.info("hello %s", "world", extra={"images": 3})
    (line,) = lines
    assert list(line)[:5] == ["time", "level", "logger", "message", "process"]
    assert ISO_UTC.match(line["time"])
    assert (line["level"], line["logger"], line["message"]) == (
        "INFO",
        "tests.contract.logs",
        "hello world",
    )
    assert line["images"] == 3 and isinstance(line["process"], int)
    assert "request_id" not in line


def test_bound_fields_reach_lines_inside_the_block_only():
    with captured_lines() as lines:
        with log_fields(request_id="r-1"):
            log.info("inside")
            with log_fields(request_id="r-2", model="m"):
                log.info("nested")
            log.info("back")
        log.info("outside")
    assert [(x["message"], x.get("request_id"), x.get("model")) for x in lines] == [
        ("inside", "r-1", None),
        ("nested", "r-2", "m"),
        ("back", "r-1", None),
        ("outside", None, None),
    ]
    assert bound_log_fields() == {}


def test_an_explicit_extra_wins_over_a_bound_field():
    with captured_lines() as lines, log_fields(request_id="bound"):
        log.info("x", extra={"request_id": "explicit"})
    assert lines[0]["request_id"] == "explicit"


def test_each_thread_sees_only_its_own_bindings():
    seen: dict[str, object] = {}
    barrier = threading.Barrier(2, timeout=10)

    def work(rid: str) -> None:
        token = bind_log_fields(request_id=rid)
        barrier.wait()  # both bound before either logs
        log.info("work")
        seen[rid] = dict(bound_log_fields())
        unbind_log_fields(token)

    with captured_lines() as lines:
        threads = [threading.Thread(target=work, args=(r,)) for r in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert sorted(x["request_id"] for x in lines) == ["a", "b"]
    assert seen == {"a": {"request_id": "a"}, "b": {"request_id": "b"}}


def test_an_exception_is_one_field_of_one_line():
    with captured_lines() as lines:
        try:
            raise ValueError("bad\nvalue")
        except ValueError:
            log.exception("it failed")
    (line,) = lines
    assert line["level"] == "ERROR" and line["message"] == "it failed"
    assert "Traceback" in line["exception"] and "ValueError: bad" in line["exception"]


def test_logging_config_writes_json_at_its_level_and_rejects_unknown_levels():
    stream = io.StringIO()
    config = logging_config("warning", loggers={"tests.chatty": "debug"})
    config["handlers"]["stderr"]["stream"] = stream
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logging.config.dictConfig(config)
        with log_fields(request_id="cfg"):
            log.info("dropped at warning")
            log.warning("kept")
            logging.getLogger("tests.chatty").debug("its own level")
    finally:
        for h in root.handlers[:]:
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])
        logging.getLogger("tests.chatty").setLevel(logging.NOTSET)
    lines = [json.loads(x) for x in stream.getvalue().splitlines()]
    assert [(x["message"], x["request_id"]) for x in lines] == [
        ("kept", "cfg"),
        ("its own level", "cfg"),
    ]
    with pytest.raises(ValueError, match="log level"):
        logging_config("verbose")
