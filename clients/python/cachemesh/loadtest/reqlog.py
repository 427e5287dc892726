"""The JSONL request log: one request a line, the input of the offline savings estimator.

Each line is a JSON object (documented in SCHEMA.md, "Request log"):

    {"t_ms": 0, "tenant": "tenant-a", "kind": "faq", "question": "...",
     "request": {... a cachemesh.v1.CompleteRequest in protobuf's JSON mapping ...}}

``t_ms`` is the arrival time in milliseconds from the start of the log (non-decreasing, at most
ten years); ``latency_ms`` (optional, at most a day) how long after ``t_ms`` its answer ended,
``ttft_ms`` (optional, a streamed run) its first token: the estimator serves requests that
overlapped concurrently; ``warmup`` (optional, true) marks a request sent before the measured
ones: replayed, so that it warms the caches as it did live, and left out of the estimate's
totals; ``code``
(optional) how it ended live, ``OK`` or its status name (``RESOURCE_EXHAUSTED``,
``DEADLINE_EXCEEDED``, ...): the estimator counts a request that failed live for a reason it
does not replay (a deadline, an unreachable service) as it ended, billed nothing (it is
replayed until its logged end and cut there: nothing stored in L1, its partial bill counted
against its tenant's limits);
``tenant`` is any string that tells tenants apart; ``kind`` and ``question`` are optional
(``question`` is the asked text of a labelled request). ``request`` uses the field names of
gateway.proto in lowerCamelCase, e.g. ``{"model": "auto", "maxTokens": 200, "messages": [{"role":
"ROLE_USER", "content": [{"text": "How do I reset my password?"}]}]}``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from google.protobuf import json_format

from cachemesh.loadtest.workloads import Item
from cachemesh.v1 import gateway_pb2 as pb

# Bounds of a line's times: past them a replay's clock overflows (an int64 of milliseconds) or
# its virtual time steps through the span for minutes.
MAX_T_MS = 10 * 365 * 86_400_000  # a log spanning ten years
MAX_LATENCY_MS = 86_400_000  # a request that ran for a day


@dataclass(frozen=True)
class LogRecord:
    t_ms: float
    item: Item
    latency_ms: float | None = None  # until its answer ended (None: not logged)
    ttft_ms: float | None = None  # until its first token (None: not logged)
    warmup: bool = False  # sent before the measured requests: replayed, left out of totals
    code: str | None = None  # how it ended live: OK or its status name (None: not logged)


class LogError(ValueError):
    """A line of the request log is malformed; the message names the line and the field."""


def write_log(out: TextIO, records: Iterable[LogRecord]) -> None:
    for record in records:
        line = {
            "t_ms": record.t_ms,
            "tenant": record.item.tenant,
            "kind": record.item.kind,
            "question": record.item.question,
            "request": json_format.MessageToDict(record.item.request),
        }
        if record.latency_ms is not None:
            line["latency_ms"] = record.latency_ms
        if record.ttft_ms is not None:
            line["ttft_ms"] = record.ttft_ms
        if record.warmup:
            line["warmup"] = True
        if record.code is not None:
            line["code"] = record.code
        out.write(json.dumps(line, ensure_ascii=False, sort_keys=True) + "\n")


def read_log(path: Path) -> Iterator[LogRecord]:
    last = float("-inf")
    with path.open("rb") as handle:  # decoded a line at a time: a bad byte names its line
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:  # was "'utf-8' codec can't decode byte 0x8b ...", no file
                raise LogError(
                    f"{where}: not UTF-8 text (a compressed log? decompress it first)"
                ) from None
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise LogError(f"{where}: not a request log line (a JSON object a line)")
                if not isinstance(row.get("request"), dict):
                    raise LogError(f"{where}: request must be a JSON object (a CompleteRequest)")
                request = json_format.ParseDict(row["request"], pb.CompleteRequest())
            except LogError:
                raise
            # ValueError: JSONDecodeError's base; RecursionError: nested too deep ("[[[...")
            except (ValueError, RecursionError, json_format.ParseError, TypeError) as exc:
                raise LogError(f"{where}: not a request log line ({exc})") from exc
            t_ms = row.get("t_ms", last if last > float("-inf") else 0.0)
            tenant = row.get("tenant")
            if not _finite(t_ms) or t_ms < last or t_ms > MAX_T_MS:
                raise LogError(
                    f"{where}: t_ms must be a finite number >= the previous line's, "
                    f"<= {MAX_T_MS} (ten years)"
                )
            if not isinstance(tenant, str) or not tenant:
                raise LogError(f"{where}: tenant must be a non-empty string")
            latency, ttft = row.get("latency_ms"), row.get("ttft_ms")
            for name, value in (("latency_ms", latency), ("ttft_ms", ttft)):
                if value is not None and not (_finite(value) and 0 <= value <= MAX_LATENCY_MS):
                    raise LogError(
                        f"{where}: {name} must be a number within 0..{MAX_LATENCY_MS} (a day) "
                        "when given"
                    )
            if ttft is not None and (latency is None or ttft > latency):
                raise LogError(f"{where}: ttft_ms needs a latency_ms and must be <= it")
            warmup = row.get("warmup", False)
            if not isinstance(warmup, bool):
                raise LogError(f"{where}: warmup must be true or false when given")
            code = row.get("code")
            if code is not None and not (isinstance(code, str) and code):
                raise LogError(f"{where}: code must be a status name (e.g. OK) when given")
            last = float(t_ms)
            item = Item(str(row.get("kind", "log")), tenant, request, str(row.get("question", "")))
            yield LogRecord(
                float(t_ms),
                item,
                None if latency is None else float(latency),
                None if ttft is None else float(ttft),
                warmup,
                code,
            )


def _finite(value: object) -> bool:
    """A JSON number that is finite (``NaN`` and ``1e999`` parse, as nan and inf; a bool is
    not a number here)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
