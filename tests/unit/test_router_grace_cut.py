"""A request the router's own shutdown cuts (its grace period ended: gRPC cancels the calls
left, and their callers get UNAVAILABLE) is recorded as the caller saw it, UNAVAILABLE, in its
access line and ``cachemesh_router_errors_total``: an alert on errors sees the requests a
deploy cuts. A caller's own cancel stays CANCELLED."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable
from typing import Any

import pytest

from cachemesh import build_request
from services.common.grace import GraceEnd
from services.common.logs import JsonLines
from services.common.metrics import TenantLabels, new_registry
from services.router import servicer as servicer_module
from services.router.metrics import RouterMetrics
from tests.unit.gateway_support import gateway_servicer
from tests.unit.test_router_answer_ledger import KEY, FakeContext
from tests.unit.test_router_unanswered_money import BilledPipeline, HeldLedger
from tests.unit.test_service_metrics import logs, value  # noqa: F401 (a fixture)
from tests.waits import reached

# the answer ledger's wait: the service's 0.5 s fails open under load (the call goes on unclaimed)
PATIENT_S = 10.0


@pytest.fixture(autouse=True)
def _patient_ledger(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loaded test machine may take longer than the service's 0.5 s to answer."""
    monkeypatch.setattr(servicer_module, "LEDGER_TIMEOUT_S", PATIENT_S)


@pytest.mark.parametrize("method", ["Complete", "StreamComplete"])
@pytest.mark.parametrize(("grace_ended", "code"), [(True, "UNAVAILABLE"), (False, "CANCELLED")])
async def test_a_request_cut_when_the_grace_ends_is_unavailable(
    method: str,
    grace_ended: bool,
    code: str,
    logs: Callable[[dict[str, str]], tuple[io.StringIO, JsonLines | None]],  # noqa: F811
) -> None:
    out, lines = logs({})
    registry = new_registry()
    ledger = HeldLedger()
    grace = GraceEnd()
    servicer = gateway_servicer(
        BilledPipeline(),
        {KEY: "tenant-a"},
        metrics=RouterMetrics(registry, TenantLabels(4)),
        lines=lines,
        ledger=ledger,  # type: ignore[arg-type]
        grace_end=grace,
    )
    request = build_request("Describe a harbour at dawn.", model="sim-small", request_id="r-1")
    context = FakeContext()
    if method == "Complete":
        call: asyncio.Future[Any] = asyncio.ensure_future(
            servicer.Complete(request, context)  # type: ignore[arg-type]
        )
    else:

        async def read() -> None:
            async for _ in servicer.StreamComplete(request, context):  # type: ignore[arg-type]
                pass

        call = asyncio.ensure_future(read())
    await reached(ledger.recording, "ledger.recording")
    if grace_ended:
        grace.end()  # the drain's grace ended: gRPC cancels the call
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    errors = value(
        registry, "cachemesh_router_errors_total", tenant="tenant-a", code=code, deadline=""
    )
    assert errors == 1
    (line,) = [json.loads(text) for text in out.getvalue().splitlines() if '"access"' in text]
    assert line["status"] == code
