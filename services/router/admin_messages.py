"""The Admin API's replies, made from the key records and the internal services' answers."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.timestamp_pb2 import Timestamp

from cachemesh.v1 import admin_pb2 as adm
from cachemesh.v1 import prefix_cache_pb2 as pc
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.key_store import stamp_nanos
from services.common.keyfile import KeyRecord
from services.router.limit_policy import LimitPolicy
from services.router.tenant_limits import LIMITS, TenantOverride


def _stamp(at: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(stamp_nanos(at))
    return stamp


def key_info(record: KeyRecord) -> adm.ApiKeyInfo:
    info = adm.ApiKeyInfo(id=record.id, tenant=record.tenant, name=record.name)
    if record.created_at is not None:
        info.created_at.CopyFrom(_stamp(record.created_at))
    if record.rotated_at is not None:
        info.rotated_at.CopyFrom(_stamp(record.rotated_at))
    if record.revoked_at is not None:
        info.revoked_at.CopyFrom(_stamp(record.revoked_at))
    return info


def tenant_row(
    tenant: str,
    records: Sequence[KeyRecord],
    l1: sc.L1TenantStats | None,
    totals: pc.TotalsResponse | None,
) -> adm.TenantStats:
    """One tenant's figures; ``l1`` or ``totals`` is None when its service did not answer
    (or, for ``l1``, holds nothing of the tenant: L1 is then on by default)."""
    row = adm.TenantStats(
        tenant=tenant,
        active_keys=sum(1 for r in records if r.active),
        revoked_keys=sum(1 for r in records if not r.active),
        l1_enabled=True if l1 is None else l1.l1_enabled,
    )
    if l1 is not None:
        row.l1_entries = l1.entries
        row.l1_namespaces = l1.namespaces
        row.l1_lookups = l1.lookups
        row.l1_hits = l1.hits
        row.l1_exact_hits = l1.exact_hits
        row.l1_hit_rate = l1.hits / l1.lookups if l1.lookups else 0.0
    if totals is not None:
        row.model_requests = totals.requests
        row.usage.CopyFrom(totals.usage)
        row.cost_nanos = totals.cost_nanos
        row.baseline_nanos = totals.baseline_nanos
        row.saved_nanos = totals.baseline_nanos - totals.cost_nanos
    return row


def policy_message(
    policy: sc.L1Policy, known: bool = True, known_as: str | None = None
) -> adm.CachePolicy:
    """``known`` False: the tenant had no key, L1 entry, count or policy (``known_as``: a known
    tenant whose name differs only in case)."""
    message = adm.CachePolicy(
        tenant=policy.tenant,
        l1_enabled=policy.l1_enabled,
        effective_default_ttl_s=policy.effective_default_ttl_s,
        unknown_tenant=not known,
    )
    if known_as is not None:
        message.known_as = known_as
    if policy.HasField("default_ttl_s"):
        message.default_ttl_s = policy.default_ttl_s
    return message


def unknown_tenant(tenant: str, known_as: str | None) -> str:
    """Says that ``tenant`` is unknown, naming ``known_as`` (a tenant differing in case)."""
    said = f"tenant {tenant} is unknown (no API key, no L1 entry, no cache policy of its own)"
    if known_as is not None:
        said += f": tenant names are case-sensitive, did you mean '{known_as}'?"
    return said


def limits_message(
    tenant: str,
    defaults: LimitPolicy,
    own: TenantOverride | None,
    known: bool = True,
    known_as: str | None = None,
) -> adm.TenantLimits:
    """The limits ``tenant`` is held to: each its own (``own``) where it has one, else the
    router's (``defaults``); ``known`` False: it had no key and no limit of its own."""
    applied = defaults if own is None else own.applied_to(defaults)
    message = adm.TenantLimits(tenant=tenant, unknown_tenant=not known)
    for name in LIMITS:
        limit: adm.Limit = getattr(message, name)
        limit.own = own is not None and own.setting(name) is not None
        value = getattr(applied, name)
        if value is not None:
            limit.value = value
    if own is not None and own.updated_at is not None:
        message.updated_at.CopyFrom(_stamp(own.updated_at))
    if known_as is not None:
        message.known_as = known_as
    return message
