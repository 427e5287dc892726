"""Credentials: API keys on the Gateway, a shared internal credential between services.

API keys live hashed in the shared key file (``services.common.keyfile``), which the router and
the HTTP front read through a ``KeyStore`` (``services.common.key_store``): re-read within a
second of any change, so keys are created, revoked and rotated without a restart.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import grpc

from services.common.env import ConfigError, Env
from services.common.keyfile import hash_key, new_api_key

__all__ = ["ApiKeys", "KeyLookup", "hash_key", "new_api_key"]

INTERNAL_METADATA_KEY = "x-cachemesh-internal"
# Methods open without the internal credential: health checks and reflection.
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class KeyLookup(Protocol):
    """Which tenant an API key belongs to (None: no active key is this one)."""

    def tenant_for(self, key: str) -> str | None: ...

    async def checked_tenant_for(self, key: str) -> str | None:
        """``tenant_for`` as a request's key check asks it: after the re-read of a change of
        the keys this process has seen or is reading (bounded), not the keys read before."""
        ...


class ApiKeys:
    """A fixed table of key hashes to tenants (a ``KeyLookup`` for tests and tools; the
    services read the shared key file through ``KeyStore``, which follows its changes)."""

    def __init__(self, hashes: Mapping[str, str]) -> None:
        self._tenant_by_hash = dict(hashes)

    def tenant_for(self, key: str) -> str | None:
        return self._tenant_by_hash.get(hash_key(key))

    async def checked_tenant_for(self, key: str) -> str | None:
        return self.tenant_for(key)


class AmbiguousCredential(Exception):
    """A call carries its credential's header more than once: which copy to check would be a
    guess (the first, the last), made unseen by whatever added a copy, so the call is refused
    (UNAUTHENTICATED). The message names the header and the count, never a value."""

    def __init__(self, header: str, count: int) -> None:
        super().__init__(
            f"the {header} header is sent {count} times: send the credential once (a call "
            "carrying two is refused, whichever of them is right)"
        )


def bearer_token(metadata: Any) -> str | None:
    """The token of an ``authorization: Bearer <token>`` header, if any;
    ``AmbiguousCredential`` when the call carries more than one ``authorization``."""
    values = [item.value for item in metadata or () if item.key.lower() == "authorization"]
    if len(values) > 1:
        raise AmbiguousCredential("authorization", len(values))
    for raw in values:
        value = raw if isinstance(raw, str) else raw.decode()
        scheme, _, token = value.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def internal_metadata(token: str) -> tuple[tuple[str, str]]:
    return ((INTERNAL_METADATA_KEY, token),)


INTERNAL_TOKEN = "CACHEMESH_INTERNAL_TOKEN"


def checked_internal_token(token: str) -> str:
    """``token`` if it is one gRPC metadata carries and long enough to guess: every service
    checks it at start-up (the router too: it took a non-ASCII one, and every internal call
    then failed ``INTERNAL Invalid metadata``)."""
    if len(token) < 16 or not all("!" <= c <= "~" for c in token):
        raise ConfigError(
            f"{INTERNAL_TOKEN} (or its _FILE's content) must be at least 16 characters of "
            "printable ASCII, "
            "no whitespace (what gRPC metadata carries; the value is not shown)"
        )
    return token


def internal_token_from_env(env: Env) -> str:
    """The internal credential: ``CACHEMESH_INTERNAL_TOKEN_FILE`` (a file holding it: a
    mounted secret, out of the environment ``docker inspect`` shows) or
    ``CACHEMESH_INTERNAL_TOKEN``, not both (``Env.secret``), checked as above."""
    token = env.secret(INTERNAL_TOKEN)
    if token is None:
        raise ConfigError(
            f"{INTERNAL_TOKEN} (or {INTERNAL_TOKEN}_FILE, the path of a file holding it) is "
            "required but not set: the credential every call between the services carries"
        )
    return checked_internal_token(token)


Handler = Callable[[grpc.HandlerCallDetails], Awaitable["grpc.RpcMethodHandler[Any, Any] | None"]]


class InternalAuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects every call that does not carry the router's internal credential."""

    def __init__(self, token: str) -> None:
        self._token = checked_internal_token(token).encode()

    async def intercept_service(
        self, continuation: Handler, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(_OPEN_PREFIXES):
            return handler
        values = [
            value.encode() if isinstance(value, str) else value
            for key, value in handler_call_details.invocation_metadata or ()
            if key == INTERNAL_METADATA_KEY
        ]
        if len(values) > 1:  # the last one was read: a wrong one and the right one passed
            return _denied(handler, str(AmbiguousCredential(INTERNAL_METADATA_KEY, len(values))))
        if values and hmac.compare_digest(values[0], self._token):
            return handler
        return _denied(handler, _DENIED)


_DENIED = "missing or wrong internal credential: only the cachemesh router may call this service"


def _denied(
    handler: grpc.RpcMethodHandler[Any, Any], message: str
) -> grpc.RpcMethodHandler[Any, Any]:
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.response_streaming:

        async def deny_stream(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # pragma: no cover - makes this an async generator

        return grpc.unary_stream_rpc_method_handler(deny_stream, **kwargs)

    async def deny(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(deny, **kwargs)
