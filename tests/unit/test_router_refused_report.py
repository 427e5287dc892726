"""A provider's report that prefix-cache refuses never costs the answer its bill: the router
commits the FINAL again without the report, at prefix-cache's estimate (the WARM's prompt and
the output count), live and when the billing outbox replays it. Real parts: prefix-cache's
core (in memory) behind the router's port, the pipeline, the outbox."""

from __future__ import annotations

from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc
from services.prefix_cache.api import PrefixCacheApi
from services.router.outbox import BillingOutbox
from tests.unit.test_router_outbox_budgets import DownPort
from tests.unit.test_router_outbox_replay import TENANT, _core
from tests.unit.test_router_pipeline import FakeModels, FakeStream, Rig, _request

MODEL = "local-small"  # a self-hosted engine: its report has OpenAI's shape
OUTPUT = 3


class ZeroPrompt(FakeModels):
    """An engine whose report says a prompt of 0 tokens (Ollama's for a prompt it had cached,
    passed on by a model service that took it for a count): prefix-cache refuses it."""

    def generate(
        self, replica: str, request: model_pb2.GenerateRequest, deadline_s: float
    ) -> FakeStream:
        self.calls.append((replica, request))
        report = pc.OpenAIUsage(prompt_tokens=0, completion_tokens=OUTPUT, total_tokens=OUTPUT)
        end = model_pb2.GenerateEnd(
            output_tokens=OUTPUT,
            stop_reason="end_turn",
            provider_usage=pc.ProviderUsage(openai=report),
        )
        start = model_pb2.GenerateStart(replica=replica, prompt_tokens=40)
        return FakeStream(
            [
                model_pb2.GenerateChunk(start=start),
                model_pb2.GenerateChunk(text="Use the reset link."),
                model_pb2.GenerateChunk(end=end),
            ]
        )


async def test_an_answer_whose_report_is_refused_is_billed_at_the_estimate() -> None:
    """Before, the router took the refusal for prefix-cache down: the outbox kept the FINAL,
    its replay got INVALID_ARGUMENT and dropped it; the client had its answer, the tenant
    was billed 0."""
    core, _ = _core()
    port = DownPort(PrefixCacheApi(core))
    port.down = False
    outbox = BillingOutbox(port, None, 1.0, 0.01)
    rig = Rig(prefix=port, models=ZeroPrompt(), outbox=outbox)  # type: ignore[arg-type]
    request = _request(MODEL)
    planned = (await core.plan(TENANT, MODEL, request, [])).split.prompt_tokens
    end = (await rig.run(request))[-1].end
    assert outbox.pending == 0, "the bill went to the outbox"
    assert not end.cost.estimated  # prefix-cache's bill, not the router's guess
    totals = await core.totals(TENANT)
    assert (totals.input_tokens, totals.output_tokens) == (planned, OUTPUT)
    assert totals.cost_nanos == end.cost.cost_nanos > 0


async def test_a_kept_bill_whose_report_is_refused_is_billed_at_the_estimate_on_replay() -> None:
    """prefix-cache down while the answer went out: the outbox keeps its bill; once back,
    prefix-cache refuses the report and the replay sends the FINAL again without it."""
    core, _ = _core()
    port = DownPort(PrefixCacheApi(core))
    outbox = BillingOutbox(port, None, 1.0, 0.01)
    rig = Rig(prefix=port, models=ZeroPrompt(), outbox=outbox)  # type: ignore[arg-type]
    request = _request(MODEL)
    end = (await rig.run(request))[-1].end
    assert end.cost.estimated and outbox.pending == 1
    port.down = False
    planned = (await core.plan(TENANT, MODEL, request, [])).split.prompt_tokens
    await outbox.flush()
    assert outbox.pending == 0
    totals = await core.totals(TENANT)
    assert (totals.input_tokens, totals.output_tokens) == (planned, OUTPUT)
    assert totals.cost_nanos > 0, "the kept bill was dropped"
