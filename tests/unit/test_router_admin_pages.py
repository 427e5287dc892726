"""The Admin API's pages as pure functions: the order, the cursor, the bounds."""

from __future__ import annotations

import pytest

from services.common.keyfile import KeyRecord
from services.router.admin_pages import (
    PAGE_MAX,
    WHOLE_REPLY_BYTES,
    PageError,
    cursor,
    key_cursor,
    key_order,
    keys_page,
    page_size,
    stats_page,
    token,
    whole_reply,
    whole_requested,
)


def _key(i: int, tenant: str, revoked: bool = False) -> KeyRecord:
    return KeyRecord(
        id=f"key_{i:012d}",
        tenant=tenant,
        sha256="0" * 64,
        created_at=float(i % 5),
        revoked_at=1.0 if revoked else None,
    )


def test_page_size_defaults_to_the_most_and_refuses_a_negative() -> None:
    assert page_size(0) == PAGE_MAX == page_size(10**9) and page_size(7) == 7
    with pytest.raises(PageError, match="page_size: must be 0"):
        page_size(-1)


def test_keys_pages_cover_every_key_once_in_order() -> None:
    records = [_key(i, f"t{i % 3}", revoked=i % 4 == 0) for i in range(50)]
    seen: list[KeyRecord] = []
    after = None
    while True:
        page, more = keys_page(records, "", True, after, 7)
        seen += page
        if not more:
            break
        after = key_cursor(cursor("keys", {}, token("keys", {}, key_order(page[-1]))))
    assert seen == sorted(records, key=key_order)
    active, _ = keys_page(records, "t1", False, None, 100)
    assert active == sorted((r for r in records if r.tenant == "t1" and r.active), key=key_order)


@pytest.mark.parametrize("bad", ["x", "e30", token("keys", {}, ["a", "b"]), token("keys", {}, [])])
def test_a_key_cursor_not_made_by_list_keys_is_refused(bad: str) -> None:
    with pytest.raises(PageError, match="page_token: "):
        key_cursor(cursor("keys", {}, bad))


def test_a_stats_page_ends_early_on_long_tenant_names() -> None:
    """Names an older semantic-cache kept may be 1 MB each: a page of 1,000 of them was 1 GB."""
    long_names = [c * 600_000 for c in "abcde"]
    page = stats_page([_key(1, "short")], long_names, "", None, 1000)
    assert page.tenants == ["a" * 600_000] and page.more
    rest = stats_page([_key(1, "short")], long_names, "", "e" * 600_000, 1000)
    assert rest.tenants == ["short"] and rest.keys == {"short": [_key(1, "short")]}
    assert not rest.more


def test_a_stats_page_ends_where_l1s_page_ends() -> None:
    """L1 answered a page (more follow its last row, "c"): a key's tenant past it is not in
    this page (L1 tenants before it are not read yet), and more follow whatever is left."""
    records = [_key(1, "b"), _key(2, "d")]
    page = stats_page(records, ["a", "c"], "", None, 10, l1_through="c")
    assert (page.tenants, page.more) == (["a", "b", "c"], True)
    assert page.keys == {"b": [_key(1, "b")]}
    last = stats_page(records, ["e"], "", "c", 10)  # L1's last page: through its last row
    assert (last.tenants, last.more) == (["d", "e"], False)


def test_a_whole_reply_is_every_row_until_their_bytes_pass_the_cap() -> None:
    assert whole_requested(0, "") and not whole_requested(5, "") and not whole_requested(0, "t")
    rows = ["x" * 100] * 3
    assert whole_reply(rows, len) == rows
    read: list[str] = []

    def size(row: str) -> int:
        read.append(row)
        return WHOLE_REPLY_BYTES // 2

    assert whole_reply(iter(["a", "b", "c", "d"]), size) is None
    assert read == ["a", "b"]  # no row read past the cap
