"""Who calls: the caller's API key, checked against the tenants' keys (``KeyLookup``), and the
``anthropic-version`` header an Anthropic request needs, before its body is read."""

from __future__ import annotations

import datetime
import json
import logging
import re
from collections.abc import Callable

from aiohttp import web

from services.common.auth import KeyLookup
from services.http_front import anthropic_api
from services.http_front.errors import Api, ApiError, invalid
from services.http_front.marks import ANTHROPIC_VERSION, TENANT

_NO_KEY = {
    "anthropic": "no API key: send it in the x-api-key header",
    "openai": "no API key: send 'Authorization: Bearer <key>'",
}
# the headers each API reads the caller's key from (``_key``)
_KEY_HEADERS: dict[Api, tuple[str, ...]] = {
    "anthropic": ("x-api-key", "authorization"),
    "openai": ("authorization",),
}
log = logging.getLogger("cachemesh.http_front")
_NEWEST = anthropic_api.VERSIONS[-1]
# what a refused anthropic-version is told
_VERSIONS = (
    "the versions are " + ", ".join(anthropic_api.VERSIONS) + f", or a date after {_NEWEST} "
    f"up to today (served as {_NEWEST})"
)
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")  # fullmatch: ASCII digits, nothing after
_UNKNOWN_KEY = {
    "anthropic": "invalid x-api-key: no tenant has this key",
    "openai": "Incorrect API key provided: no tenant has this key",
}


class AnthropicVersions:
    """What ``anthropic-version`` a request may send (see the README): one of Anthropic's
    versions (``anthropic_api.VERSIONS``), or a date after the newest of them, which a client
    newer than the front sends (an SDK major moving to a later version): served as the newest,
    and logged once (the first such version, a WARNING: the front is to be upgraded). A date
    up to the newest that is not one of them (2023-10-01) is made up, refused as Anthropic
    refuses it, and so is a date after tomorrow (``clock``: the wall clock, seconds since the
    epoch): no version is dated in the future, so 2062-10-21 is a typo of 2026-10-21. One a
    process (the front's ``Front``): it holds whether the WARNING went out."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._newer_logged = False

    def served(self, version: str | None) -> str:
        """The version the request is served as; ``ApiError`` (400) if it is none."""
        if version is None:
            raise invalid(f"anthropic-version: header is required ({_VERSIONS})")
        if version in anthropic_api.VERSIONS:
            return version
        today = datetime.datetime.fromtimestamp(self._clock(), datetime.UTC).date()
        if _later_date(version, today + datetime.timedelta(days=1)):
            if not self._newer_logged:
                self._newer_logged = True
                log.warning(
                    "http-front: a client sent anthropic-version %s, later than the newest this "
                    "front knows (%s): served as %s; upgrade the front to know it (logged once: "
                    "any later ones are served alike without a word)",
                    version,
                    _NEWEST,
                    _NEWEST,
                )
            return _NEWEST
        raise invalid(
            f"anthropic-version: {json.dumps(version[:32])} is not a valid version ({_VERSIONS})"
        )


def _later_date(version: str, latest: datetime.date) -> bool:
    """``version`` is a real calendar date, written YYYY-MM-DD, after the newest version and
    not after ``latest`` (tomorrow, wherever the caller is)."""
    if not _DATE.fullmatch(version):
        return False
    try:
        day = datetime.date.fromisoformat(version)
    except ValueError:  # 2027-02-30
        return False
    return datetime.date.fromisoformat(_NEWEST) < day <= latest


async def admit(
    api: Api, request: web.Request, keys: KeyLookup, versions: AnthropicVersions
) -> tuple[str, str]:
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
        request[ANTHROPIC_VERSION] = versions.served(request.headers.get("anthropic-version"))
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
