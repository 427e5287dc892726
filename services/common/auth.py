"""Credentials: hashed API keys on the Gateway, a shared internal credential between services.

API keys are never stored in clear: the key file holds ``tenant:sha256hex`` lines. Keys are
random and long (``new_api_key``), so a plain SHA-256 is enough to make a stolen file useless.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import grpc

from services.common.env import ConfigError

INTERNAL_METADATA_KEY = "x-cachemesh-internal"
_KEY_PREFIX = "cm_"
# Methods open without the internal credential: health checks and reflection.
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def new_api_key() -> str:
    return _KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class ApiKeys:
    """Maps an API key to its tenant by the key's hash."""

    def __init__(self, hashes: Mapping[str, str]) -> None:
        self._tenant_by_hash = dict(hashes)

    @classmethod
    def from_file(cls, path: Path) -> ApiKeys:
        if not path.is_file():
            raise ConfigError(f"API key file {path} does not exist (CACHEMESH_API_KEYS_FILE)")
        hashes: dict[str, str] = {}
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            tenant, sep, digest = line.partition(":")
            if not sep or not tenant or len(digest) != 64:
                raise ConfigError(f"{path}:{number}: expected 'tenant:sha256hex'")
            hashes[digest.lower()] = tenant
        if not hashes:
            raise ConfigError(f"API key file {path} holds no keys (CACHEMESH_API_KEYS_FILE)")
        return cls(hashes)

    def tenant_for(self, key: str) -> str | None:
        return self._tenant_by_hash.get(hash_key(key))


def bearer_token(metadata: Any) -> str | None:
    """The token of an ``authorization: Bearer <token>`` header, if any."""
    for item in metadata or ():
        if item.key.lower() == "authorization":
            value = item.value if isinstance(item.value, str) else item.value.decode()
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def internal_metadata(token: str) -> tuple[tuple[str, str]]:
    return ((INTERNAL_METADATA_KEY, token),)


Handler = Callable[[grpc.HandlerCallDetails], Awaitable["grpc.RpcMethodHandler[Any, Any] | None"]]


class InternalAuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects every call that does not carry the router's internal credential."""

    def __init__(self, token: str) -> None:
        if len(token) < 16:
            raise ConfigError("CACHEMESH_INTERNAL_TOKEN must be at least 16 characters")
        self._token = token.encode()

    async def intercept_service(
        self, continuation: Handler, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(_OPEN_PREFIXES):
            return handler
        presented = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == INTERNAL_METADATA_KEY:
                presented = value.encode() if isinstance(value, str) else value
        if hmac.compare_digest(presented, self._token):
            return handler
        return _denied(handler)


_DENIED = "missing or wrong internal credential: only the cachemesh router may call this service"


def _denied(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.response_streaming:

        async def deny_stream(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)
            yield  # pragma: no cover - makes this an async generator

        return grpc.unary_stream_rpc_method_handler(deny_stream, **kwargs)

    async def deny(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)

    return grpc.unary_unary_rpc_method_handler(deny, **kwargs)
