"""Structured logs: one JSON object a line on stderr, joined to the trace of the request.

Every line carries ``ts`` (UTC, ms), ``level``, ``logger`` and ``msg``; a line written while
a span is current (inside a request, in every service it reaches) also carries its
``trace_id`` and ``span_id``, the ids Jaeger shows. A record's ``fields`` (passed as
``extra={"fields": {...}}``) become keys of the line, as the router's access log does.

``CACHEMESH_LOG_LEVEL`` (DEBUG, INFO, WARNING, ERROR, CRITICAL; default INFO) sets the level
(DEBUG only for cachemesh's own loggers: the libraries stay at INFO and above) and
``CACHEMESH_LOG_FORMAT`` (``json``, the default, or ``text`` for a person at a terminal) the
shape; any other value stops the service naming the variable. At INFO no line holds a
prompt, an answer or a secret: the services log what happened, to whom (the tenant) and how
much, never the text; DEBUG adds a line per step of a request, still without the text.

Written for cost (the access log writes a line per request): the formatter reads the span
context once, formats the timestamp once a second, and writes the line itself (strings
escaped by the C encoder), without building a dict for the json module.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
import traceback
import unicodedata
from collections.abc import Iterator
from json.encoder import encode_basestring as _escape
from types import TracebackType
from typing import TextIO, TypeAlias

from opentelemetry import trace

from services.common.env import ConfigError, Env

LEVEL_VAR = "CACHEMESH_LOG_LEVEL"
FORMAT_VAR = "CACHEMESH_LOG_FORMAT"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMATS = ("json", "text")
_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_ExcInfo: TypeAlias = (
    tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]
)


# what the JSON encoder leaves as it is but a reader's terminal may act on: DEL and the C1
# controls (U+009B is an 8-bit CSI), the line and paragraph separators, the bidirectional
# overrides
_UNSAFE_UNICODE = re.compile("[\u007f-\u009f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def json_string(text: str) -> str:
    """``text`` as a JSON string for a log line: the encoder's escapes (every control
    character below U+0020), and ``\\uXXXX`` for what else a terminal acts on (a caller's
    request_id held an 8-bit CSI and a right-to-left override, written as they were)."""
    encoded = _escape(text)
    if encoded.isascii() and "\x7f" not in encoded:
        return encoded
    return _UNSAFE_UNICODE.sub(lambda found: f"\\u{ord(found.group()):04x}", encoded)


def _json_value(value: object) -> str:
    """One value as JSON: strings escaped by the C encoder, ints, finite floats and bools as
    they are, anything else as its text."""
    if isinstance(value, str):
        return json_string(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
        return repr(value)
    if value is None:
        return "null"
    return json_string(str(value))


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""
        self._keys: dict[str, str] = {}  # a field's name, escaped once

    def head(self, created: float, level: str, logger: str, message: str) -> str:
        """A line's opening members (no closing brace): time, level, logger, message, and
        the current span's trace and span ids when there is one."""
        second = int(created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        line = (
            f'{{"ts":"{self._stamp}.{int((created - second) * 1000):03d}Z",'
            f'"level":"{level}","logger":{_escape(logger)},"msg":{json_string(message)}'
        )
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            line += f',"trace_id":"{context.trace_id:032x}","span_id":"{context.span_id:016x}"'
        return line

    def format(self, record: logging.LogRecord) -> str:
        line = self.head(record.created, record.levelname, record.name, record.getMessage())
        fields = record.__dict__.get("fields")
        if fields:
            keys = self._keys
            for key, value in fields.items():
                name = keys.get(key)
                if name is None:
                    name = keys[key] = _escape(key)
                line += f",{name}:{_json_value(value)}"
        if record.exc_info:
            line += f',"exc":{json_string(self.formatException(record.exc_info))}'
        return line + "}"


# what a text line shows escaped: control characters (a newline, a terminal's ESC), format
# characters (a right-to-left override) and the line and paragraph separators
_UNSHOWN = frozenset(("Cc", "Cf", "Zl", "Zp"))


def printable(text: str) -> str:
    """``text`` as one line of a terminal shows it: each control or format character (a
    newline, ESC, a right-to-left override) written as its escape (``\\n``, ``\\x1b``,
    ``\\u202e``), the rest as it is."""
    if text.isprintable():
        return text
    return "".join(repr(c)[1:-1] if unicodedata.category(c) in _UNSHOWN else c for c in text)


def _raised(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and the exceptions a traceback of it shows: its cause or context, chained, and
    a group's members (each once)."""
    seen: set[int] = set()
    left = [exc]
    while left:
        found = left.pop()
        if found is None or id(found) in seen:
            continue
        seen.add(id(found))
        yield found
        left.append(found.__cause__)
        if not found.__suppress_context__:
            left.append(found.__context__)
        if isinstance(found, BaseExceptionGroup):
            left.extend(found.exceptions)


class TextFormatter(logging.Formatter):
    """For a person at a terminal: the classic line, a record's ``fields`` as key=value. The
    message and the fields are shown escaped (``printable``): a caller's text among them (a
    Gateway request_id is any text) wrote a newline, which began a forged line (another
    tenant's access line), and ESC sequences, which cleared the terminal of whoever read the
    log. A traceback keeps its lines; its exceptions' own lines ("ValueError: <message>", a
    caller's text in it) are shown escaped too."""

    def __init__(self) -> None:
        super().__init__(_TEXT)

    def formatException(self, ei: _ExcInfo) -> str:
        text = super().formatException(ei)
        for exc in _raised(ei[1]):
            said = "".join(traceback.format_exception_only(type(exc), exc)).rstrip("\n")
            if not said.isprintable():
                text = text.replace(said, printable(said))
        return text

    def formatMessage(self, record: logging.LogRecord) -> str:
        return _TEXT % {**record.__dict__, "message": printable(record.message)}

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = record.__dict__.get("fields")
        if fields:
            line += " " + " ".join(
                f"{printable(str(key))}={printable(str(value))}" for key, value in fields.items()
            )
        return line


def log_settings(env: Env) -> tuple[int, str]:
    """The level (a ``logging`` constant) and format, validated."""
    level = env.str("CACHEMESH_LOG_LEVEL", "INFO").upper()
    if level not in LEVELS:
        raise ConfigError(f"{LEVEL_VAR} must be one of {', '.join(LEVELS)}, got {level[:32]!r}")
    shape = env.str("CACHEMESH_LOG_FORMAT", "json").lower()
    if shape not in FORMATS:
        raise ConfigError(f"{FORMAT_VAR} must be one of {', '.join(FORMATS)}, got {shape[:32]!r}")
    return logging.getLevelNamesMapping()[level], shape


class JsonLines:
    """Writes a line made by its caller (the router's access log, one a request) to the
    stream the logging handler writes to, under the handler's lock: the same file and shape as
    every other line, without the logging module's per-record work (a record, its
    dispatch, a dict of fields), which cost the router about 100 us of CPU a request in
    ``services.tools.bench.hit_cpu`` (the line made here: a fifth of that)."""

    def __init__(self, handler: logging.StreamHandler[TextIO], formatter: JsonFormatter) -> None:
        self._handler = handler
        self._formatter = formatter

    def write(self, logger: str, message: str, members: str) -> None:
        """One INFO line; ``members``: JSON members, each with its leading comma."""
        line = self._formatter.head(time.time(), "INFO", logger, message) + members + "}\n"
        handler = self._handler
        handler.acquire()
        try:
            handler.stream.write(line)
            handler.flush()
        finally:
            handler.release()


def configure_logging(env: Env, stream: TextIO | None = None) -> JsonLines | None:
    """The root logger writes to ``stream`` (stderr) at the configured level and format. A
    handler this function installed before (a second ``serve`` in one process) is replaced;
    others (a test's capture) are kept. Returns the direct writer of JSON lines (None with the
    text format)."""
    level, shape = log_settings(env)
    handler = _Handler(stream if stream is not None else sys.stderr)
    formatter = JsonFormatter() if shape == "json" else None
    handler.setFormatter(formatter if formatter is not None else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    # DEBUG is for cachemesh's own lines: the libraries' debug output (gRPC, HTTP clients,
    # the providers' SDKs, which may print request headers) stays at INFO and above
    root.setLevel(max(level, logging.INFO))
    logging.getLogger("cachemesh").setLevel(level)
    # no line shows a record's thread or process: spare every record collecting them
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    return JsonLines(handler, formatter) if formatter is not None else None


class _Handler(logging.StreamHandler[TextIO]):
    """The handler ``configure_logging`` installs (so a second call finds and replaces it)."""
