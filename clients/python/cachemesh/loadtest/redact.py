"""Settings fit for a report: a value whose name says key, token, secret, password or
credential is masked, and so is the user:password part of a URL (``make bench`` and
``cachemesh-load`` record the stack's settings beside their figures)."""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "***"
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH", re.IGNORECASE)
# up to the value's last "@": a password may hold "@", "/" or "?" (redis-py reads it so)
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)\S*@")
_URL_QUERY_SECRET = re.compile(r"(?P<name>[?&](?:password|passwd|token|key)=)[^&\s]*", re.I)


def mask(name: str, value: str, secrets: Iterable[str] = ()) -> str:
    """``value`` of the setting ``name``, its secrets masked (``secrets``: known values)."""
    if _SECRET_NAME.search(name):
        return MASK if value else ""
    value = _URL_QUERY_SECRET.sub(rf"\g<name>{MASK}", value)  # first: it may hold an "@"
    value = _URL_USERINFO.sub(rf"\g<scheme>{MASK}@", value)
    for secret in secrets:
        if secret:
            value = value.replace(secret, MASK)
    return value
