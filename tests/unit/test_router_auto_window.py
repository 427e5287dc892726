"""``auto`` never sends a prompt to a tier whose context window cannot hold it and its answer
(``max_tokens``): a tier that can answers instead, and when none can the client is told so (not
to retry)."""

from __future__ import annotations

import pytest
from opentelemetry import trace

from cachemesh import build_request
from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import prefix_cache_pb2 as pc
from cachemesh.v1.prompt_pb2 import PromptFacts
from services.common.env import ConfigError, Env
from services.common.errors import Code, RequestError
from services.common.model_overrides import model_table_from_env
from services.common.models import ModelTable, load_model_table
from services.common.prompt import prompt_tokens
from services.common.tokens import load_cl100k
from services.model.api import ModelApi
from services.model.engine import Prepared, SimEngine
from services.model.kv_cache import KvBlockCache
from services.router.dependencies import Dependencies
from services.router.pipeline import Pipeline
from services.router.routing.model import RouterCard, load_router_model
from services.tools.estimator.local_adapters import LocalModels
from tests.unit.test_router_pipeline import FakePrefix, FakeSemantic, _settings

BASE = load_model_table()
TOKENIZER = load_cl100k()
REPLICAS = {"sim-small": ("small-1",), "sim-large": ("large-1",)}
# a document in the system prompt, a short question: the tier score reads the question
DOCUMENT = "The warranty covers parts and labour for two years. " * 1000  # ~11k tokens


class CountingPrefix(FakePrefix):
    """Plan counts the prompt, as prefix-cache does."""

    async def plan(self, request: pc.PlanRequest, deadline_s: float) -> pc.PlanResponse:
        planned = await super().plan(request, deadline_s)
        planned.prompt_tokens = prompt_tokens(request.request, TOKENIZER)
        return planned


def _table(small_window: int, large_window: int) -> ModelTable:
    """Like local-small (8k) / local-large (32k): tiers with windows of their own."""
    models = dict(BASE.models)
    for model, window in (("sim-small", small_window), ("sim-large", large_window)):
        models[model] = models[model].model_copy(update={"context_window_tokens": window})
    return ModelTable(models=models, auto=dict(BASE.auto))


class VllmLike(SimEngine):
    """Refuses a prompt plus ``max_tokens`` over the window, as vLLM and OpenAI do (a 400,
    which the adapter reports as INVALID_ARGUMENT: the request's fault, no other tier tried)."""

    def prepare(
        self,
        tenant: str,
        model: str,
        request: pb.CompleteRequest,
        facts: PromptFacts | None = None,
    ) -> Prepared:
        prepared = super().prepare(tenant, model, request, facts)
        window = prepared.spec.context_window_tokens
        if prepared.prompt_tokens + request.max_tokens > window:
            raise RequestError(
                Code.INVALID_ARGUMENT,
                f"This model's maximum context length is {window} tokens. However, you "
                f"requested {prepared.prompt_tokens + request.max_tokens} tokens",
            )
        return prepared


def _pipeline(table: ModelTable) -> tuple[Pipeline, LocalModels]:
    def engine(replica: str, model: str) -> ModelApi:
        sim = VllmLike(
            models={model: table.models[model]},
            replica_id=replica,
            tokenizer=TOKENIZER,
            kv_cache=KvBlockCache(100_000),
            time_scale=0,
        )
        return ModelApi(sim, offload=False)

    models = LocalModels(
        {"small-1": engine("small-1", "sim-small"), "large-1": engine("large-1", "sim-large")},
        table,
        {},
    )
    deps = Dependencies(FakeSemantic(), CountingPrefix(), models, REPLICAS)
    router = (load_router_model(), RouterCard.load().default_threshold, None)
    return Pipeline(deps, table, TOKENIZER, trace.NoOpTracer(), _settings(), router), models


def _ask(system: str = DOCUMENT, max_tokens: int = 1024) -> pb.CompleteRequest:
    return build_request(
        "Does the warranty cover labour?",
        model="auto",
        request_id="r1",
        system=system,
        max_tokens=max_tokens,
    )


# ~5.5k tokens: within the small tier's 8,192 alone, not with 4,000 tokens of answer
SHORTER_DOCUMENT = "The warranty covers parts and labour for two years. " * 500


def _answer_room() -> pb.CompleteRequest:
    request = _ask(SHORTER_DOCUMENT, max_tokens=4000)
    assert prompt_tokens(request, TOKENIZER) < 8192 < prompt_tokens(request, TOKENIZER) + 4000
    return request


async def test_auto_answers_from_a_tier_that_can_hold_the_prompt() -> None:
    pipeline, _ = _pipeline(_table(8192, 32768))
    chunks = [c async for c in pipeline.run("tenant-a", _ask(), streamed=False)]
    await pipeline.drain()
    assert chunks[-1].end.model == "sim-large"


async def test_no_tier_that_can_hold_the_prompt_is_a_clear_refusal() -> None:
    pipeline, _ = _pipeline(_table(8192, 8192))
    with pytest.raises(RequestError) as caught:
        _ = [c async for c in pipeline.run("tenant-a", _ask(), streamed=False)]
    await pipeline.drain()
    assert caught.value.code == Code.RESOURCE_EXHAUSTED
    assert "no tier of auto can hold the prompt" in caught.value.message
    assert "sim-small" in caught.value.message and "sim-large" in caught.value.message
    assert "lower max_tokens" not in caught.value.message  # the prompt alone is over both


async def test_auto_leaves_a_tier_without_room_for_the_answer() -> None:
    """The prompt fits the small tier's window but not with max_tokens: its replica would
    refuse it (INVALID_ARGUMENT, the request's fault), and the large tier, which holds both,
    would never be tried."""
    pipeline, _ = _pipeline(_table(8192, 32768))
    chunks = [c async for c in pipeline.run("tenant-a", _answer_room(), streamed=False)]
    await pipeline.drain()
    assert chunks[-1].end.model == "sim-large"


async def test_no_tier_with_room_for_the_answer_names_max_tokens() -> None:
    pipeline, _ = _pipeline(_table(8192, 8192))
    with pytest.raises(RequestError) as caught:
        _ = [c async for c in pipeline.run("tenant-a", _answer_room(), streamed=False)]
    await pipeline.drain()
    assert caught.value.code == Code.RESOURCE_EXHAUSTED
    assert "no tier of auto can hold the prompt" in caught.value.message
    assert "plus max_tokens 4000" in caught.value.message
    assert "lower max_tokens" in caught.value.message


def _prefix_down_pipeline(table: ModelTable) -> Pipeline:
    """The real simulated engines behind the replicas; prefix-cache down (no Plan)."""
    _, models = _pipeline(table)
    deps = Dependencies(FakeSemantic(), FakePrefix(down=True), models, REPLICAS)
    router = (load_router_model(), RouterCard.load().default_threshold, None)
    return Pipeline(deps, table, TOKENIZER, trace.NoOpTracer(), _settings(), router)


async def test_prefix_cache_down_still_sends_the_prompt_to_a_tier_that_can_hold_it() -> None:
    """Without a Plan the router counts the prompt itself: the small tier's replica would
    refuse it (RESOURCE_EXHAUSTED) and the request would be lost, not degraded."""
    pipeline = _prefix_down_pipeline(_table(8192, 32768))
    chunks = [c async for c in pipeline.run("tenant-a", _ask(), streamed=False)]
    await pipeline.drain()
    assert chunks[-1].end.model == "sim-large"


async def test_prefix_cache_down_and_no_tier_can_hold_the_prompt_is_a_clear_refusal() -> None:
    pipeline = _prefix_down_pipeline(_table(8192, 8192))
    with pytest.raises(RequestError) as caught:
        _ = [c async for c in pipeline.run("tenant-a", _ask(), streamed=False)]
    await pipeline.drain()
    assert caught.value.code == Code.RESOURCE_EXHAUSTED
    assert "no tier of auto can hold the prompt" in caught.value.message
    assert "sim-small" in caught.value.message and "sim-large" in caught.value.message


async def test_prefix_cache_down_still_leaves_a_tier_without_room_for_the_answer() -> None:
    pipeline = _prefix_down_pipeline(_table(8192, 32768))
    chunks = [c async for c in pipeline.run("tenant-a", _answer_room(), streamed=False)]
    await pipeline.drain()
    assert chunks[-1].end.model == "sim-large"


def test_a_rows_context_window_from_the_environment() -> None:
    """CACHEMESH_CONTEXT_WINDOWS: the window a self-hosted engine was started with, which auto
    then trusts (``up --local-engine`` sets its replicas' context on the rows they serve)."""
    table = model_table_from_env(Env({"CACHEMESH_CONTEXT_WINDOWS": "local-small=4096"}))
    assert table.models["local-small"].context_window_tokens == 4096
    assert table.models["local-large"].context_window_tokens == 32768


@pytest.mark.parametrize(
    "value",
    ["local-small", "local-small=", "local-small=0", "local-small=-5", "local-small=4k",
     "nosuch=4096"],
)  # fmt: skip
def test_a_bad_context_window_fails_naming_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="CACHEMESH_CONTEXT_WINDOWS"):
        model_table_from_env(Env({"CACHEMESH_CONTEXT_WINDOWS": value}))
