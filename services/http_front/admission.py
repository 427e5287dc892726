"""Who calls: the caller's API key, checked against the tenants' keys (``KeyLookup``), and the
``anthropic-version`` header an Anthropic request needs, before its body is read."""

from __future__ import annotations

import json

from aiohttp import web

from services.common.auth import KeyLookup
from services.http_front import anthropic_api
from services.http_front.errors import Api, ApiError, invalid
from services.http_front.marks import TENANT

_NO_KEY = {
    "anthropic": "no API key: send it in the x-api-key header",
    "openai": "no API key: send 'Authorization: Bearer <key>'",
}
# the headers each API reads the caller's key from (``_key``)
_KEY_HEADERS: dict[Api, tuple[str, ...]] = {
    "anthropic": ("x-api-key", "authorization"),
    "openai": ("authorization",),
}
# what a refused anthropic-version is told
_VERSIONS = "the versions are " + ", ".join(anthropic_api.VERSIONS)
_UNKNOWN_KEY = {
    "anthropic": "invalid x-api-key: no tenant has this key",
    "openai": "Incorrect API key provided: no tenant has this key",
}


async def admit(api: Api, request: web.Request, keys: KeyLookup) -> tuple[str, str]:
    """The caller's tenant and key; the Gateway checks the same key again."""
    for header in _KEY_HEADERS[api]:  # the first was read: whatever added one chose
        sent = len(request.headers.getall(header, ()))
        if sent > 1:
            raise ApiError(
                "authentication",
                f"the {header} header is sent {sent} times: send the API key once (a "
                "request carrying two is refused, whichever of them is right)",
            )
    key = _key(api, request)
    if key is None:
        raise ApiError("authentication", _NO_KEY[api])
    tenant = await keys.checked_tenant_for(key)
    if tenant is None:
        raise ApiError("authentication", _UNKNOWN_KEY[api])
    request[TENANT] = tenant
    if api == "anthropic" and request.method == "POST":
        version = request.headers.get("anthropic-version")
        if version is None:
            raise invalid(f"anthropic-version: header is required ({_VERSIONS})")
        if version not in anthropic_api.VERSIONS:
            raise invalid(
                f"anthropic-version: {json.dumps(version[:32])} is not a valid version "
                f"({_VERSIONS})"
            )
    return tenant, key


def _key(api: Api, request: web.Request) -> str | None:
    """The caller's key, or None (a 401): a key is ASCII, anything else is no key of ours."""
    if api == "anthropic":
        key = request.headers.get("x-api-key")
        if key:
            return key.strip() if key.isascii() else None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip() if token.isascii() else None
    return None
