"""``cachemesh admin``'s tables and where it finds the admin token (the calls themselves run
against a real router in tests/integration/test_admin_api.py)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from cachemesh.admin_cli import (
    as_json,
    budget_change,
    invalidate_text,
    keys_table,
    limits_list,
    limits_table,
    policy_table,
    rate_change,
    seen_rotation,
    stats_table,
    table,
)
from cachemesh.cli import main
from cachemesh.v1 import admin_pb2 as adm


def test_a_table_pads_columns_and_right_aligns_numbers() -> None:
    text = table(["tenant", "hits"], [["acme", "7"], ["globex-long", "1234"]])
    assert text.splitlines() == [
        "tenant       hits",
        "-----------  ----",
        "acme            7",
        "globex-long  1234",
    ]


def test_stats_show_rates_dollars_and_who_did_not_answer() -> None:
    reply = adm.GetStatsResponse(
        tenants=[
            adm.TenantStats(
                tenant="acme",
                active_keys=2,
                l1_enabled=True,
                l1_entries=5,
                l1_lookups=8,
                l1_hits=2,
                l1_hit_rate=0.25,
                model_requests=6,
                cost_nanos=1_500_000,
                saved_nanos=4_000_000_000,
            ),
            adm.TenantStats(tenant="globex", l1_enabled=False, unavailable=["prefix-cache"]),
        ],
        unavailable=["prefix-cache"],
    )
    text = stats_table(reply)
    acme = next(line for line in text.splitlines() if line.startswith("acme"))
    assert acme.split() == ["acme", "2", "on", "5", "8", "2", "25.0%", "6", "$0.0015", "$4.0000"]
    globex = next(line for line in text.splitlines() if line.startswith("globex"))
    assert globex.split()[2] == "off" and globex.split()[6] == "-"  # no lookup: no rate
    # its totals did not come: unknown, not 0 (5,309 of 10,000 tenants were printed 0)
    assert globex.split()[7:] == ["unknown"] * 3
    assert "NOT ANSWERING: prefix-cache (its figures are unknown for 1 of 2 tenants)" in text


def test_stats_of_a_router_naming_no_row_are_unknown_in_every_row() -> None:
    """A router older than the rows' own unavailable said only that prefix-cache did not
    answer, for some rows: none of its zeros can be told from a real one."""
    reply = adm.GetStatsResponse(
        tenants=[adm.TenantStats(tenant="acme", model_requests=6, l1_lookups=3, l1_hits=1)],
        unavailable=["semantic-cache", "prefix-cache"],
    )
    (acme,) = (line for line in stats_table(reply).splitlines() if line.startswith("acme"))
    assert acme.split() == ["acme", "0", *["unknown"] * 8]


def test_stats_escape_and_cut_tenant_names_an_older_cache_kept() -> None:
    """Tenants an older semantic-cache kept under any name (1 MB, a NUL, a right-to-left
    override) made an 18.8 MB table with the raw characters: now each is escaped and cut."""
    names = ["t" * 1_000_000, "a\x00b", "\u202eevil", "acme"]
    text = stats_table(adm.GetStatsResponse(tenants=[adm.TenantStats(tenant=n) for n in names]))
    assert len(text) < 2_000 and text.isprintable() is False  # newlines only
    assert all(line.isprintable() for line in text.splitlines())
    assert "t" * 64 + "... (1,000,000 characters)" in text
    assert "a\\x00b" in text and "\\u202eevil" in text
    assert any(line.startswith("acme ") for line in text.splitlines())


def test_keys_show_dates_never_secrets() -> None:
    info = adm.ApiKeyInfo(id="key_0123456789ab", tenant="acme", name="ci")
    info.created_at.FromSeconds(1_700_000_000)
    text = keys_table([info])
    assert "key_0123456789ab" in text and "2023-11-14 22:13:20Z" in text
    assert text.splitlines()[-1].split()[-2:] == ["-", "-"]  # never rotated, not revoked


def test_policy_says_whose_default_ttl_applies() -> None:
    own = adm.CachePolicy(tenant="acme", l1_enabled=False, effective_default_ttl_s=600)
    own.default_ttl_s = 600
    assert "600 s" in policy_table(own) and "off" in policy_table(own)
    default = adm.CachePolicy(tenant="acme", l1_enabled=True, effective_default_ttl_s=86400)
    assert "86400 s (semantic-cache's default)" in policy_table(default)


def test_no_admin_token_is_an_error_saying_where_to_put_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.delenv("CACHEMESH_ADMIN_TOKEN_FILE", raising=False)
    monkeypatch.delenv("CACHEMESH_ADMIN_TOKEN", raising=False)
    assert main(["admin", "stats"]) == 2
    assert "CACHEMESH_ADMIN_TOKEN_FILE" in capsys.readouterr().err
    missing = str(tmp_path / "none")
    assert main(["admin", "--admin-token-file", missing, "stats"]) == 2
    assert f"cannot read the admin token file {missing}" in capsys.readouterr().err


def test_json_keeps_zero_and_false_fields() -> None:
    """``--json`` printed ``{}`` for "dropped 0", and a policy with L1 off had no
    ``l1Enabled``: a script reading the field found nothing. A field with presence that is
    unset (a tenant without a default TTL of its own) stays out: unset is what it says."""
    assert json.loads(as_json(adm.InvalidateResponse(dropped=0))) == {
        "dropped": "0",
        "unknownTenant": False,
    }
    policy = json.loads(as_json(adm.CachePolicy(tenant="acme", effective_default_ttl_s=600)))
    assert policy == {
        "tenant": "acme",
        "l1Enabled": False,
        "effectiveDefaultTtlS": 600.0,
        "unknownTenant": False,
    }


def test_an_unknown_tenant_is_said_so_naming_the_known_one() -> None:
    """``admin invalidate Tenant-A --all`` printed "dropped 0 L1 entries of tenant Tenant-A",
    as if a purge had been done, and a policy set for an unknown tenant printed as done."""
    unknown = adm.InvalidateResponse(dropped=0, unknown_tenant=True, known_as="tenant-a")
    text = invalidate_text("Tenant-A", unknown)
    assert "tenant Tenant-A is unknown" in text and "nothing dropped" in text
    assert "did you mean tenant-a" in text
    assert invalidate_text("acme", adm.InvalidateResponse(dropped=3)) == (
        "dropped 3 L1 entries of tenant acme"
    )
    policy = adm.CachePolicy(tenant="globex", unknown_tenant=True, effective_default_ttl_s=60)
    assert "tenant globex was unknown" in policy_table(policy)
    assert "unknown" not in policy_table(adm.CachePolicy(tenant="acme"))


def _limits(tenant: str, own: bool) -> adm.TenantLimits:
    return adm.TenantLimits(
        tenant=tenant,
        requests_per_min=adm.Limit(value=10, own=own),
        tokens_per_min=adm.Limit(own=own),  # unlimited
        day_budget_nanos=adm.Limit(value=5_000_000_000),
        month_budget_nanos=adm.Limit(value=150_000, own=own),
    )


def test_limits_say_each_value_in_its_unit_and_whose_it_is() -> None:
    lines = limits_table(_limits("free", True)).splitlines()
    assert lines[0] == "tenant free"
    rows = {re.split(r"\s{2,}", line)[0]: line for line in lines[3:]}
    assert re.split(r"\s{2,}", rows["request rate"])[1:] == ["10 requests/min", "its own"]
    assert "unlimited" in rows["token rate"] and "its own" in rows["token rate"]
    assert "$5.00 a day" in rows["daily budget"] and "the router's setting" in rows["daily budget"]
    assert "$0.00015 a month" in rows["monthly budget"]
    unknown = _limits("globex", True)
    unknown.unknown_tenant = True
    unknown.known_as = "Globex"
    text = limits_table(unknown)
    assert "tenant globex was unknown" in text and "did you mean Globex?" in text


def test_the_list_marks_each_tenants_own_limits() -> None:
    reply = adm.ListLimitsResponse(tenants=[_limits("free", True)], defaults=_limits("", False))
    text = limits_list(reply)
    every, free = (re.split(r"\s{2,}", line.strip()) for line in text.splitlines()[2:4])
    assert every[0] == "(every other)" and "*" not in "".join(every)
    assert free[0] == "free" and "10 requests/min*" in free and "$5.00 a day" in free
    assert "* the tenant's own" in text


def test_limit_values_from_the_command_line() -> None:
    assert rate_change("600") == 600 and rate_change("unlimited") == "unlimited"
    assert rate_change("default") == "default"
    assert budget_change("5") == 5_000_000_000 and budget_change("0.25") == 250_000_000
    assert budget_change("0.000000001") == 1 and budget_change("0") == 0
    for wrong in ("-1", "1.5", "ten", "", "10" * 20):
        with pytest.raises(argparse.ArgumentTypeError, match="a whole number a minute"):
            rate_change(wrong)
    for wrong in ("0.0000000001", "five", "nan", "inf", "1e30"):
        with pytest.raises(argparse.ArgumentTypeError, match="at most 9 decimal places"):
            budget_change(wrong)
    assert budget_change(".5") == 500_000_000 and budget_change("1000.") == 10**12


# '1e3' was read as $1,000 (1,000,000,000,000 nano-dollars), '1_000' as $1,000 and the
# Arabic-Indic digit five as $5: a budget is written in plain digits, anything else is refused
@pytest.mark.parametrize("wrong", ["1e3", "1E-3", "1e-9", "1_000", "\u0665", " 5", "++5", "1,000"])
def test_a_budget_in_exponent_or_other_notation_is_refused(wrong: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="not 1e3 or 1_000"):
        budget_change(wrong)
    assert budget_change("-1") == -1_000_000_000  # the router refuses it, naming the range
    assert budget_change("+25") == 25_000_000_000  # a sign is plain notation, as the router's


def test_a_rotation_as_seen_from_the_command_line() -> None:
    """``keys rotate --if-rotated-at``: the rotatedAt ``--json`` printed, to the nanosecond,
    or 'never'; anything else refused saying what to give."""
    key = adm.ApiKeyInfo(id="key_1")
    key.rotated_at.FromNanoseconds(1_780_000_000_123_456_789)
    printed = json.loads(as_json(key))["rotatedAt"]
    seen = seen_rotation(printed)
    assert seen.rotated_at.ToNanoseconds() == 1_780_000_000_123_456_789
    assert not seen_rotation("never").HasField("rotated_at")
    for wrong in ("yesterday", "", "2026-01-02 03:04:05"):
        with pytest.raises(argparse.ArgumentTypeError, match="rotatedAt as"):
            seen_rotation(wrong)
