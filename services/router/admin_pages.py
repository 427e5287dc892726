"""The Admin API's pages: which keys or tenants one ``ListKeys``, ``GetStats`` or ``ListLimits``
reply holds, and the ``page_token`` that says where the next one starts.

The replies were unbounded: ~89,000 keys made a ``ListKeys`` reply over gRPC's 4 MiB message
limit (it failed ``RESOURCE_EXHAUSTED``), as did ~50,000 tenants with limits of their own a
``ListLimits`` reply, and ``GetStats`` of 10,000 tenants asked prefix-cache for 10,000 tenants'
totals within one deadline. A page is at most ``PAGE_MAX`` rows, chosen in
the reply's order after the token's cursor (the last row sent): a key created or removed
between two pages moves no other row in or out of the next one.

The token is the cursor and the request's filters, as url-safe base64 of JSON. It is not a
secret and grants nothing: the caller holds the admin credential, and a token made up by hand
only chooses where a page starts (a token for other filters is refused, not misread).

Pure functions: the servicer runs them off the event loop (``asyncio.to_thread``).
"""

from __future__ import annotations

import base64
import binascii
import heapq
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from services.common.keyfile import KeyRecord

PAGE_MAX = 1000  # rows a reply, at most, and the default (page_size 0): ~250 KB of keys
# A ListKeys or ListLimits request with neither page_size nor page_token is an older client's
# (before pages), which reads one reply and knows no next_page_token: it is answered every row,
# as before pages, while the reply stays under this (gRPC's 4 MiB message limit, with room),
# else refused (a first page of 1,000 rows was a silent cut: 1,000 of 1,005 tenants listed)
WHOLE_REPLY_BYTES = 3 << 20
ROW_FRAME_BYTES = 6  # a repeated row's field tag and length prefix, at most
# GetStats: a page also ends once its tenant names pass this many bytes (names kept by an
# older semantic-cache may be 1 MB each), with at least one row
PAGE_NAME_BYTES = 1 << 20
ROW_BYTES = 256  # a GetStats row's figures beside its name, at most (with its key counts)

T = TypeVar("T")
KeyOrder = tuple[str, float, str]  # (tenant, created_at, id): ListKeys's order


class PageError(ValueError):
    """A page_size or page_token the API refuses (the message names the field)."""


def page_size(requested: int) -> int:
    """The rows a reply holds at most: ``requested``, 0 for ``PAGE_MAX``, more taken as it."""
    if requested < 0:
        raise PageError(
            f"page_size: must be 0 (the default, {PAGE_MAX:,}) or more, got {requested}"
        )
    return min(requested or PAGE_MAX, PAGE_MAX)


def whole_requested(requested_size: int, page_token: str) -> bool:
    """Whether a request is an older client's, answered whole (``WHOLE_REPLY_BYTES``)."""
    return requested_size == 0 and not page_token


def whole_reply(rows: Iterable[T], size_of: Callable[[T], int]) -> list[T] | None:
    """Every row, or None once their bytes (``size_of`` each, its frame added) pass
    ``WHOLE_REPLY_BYTES``: no more of them is read then."""
    chosen: list[T] = []
    total = 0
    for row in rows:
        total += size_of(row) + ROW_FRAME_BYTES
        if total > WHOLE_REPLY_BYTES:
            return None
        chosen.append(row)
    return chosen


def token(kind: str, filters: dict[str, Any], after: Sequence[Any]) -> str:
    """The page_token of the page after the row ``after`` (its sort key)."""
    raw = json.dumps({"k": kind, "f": filters, "a": list(after)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def cursor(kind: str, filters: dict[str, Any], page_token: str) -> list[Any] | None:
    """The sort key of the row a page starts after (None: the first page)."""
    if not page_token:
        return None
    try:
        padded = page_token + "=" * (-len(page_token) % 4)
        decoded = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, binascii.Error, UnicodeError):
        decoded = None
    if (
        not isinstance(decoded, dict)
        or decoded.get("k") != kind
        or not isinstance(decoded.get("a"), list)
    ):
        raise PageError(
            "page_token: not one this call made; send a reply's next_page_token as it came "
            "(or none, for the first page)"
        )
    if decoded.get("f") != filters:
        named = ", ".join(filters)
        raise PageError(
            f"page_token: made for a request with another {named}; send the same {named} "
            "as for the first page"
        )
    after: list[Any] = decoded["a"]
    return after


def key_order(record: KeyRecord) -> KeyOrder:
    return (record.tenant, record.created_at or 0.0, record.id)


def key_cursor(after: list[Any] | None) -> KeyOrder | None:
    if after is None:
        return None
    if (
        len(after) != 3
        or not isinstance(after[0], str)
        or not isinstance(after[1], int | float)
        or isinstance(after[1], bool)
        or not isinstance(after[2], str)
    ):
        raise PageError("page_token: not one ListKeys made; send a reply's next_page_token")
    return (after[0], float(after[1]), after[2])


def tenant_cursor(after: list[Any] | None) -> str | None:
    return _name_cursor(after, "GetStats")


def limits_cursor(after: list[Any] | None) -> str | None:
    return _name_cursor(after, "ListLimits")


def _name_cursor(after: list[Any] | None, call: str) -> str | None:
    if after is None:
        return None
    if len(after) != 1 or not isinstance(after[0], str):
        raise PageError(f"page_token: not one {call} made; send a reply's next_page_token")
    first: str = after[0]
    return first


def limits_page(
    overrides: Iterable[T], tenant_of: Callable[[T], str], after: str | None, size: int
) -> tuple[list[T], bool]:
    """The page's tenants with limits of their own, by name after ``after``, and whether
    more follow. O(tenants log size)."""
    following = (o for o in overrides if after is None or tenant_of(o) > after)
    first = heapq.nsmallest(size + 1, following, key=tenant_of)
    return first[:size], len(first) > size


def keys_page(
    records: Iterable[KeyRecord],
    tenant: str,
    include_revoked: bool,
    after: KeyOrder | None,
    size: int,
) -> tuple[list[KeyRecord], bool]:
    """The page's keys in ListKeys's order, and whether more follow. O(keys log size)."""
    chosen = (
        r
        for r in records
        if (not tenant or r.tenant == tenant)
        and (include_revoked or r.active)
        and (after is None or key_order(r) > after)
    )
    first = heapq.nsmallest(size + 1, chosen, key=key_order)
    return first[:size], len(first) > size


@dataclass(frozen=True)
class StatsPage:
    tenants: list[str]  # by name
    keys: dict[str, list[KeyRecord]]  # each one's keys (a tenant without one: absent)
    more: bool


def stats_page(
    records: Sequence[KeyRecord],
    l1_tenants: Iterable[str],
    tenant: str,
    after: str | None,
    size: int,
    l1_through: str | None = None,
) -> StatsPage:
    """The page's tenants (``tenant`` alone, or every one with a key or L1 figures, by name,
    after ``after``) and their keys, grouped in one pass over the records. O(keys + tenants
    log size).

    ``l1_tenants``: L1's tenants after ``after`` up to ``l1_through`` (its page: more follow),
    or through the last when None (its last page, or every tenant's from an L1 without
    pages). The page ends at ``l1_through``: a tenant with a key past it may come after L1
    tenants not yet read, in the next page."""
    if tenant:
        every: Iterable[str] = [tenant]
    else:
        every = {r.tenant for r in records}.union(l1_tenants)
    following = (
        t for t in every if (after is None or t > after) and (l1_through is None or t <= l1_through)
    )
    first = heapq.nsmallest(size + 1, following)
    chosen: list[str] = []
    name_bytes = 0
    for name in first[:size]:
        name_bytes += len(name.encode("utf-8", "surrogatepass")) + ROW_BYTES
        if chosen and name_bytes > PAGE_NAME_BYTES:
            break
        chosen.append(name)
    wanted = set(chosen)
    keys: dict[str, list[KeyRecord]] = {}
    for record in records:
        if record.tenant in wanted:
            keys.setdefault(record.tenant, []).append(record)
    more = len(first) > len(chosen) or l1_through is not None
    return StatsPage(chosen, keys, more=more)
