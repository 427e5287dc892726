"""A caller's ``prompt_cache_key`` reaches OpenAI as its tenant's own (``cache_key``).

Before, it was sent as given (``"prompt_cache_key": "agent-v1"`` from both tenants), and every
tenant shares the operator's account: tenant A could send tenant B's key and be routed to B's
cached prefixes, then read ``cached_tokens``. Now the wire carries the hex SHA-256 of tenant,
NUL and key: the same for one tenant's requests with one key, never the same for two tenants.
Seen at the wire: the loopback OpenAI server of ``tests.providers`` records each body."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from services.common.keyfile import TENANT_PATTERN
from services.common.tokens import load_vocabulary
from services.model.providers.cache_key import tenant_cache_key
from tests.providers.loopback import serving
from tests.providers.replica import provider_replica, provider_settings
from tests.providers.wire_server import WireServer

MODEL = "gpt-4o"
KEY = "agent-v1"
MAX_PROMPT_CACHE_KEY_CHARS = 64  # OpenAI's limit (a longer one: 400 string_above_max_length)


@pytest.fixture(scope="module")
def server() -> Iterator[WireServer]:
    yield from serving()


def _call(tenant: str, key: str) -> model_pb2.GenerateRequest:
    message = pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text="How much?")])
    request = pb.CompleteRequest(
        model=MODEL,
        max_tokens=8,
        messages=[message],
        cache=pb.CacheOptions(prompt_cache_key=key),
    )
    return model_pb2.GenerateRequest(tenant=tenant, model=MODEL, request=request)


async def _sent_keys(server: WireServer, *calls: model_pb2.GenerateRequest) -> list[object]:
    """The ``prompt_cache_key`` of each body the provider received for ``calls``."""
    settings = provider_settings("openai", server.base + "/v1")  # an engine that takes no key
    api = provider_replica(
        settings,
        [MODEL],
        tokenizer=load_vocabulary("o200k_base"),  # the gpt rows' vocabulary
    )
    server.reset()
    try:
        for call in calls:
            async for _ in api.generate(call, 10.0):
                pass
    finally:
        await api.close()
    return [seen.body.get("prompt_cache_key") for seen in server.seen_by("openai")]


async def test_two_tenants_never_share_a_cache_bucket(server: WireServer) -> None:
    sent = await _sent_keys(
        server, _call("tenant-a", KEY), _call("tenant-a", KEY), _call("tenant-b", KEY)
    )
    print(f"\nsent: {sent}")
    a, again, b = sent
    assert a == again  # one tenant's requests with one key share a bucket
    assert a != b  # was "agent-v1" for both
    assert KEY not in (a, b)
    assert a == hashlib.sha256(b"tenant-a\0agent-v1").hexdigest()
    assert isinstance(a, str) and len(a) == MAX_PROMPT_CACHE_KEY_CHARS


async def test_a_request_without_a_key_sends_none(server: WireServer) -> None:
    assert await _sent_keys(server, _call("tenant-a", "")) == [None]


def test_tenant_and_key_do_not_run_together() -> None:
    """The NUL ends the tenant's name, which never holds one (``TENANT_PATTERN``)."""
    assert TENANT_PATTERN.match("a\0b") is None
    assert tenant_cache_key("a:b", "c") != tenant_cache_key("a", "b:c")
    assert tenant_cache_key("a", "bc") != tenant_cache_key("ab", "c")
