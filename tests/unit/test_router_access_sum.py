"""The README's ``jq`` sum of the access lines is what the requests were billed: a replayed
line repeats its first call's cost (left out), and an answered line's ``cost_nanos`` leaves
out the ``unanswered_cost_nanos`` of its cut attempts (added), while a line with no answer
already carries those as its ``cost_nanos``. Runs the README's own expression over lines the
access log writes."""

from __future__ import annotations

import asyncio
import io
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from services.common.logs import JsonLines
from services.common.metrics import TenantLabels, new_registry
from services.router.access_log import RequestLog
from services.router.billing import Bill
from services.router.metrics import RouterMetrics
from tests.unit.test_router_pipeline import TABLE, _request
from tests.unit.test_service_metrics import logs  # noqa: F401 (a fixture)

README = Path(__file__).resolve().parents[2] / "README.md"
_SUM = re.compile(r"^(jq -n .*unanswered_cost_nanos.*) \.run/logs/router\.log$", re.M)


def _end(cost: int) -> pb.CompleteResponse:
    return pb.CompleteResponse(
        served_by=pb.LAYER_MODEL, model="sim-large", cost=pb.Cost(cost_nanos=cost)
    )


def _bill(loop: asyncio.AbstractEventLoop, cost: int) -> asyncio.Future[Bill | None]:
    future: asyncio.Future[Bill | None] = loop.create_future()
    future.set_result(Bill(pb.Usage(output_tokens=1), pb.Cost(cost_nanos=cost)))
    return future


@pytest.mark.skipif(shutil.which("jq") is None, reason="jq is not installed")
def test_the_readmes_sum_of_access_lines_is_the_bill(
    logs: Callable[[dict[str, str]], tuple[io.StringIO, JsonLines | None]],  # noqa: F811
) -> None:
    out, lines = logs({})
    log = RequestLog(RouterMetrics(new_registry(), TenantLabels(4)), TABLE, lambda: 0.0, lines)
    billed = 0
    loop = asyncio.new_event_loop()  # the bills' futures, all done: the lines are written now

    def line(code: str, end: int | None, cut: tuple[int, ...], replayed: bool = False) -> None:
        call = log.begin("Complete")
        call.tenant = "tenant-a"
        call.end = _end(end) if end is not None else None
        call.replayed = replayed
        call.bills.extend(_bill(loop, cost) for cost in cut)
        log.finish(call, _request(), code)

    line("OK", 100, (30,))  # answered after a cut attempt: both billed
    billed += 130
    line("OK", 100, (), replayed=True)  # the answer above, replayed to a retry: no new bill
    line("CANCELLED", None, (50,))  # the caller left mid-answer: its call billed
    billed += 50
    line("CANCELLED", 70, (20,))  # answered and billed, the caller gone before it got it
    billed += 90
    line("OK", 0, ())  # an L1 hit
    line("UNAVAILABLE", None, ())  # nothing billed
    loop.close()
    found = _SUM.search(README.read_text())
    assert found is not None, "the README's jq sum of the access lines"
    command = found.group(1).removeprefix("jq ")
    expression = re.fullmatch(r"-n '(.*)'", command)
    assert expression is not None, command
    summed = subprocess.run(
        ["jq", "-n", expression.group(1)],
        input=out.getvalue(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(summed.stdout) == billed == 270
