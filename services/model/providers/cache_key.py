"""The ``prompt_cache_key`` a provider is sent: the caller's, derived for its tenant.

OpenAI routes a request by its ``prompt_cache_key`` (with the prompt's start) to a machine
that may hold that prefix in its cache, and every tenant shares the operator's account: sent
as the caller gave it, tenant A could send tenant B's key (or guess it) and be routed to B's
cached prefixes, then read ``cached_tokens``. Sent is the hex SHA-256 of the tenant, a NUL and
the key: one tenant's requests with one key still share a cache bucket, two tenants never do
(64 characters, OpenAI's limit for the field). A tenant's name never holds a NUL
(``keyfile.TENANT_PATTERN``): the NUL ends it, tenant "a" key "b:c" is not tenant "a:b" key
"c"."""

from __future__ import annotations

import hashlib

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2


def tenant_cache_key(tenant: str, key: str) -> str:
    """``key`` as ``tenant``'s own: hex SHA-256 of tenant, NUL, key (64 characters)."""
    return hashlib.sha256(f"{tenant}\0{key}".encode()).hexdigest()


def for_provider(call: model_pb2.GenerateRequest) -> pb.CompleteRequest:
    """``call``'s request as its provider is to see it: its ``prompt_cache_key`` (if any) the
    tenant's derivation (``tenant_cache_key``); without one, the request itself (no copy)."""
    key = call.request.cache.prompt_cache_key
    if not key:
        return call.request
    upstream = pb.CompleteRequest()
    upstream.CopyFrom(call.request)
    upstream.cache.prompt_cache_key = tenant_cache_key(call.tenant, key)
    return upstream
