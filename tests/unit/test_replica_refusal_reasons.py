"""A model replica's own refusals of a request's fault carry a short reason in our words
(``RequestError.reason``, the ``cachemesh-reason`` trailer), which the router's span of the
call says; the router's span says the refusal's code's name when a replica sent none, never
the replica's details (an older replica's 400 quotes its provider, which may quote the prompt).

Before: the replica's own checks ("model X is not served by replica Y", "max_tokens must be
between...", the simulator's over-context, "prompt facts are inconsistent") sent no reason and
the router's Generate span's status description was empty."""

from __future__ import annotations

import grpc
import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from cachemesh.v1.prompt_pb2 import PromptFacts
from services.common.errors import Code, RequestError
from services.common.models import load_model_table
from services.common.tokens import load_cl100k
from services.model.engine import SimEngine
from services.model.kv_cache import KvBlockCache
from services.router import grpc_adapters
from tests.providers.replica import provider_replica, provider_settings
from tests.unit.model_support import RecordingSleep

TABLE = load_model_table()
REPLICA = "replica-7f3a"


def _question(max_tokens: int = 100) -> pb.CompleteRequest:
    question = pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="Hi?")])
    return pb.CompleteRequest(model="sim-large", max_tokens=max_tokens, messages=[question])


def _engine(window: int | None = None) -> SimEngine:
    large = TABLE.models["sim-large"]
    if window is not None:
        large = large.model_copy(update={"context_window_tokens": window})
    return SimEngine(
        models={"sim-large": large},
        replica_id=REPLICA,
        tokenizer=load_cl100k(),
        kv_cache=KvBlockCache(100),
        time_scale=1.0,
        sleep=RecordingSleep(),
    )


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("no tenant", "no tenant"),
        ("unknown model", "the model is not served by the replica it was sent to"),
        ("max_tokens", "max_tokens out of the range of sim-large"),
        ("no messages", "the prompt has no tokens"),
        ("over the window", "the prompt is over sim-large's context window"),
        ("facts", "prompt facts are inconsistent"),
    ],
)
def test_the_simulators_own_refusals_carry_a_reason(case: str, reason: str) -> None:
    engine = _engine(window=1 if case == "over the window" else None)
    tenant, model, request, facts = "t", "sim-large", _question(), None
    if case == "no tenant":
        tenant = ""
    elif case == "unknown model":
        model = "gpt-9"
    elif case == "max_tokens":
        request = _question(max_tokens=10**6)
    elif case == "no messages":
        request = pb.CompleteRequest(max_tokens=10)
    elif case == "facts":
        facts = PromptFacts(prompt_tokens=40, kv_block_hashes=b"\x00" * 32, digest="ab")
    with pytest.raises(RequestError) as caught:
        engine.prepare(tenant, model, request, facts)
    assert caught.value.code in (Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED)
    assert caught.value.reason == reason
    assert REPLICA not in caught.value.reason


@pytest.mark.parametrize(
    ("tenant", "model", "max_tokens", "messages", "reason"),
    [
        ("", "gpt-4o", 100, True, "no tenant"),
        ("t", "gpt-9", 100, True, "the model is not served by the replica it was sent to"),
        ("t", "gpt-4o", 10**7, True, "max_tokens out of the range of gpt-4o"),
        ("t", "gpt-4o", 100, False, "no messages"),
    ],
)
async def test_a_provider_replicas_own_refusals_carry_a_reason(
    tenant: str, model: str, max_tokens: int, messages: bool, reason: str
) -> None:
    settings = provider_settings("openai", "http://127.0.0.1:1/v1", "sk-test")
    api = provider_replica(settings, ["gpt-4o"], replica_id=REPLICA)
    request = _question(max_tokens)
    request.model = model
    if not messages:
        del request.messages[:]
    call = model_pb2.GenerateRequest(tenant=tenant, model=model, request=request)
    with pytest.raises(RequestError) as caught:
        async for _ in api.generate(call):
            pass
    assert caught.value.code == Code.INVALID_ARGUMENT
    assert caught.value.reason == reason
    assert REPLICA not in caught.value.reason


def _refusal(code: grpc.StatusCode, details: str, reason: str | None) -> grpc.aio.AioRpcError:
    trailers = grpc.aio.Metadata()
    if reason is not None:
        trailers.add(grpc_adapters.REASON_KEY, reason)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailers, details)


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED]
)
def test_the_routers_span_names_a_refusal_without_a_reason_by_its_code_never_its_details(
    code: grpc.StatusCode,
) -> None:
    quoting = "openai refused the request (400): Invalid content 'SECRET-PROMPT-TEXT'"
    assert grpc_adapters._described(_refusal(code, quoting, None)) == code.name
    assert grpc_adapters._described(_refusal(code, quoting, "no tenant")) == "no tenant"
    # an outage's details are the replica's own words, as before
    unavailable = _refusal(grpc.StatusCode.UNAVAILABLE, "openai could not serve (503)", None)
    assert grpc_adapters._described(unavailable) == "openai could not serve (503)"
