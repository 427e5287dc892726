"""The access line names a request by its whole ``request_id``: a Gateway request or an HTTP
``Idempotency-Key`` takes up to 128 characters, and a line that kept only the first 64 wrote
two requests whose ids differ past the 64th (a caller's ``<run>/<conversation>/<turn>``
ids) as one id twice, read as a retry billed twice. A longer id is refused
(``INVALID_ARGUMENT``, 400) and its line keeps the first 128 characters, so no caller makes
a line as long as its request."""

from __future__ import annotations

import io
import json
from collections.abc import Callable

from cachemesh.v1 import gateway_pb2 as pb
from services.common.errors import Code
from services.common.logs import JsonLines
from services.common.metrics import TenantLabels, new_registry
from services.http_front import facts
from services.http_front.access_log import RefusalLog
from services.router import validation
from services.router.access_log import RequestLog
from services.router.metrics import RouterMetrics
from tests.unit.test_service_metrics import TABLE, Ticks, _answer, logs  # noqa: F401

PREFIX = "run-2026-12-06/conversation-" + "0" * 36  # 64 characters
IDS = [f"{PREFIX}/turn-{turn:04d}" + "x" * 54 for turn in (1, 2)]  # 128 each


def _request_ids(out: io.StringIO) -> list[str]:
    return [json.loads(line)["request_id"] for line in out.getvalue().splitlines()]


def test_the_routers_line_has_the_whole_request_id_of_every_accepted_request(
    logs: Callable[[dict[str, str]], tuple[io.StringIO, JsonLines | None]],  # noqa: F811
) -> None:
    assert all(len(rid) == validation.MAX_ID_CHARS for rid in IDS) and len(PREFIX) == 64
    out, lines = logs({})
    log = RequestLog(RouterMetrics(new_registry(), TenantLabels(2)), TABLE, Ticks(), lines)
    for rid in IDS:
        call = log.begin("Complete")
        call.tenant, call.end = "a", _answer(pb.LAYER_MODEL, 900, 1000)
        log.finish(call, pb.CompleteRequest(model="sim-small", request_id=rid), "OK")
    refused = log.begin("Complete")  # over the limit: refused, its line bounded
    log.finish(refused, pb.CompleteRequest(request_id="y" * 100_000), "INVALID_ARGUMENT")
    assert _request_ids(out) == [*IDS, "y" * validation.MAX_ID_CHARS]


def test_the_fronts_refusal_line_has_the_whole_idempotency_key(
    logs: Callable[[dict[str, str]], tuple[io.StringIO, JsonLines | None]],  # noqa: F811
) -> None:
    assert facts.MAX_ID_CHARS == validation.MAX_ID_CHARS
    out, lines = logs({})
    refusals = RefusalLog(lines)
    for rid in IDS:
        refusals.refused("a", rid, "POST /v1/messages", Code.RESOURCE_EXHAUSTED, 429, 0.001)
    assert _request_ids(out) == IDS


def test_an_auto_answers_line_says_why_its_tier_answered(
    logs: Callable[[dict[str, str]], tuple[io.StringIO, JsonLines | None]],  # noqa: F811
) -> None:
    """Before, the line said which tier answered an ``auto`` request and not why: a fallback
    to the large tier (billed at its price) read as the score's choice."""
    out, lines = logs({})
    log = RequestLog(RouterMetrics(new_registry(), TenantLabels(2)), TABLE, Ticks(), lines)
    reason = "score 0.093 < threshold 0.123; fallback: sim-small unavailable"
    for routed in (True, False):
        call = log.begin("Complete")
        call.tenant, call.end = "a", _answer(pb.LAYER_MODEL, 900, 1000)
        if routed:
            routing = pb.Routing(score=0.09285, threshold=0.122755, reason=reason)
            routing.embedding_source = "router.local"
            call.end.routing.CopyFrom(routing)
        log.finish(call, pb.CompleteRequest(model="auto" if routed else "sim-small"), "OK")
    auto, named = (json.loads(line) for line in out.getvalue().splitlines())
    assert auto["routing_reason"] == reason and auto["routing_embedding_source"] == "router.local"
    assert (auto["routing_score"], auto["routing_threshold"]) == (0.0929, 0.1228)
    assert not any(key.startswith("routing") for key in named)
