"""services.common.logs: JSON lines joined to the current span, levels from the environment."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider

from services.common.env import ConfigError, Env
from services.common.logs import JsonFormatter, TextFormatter, configure_logging, log_settings


@pytest.fixture
def root_state() -> Iterator[None]:
    """configure_logging changes the root logger: put its handlers and level back."""
    root, ours = logging.getLogger(), logging.getLogger("cachemesh")
    handlers, level, our_level = list(root.handlers), root.level, ours.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    ours.setLevel(our_level)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_line_inside_a_span_carries_its_trace_and_span_ids(root_state: None) -> None:
    out = io.StringIO()
    configure_logging(Env({"CACHEMESH_LOG_LEVEL": "debug"}), out)
    log = logging.getLogger("cachemesh.test")
    tracer = TracerProvider().get_tracer("test")
    log.info("outside")
    with tracer.start_as_current_span("request") as span:
        log.debug("inside %s", "a request", extra={"fields": {"tenant": "t", "tokens": 3}})
        context = span.get_span_context()
    outside, inside = _lines(out)
    assert "trace_id" not in outside and outside["msg"] == "outside"
    assert inside["trace_id"] == format(context.trace_id, "032x")
    assert inside["span_id"] == format(context.span_id, "016x")
    assert (inside["msg"], inside["level"], inside["logger"]) == (
        "inside a request",
        "DEBUG",
        "cachemesh.test",
    )
    assert (inside["tenant"], inside["tokens"]) == ("t", 3)
    assert str(inside["ts"]).endswith("Z") and len(str(inside["ts"])) == 24


def test_debug_is_for_cachemesh_lines_only(root_state: None) -> None:
    out = io.StringIO()
    configure_logging(Env({"CACHEMESH_LOG_LEVEL": "DEBUG"}), out)
    logging.getLogger("cachemesh.router").debug("ours")
    # a library's logger no code of ours sets a level on (httpx's is set to WARNING by a model
    # replica's wiring, which an earlier test in the same worker may have built)
    logging.getLogger("a_library").debug("theirs, may show headers")
    logging.getLogger("a_library").info("theirs at info")
    assert [line["msg"] for line in _lines(out)] == ["ours", "theirs at info"]


def test_the_level_filters_and_a_second_configuration_replaces_the_first(
    root_state: None,
) -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(Env({}), first)
    configure_logging(Env({"CACHEMESH_LOG_LEVEL": "WARNING"}), second)
    logging.getLogger("cachemesh.test").info("dropped")
    logging.getLogger("cachemesh.test").warning("kept")
    assert first.getvalue() == ""
    assert [line["msg"] for line in _lines(second)] == ["kept"]


def test_text_format_for_a_terminal(root_state: None) -> None:
    out = io.StringIO()
    configure_logging(Env({"CACHEMESH_LOG_FORMAT": "text"}), out)
    logging.getLogger("cachemesh.test").info("hello", extra={"fields": {"tenant": "t"}})
    assert out.getvalue().rstrip().endswith("INFO cachemesh.test: hello tenant=t")


@pytest.mark.parametrize(
    ("environ", "name"),
    [
        ({"CACHEMESH_LOG_LEVEL": "LOUD"}, "CACHEMESH_LOG_LEVEL"),
        ({"CACHEMESH_LOG_FORMAT": "xml"}, "CACHEMESH_LOG_FORMAT"),
    ],
)
def test_a_bad_value_names_its_variable(environ: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        log_settings(Env(environ))


def test_an_exception_is_one_line_of_json() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), None)
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    assert "ValueError: boom" in json.loads(line)["exc"]


def test_text_format_escapes_a_callers_newline_and_terminal_escapes(root_state: None) -> None:
    # a Gateway request_id is any text: with a newline it began a forged access line of
    # another tenant, and its ESC sequences cleared the terminal of whoever read the log
    out = io.StringIO()
    configure_logging(Env({"CACHEMESH_LOG_FORMAT": "text"}), out)
    forged = "r1\n2026-12-06 17:00:00,000 INFO cachemesh.access: access tenant=tenant-b\x1b[2J"
    fields = {"tenant": "tenant-a", "request_id": forged, "tokens": 5}
    logging.getLogger("cachemesh.access").info("access", extra={"fields": fields})
    logging.getLogger("cachemesh.test").warning("model %s refused", "m\u202e\r\nx")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "\x1b" not in out.getvalue() and "\u202e" not in out.getvalue()
    assert lines[0].endswith(
        "tenant=tenant-a request_id=r1\\n2026-12-06 17:00:00,000 INFO cachemesh.access: "
        "access tenant=tenant-b\\x1b[2J tokens=5"
    )
    assert lines[1].endswith("WARNING cachemesh.test: model m\\u202e\\r\\nx refused")


def test_text_format_keeps_a_traceback_and_printable_text() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "café\tnaïve", (), None)
        record.exc_info = sys.exc_info()
    text = TextFormatter().format(record)
    assert "café\\tnaïve" in text
    assert text.splitlines()[-1] == "ValueError: boom"


def test_json_lines_escape_what_a_terminal_acts_on_beyond_the_encoders_escapes() -> None:
    # the encoder escapes below U+0020 only: an 8-bit CSI (U+009B), a line separator and a
    # right-to-left override in a caller's request_id were written as they were
    sent = "c1\x9b2J\u2028\u202eend caf\u00e9 \u65e5\u672c"
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "msg \x9b", (), None)
    record.fields = {"request_id": sent}
    line = JsonFormatter().format(record)
    for raw in ("\x9b", "\u2028", "\u202e"):
        assert raw not in line
    assert "\\u009b2J\\u2028\\u202eend caf\u00e9 \u65e5\u672c" in line  # letters stay as they are
    parsed = json.loads(line)
    assert parsed["request_id"] == sent and parsed["msg"] == "msg \x9b"


def test_json_lines_escape_del_in_an_ascii_text_too() -> None:
    # DEL (U+007F), a control character the encoder leaves as it is: an all-ASCII text
    # skipped the second pass, so a request_id "a\x7fb" was written raw (the text format
    # shows it as \x7f)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "msg", (), None)
    record.fields = {"request_id": "a\x7fb"}
    line = JsonFormatter().format(record)
    assert "\x7f" not in line and "a\\u007fb" in line
    assert json.loads(line)["request_id"] == "a\x7fb"


def _failed(message: str) -> logging.LogRecord:
    try:
        try:
            raise KeyError("inner\nforged")
        except KeyError as inner:
            raise ValueError(message) from inner
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), None)
        record.exc_info = sys.exc_info()
    return record


FORGED = "boom\n1999-01-01 17:00:00,000 INFO cachemesh.access: access tenant=b\x9b2J\u202e"


def test_a_json_lines_exception_escapes_what_a_terminal_acts_on() -> None:
    # "exc" was written with the encoder's escapes only: an 8-bit CSI and a right-to-left
    # override in an exception's message (a caller's text in it) reached the line raw
    line = JsonFormatter().format(_failed(FORGED))
    assert "\x9b" not in line and "\u202e" not in line
    assert "ValueError: " + FORGED in json.loads(line)["exc"]


def test_text_format_escapes_an_exceptions_message_and_keeps_the_traceback_lines() -> None:
    # the traceback's message line was written raw: a newline in an exception's message
    # began a forged line, its escapes reached the terminal
    text = TextFormatter().format(_failed(FORGED))
    lines = text.splitlines()
    assert "\x9b" not in text and "\u202e" not in text
    assert not any(line.startswith("1999-01-01") for line in lines)
    assert lines[-1] == (
        "ValueError: boom\\n1999-01-01 17:00:00,000 INFO cachemesh.access: access tenant=b"
        "\\x9b2J\\u202e"
    )
    assert "KeyError: 'inner\\nforged'" in lines  # its repr: already one line
    assert lines.count("Traceback (most recent call last):") == 2
    assert any(line.startswith('  File "') for line in lines)
