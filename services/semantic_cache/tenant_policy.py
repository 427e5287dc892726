"""Each tenant's L1 policy, set through the router's Admin API: is L1 on, and the default TTL
of the tenant's new entries (in namespaces without a TTL of their own).

semantic-cache owns it, as it owns the entries: every router sees a change at its next call.
With a data directory the policies are one JSON file there (``tenant-policies.json``), written
atomically and fsynced before a change is acknowledged, read at start-up; without one they live
in the process, as the entries do.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from services.common.errors import shown
from services.common.files import fsync_directory, os_error_text
from services.common.private_files import open_private
from services.semantic_cache.policy import MIN_TTL_S, TTL_RANGE, valid_ttl

_NAMED = 20  # the most tenants a refusal names
log = logging.getLogger("cachemesh.semantic_cache.policies")
FILE_NAME = "tenant-policies.json"
_VERSION = 1


class PolicyError(ValueError):
    """A refused change (the message names the field) or an unreadable policy file."""


class PolicyNotDurable(RuntimeError):
    """The policy file could not be written (a full disk, an I/O error): the change is not
    applied. ``reason`` says it for the caller, without the path."""

    def __init__(self, path: Path, exc: OSError) -> None:
        super().__init__(f"{path}: cannot write the tenant policies ({exc})")
        self.reason = (
            "semantic-cache cannot write its tenant policies on the disk of "
            f"SEMANTIC_CACHE_DATA_DIR ({os_error_text(exc)}): the policy is not applied; "
            "retry once space is freed there"
        )


@dataclass(frozen=True)
class TenantPolicy:
    l1_enabled: bool = True
    default_ttl_s: float | None = None  # None: the service's SEMANTIC_CACHE_TTL_S


@dataclass(frozen=True)
class PolicyChange:
    l1_enabled: bool | None = None  # None: unchanged
    default_ttl_s: float | None = None  # None: unchanged
    reset_default_ttl: bool = False

    def apply(self, policy: TenantPolicy) -> TenantPolicy:
        if self.reset_default_ttl and self.default_ttl_s is not None:
            raise PolicyError("set default_ttl_s or reset_default_ttl, not both")
        ttl = self.default_ttl_s
        if ttl is not None and not valid_ttl(ttl):
            raise PolicyError(
                f"default_ttl_s must be a number of seconds {TTL_RANGE}, got {ttl} (to cache "
                "nothing for the tenant, turn its L1 off)"
            )
        if self.l1_enabled is not None:
            policy = replace(policy, l1_enabled=self.l1_enabled)
        if ttl is not None:
            policy = replace(policy, default_ttl_s=ttl)
        if self.reset_default_ttl:
            policy = replace(policy, default_ttl_s=None)
        return policy


class TenantPolicies:
    def __init__(self, path: Path | None = None) -> None:
        """``path``: the JSON file (read now when it exists); None = in memory only."""
        self._path = path
        self._by_tenant: dict[str, TenantPolicy] = _read(path) if path is not None else {}
        self._lock = asyncio.Lock()

    def get(self, tenant: str) -> TenantPolicy:
        return self._by_tenant.get(tenant, TenantPolicy())

    def tenants(self) -> set[str]:
        return set(self._by_tenant)

    async def set(self, tenant: str, change: PolicyChange) -> TenantPolicy:
        """Applies ``change``; durable (with a file) before it returns and takes effect
        (``PolicyNotDurable``, not applied, when the file cannot be written)."""
        async with self._lock:
            policy = change.apply(self.get(tenant))
            updated = {**self._by_tenant, tenant: policy}
            if policy == TenantPolicy():
                del updated[tenant]  # the defaults need no line
            if self._path is not None:
                try:
                    await asyncio.to_thread(_write, self._path, updated)
                except OSError as exc:
                    refused = PolicyNotDurable(self._path, exc)
                    log.error("%s: the change of tenant %s is not applied", refused, shown(tenant))
                    raise refused from exc
            self._by_tenant = updated
            return policy


def _read(path: Path) -> dict[str, TenantPolicy]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: nesting too deep
        raise PolicyError(f"cannot read the tenant policies {path}: {exc}") from None
    version = doc.get("version") if isinstance(doc, dict) else None
    if type(version) is int and version > _VERSION:  # a rollback's, or an edit, or damage
        raise PolicyError(
            f"{path}: version {version} is a newer build's, or edited or damaged (this one "
            f"reads {_VERSION}): start that build again, or, to run this one, replace the file "
            f"(each tenant's policy is the default until set again). {_l1_off_said(doc)}"
        )
    if version != _VERSION:
        raise PolicyError(f"{path}: expected {{'version': {_VERSION}, 'tenants': {{...}}}}")
    tenants = doc.get("tenants", {})
    if not isinstance(tenants, dict):
        raise PolicyError(f"{path}: 'tenants' must be an object of tenant -> policy")
    policies: dict[str, TenantPolicy] = {}
    for tenant, value in tenants.items():
        ttl = value.get("default_ttl_s") if isinstance(value, dict) else None
        enabled = value.get("l1_enabled", True) if isinstance(value, dict) else None
        valid_ttl = ttl is None or (isinstance(ttl, int | float) and not isinstance(ttl, bool))
        if not isinstance(enabled, bool) or not valid_ttl:
            raise PolicyError(f"{path}: tenant {shown(tenant)}: l1_enabled (bool), default_ttl_s")
        if ttl is not None and 0 < ttl < MIN_TTL_S:  # an older version's: it took any TTL > 0
            log.warning(
                "%s: tenant %s: default_ttl_s %g s is below the %g s now the least; %g s is "
                "used (Admin SetPolicy sets another)",
                path,
                shown(tenant),
                ttl,
                MIN_TTL_S,
                MIN_TTL_S,
            )
            ttl = MIN_TTL_S
        policies[tenant] = PolicyChange(enabled, None if ttl is None else float(ttl)).apply(
            TenantPolicy()
        )
    return policies


def _l1_off_said(doc: dict[str, Any]) -> str:
    """What a refused (newer) file says of the tenants with L1 off, as this build writes it
    (``"l1_enabled": false``): moved aside, their L1 is on again and the entries they kept are
    served again, so they must be set off before this build takes traffic. Nothing else in
    the file is trusted, and a newer build may record L1 off otherwise: the operator is told
    to check. At most ``_NAMED`` tenants are named (the line stays bounded)."""
    tenants = doc.get("tenants")
    check = (
        "A tenant with L1 off in it is on again once the file is moved aside, and the entries "
        "it kept are served again; a newer build may record L1 off otherwise than "
        '"l1_enabled": false, so check the file, and before this build takes traffic put in '
        'its place a file that keeps them off ({"version":1,"tenants":{"<tenant>":'
        '{"l1_enabled":false},...}})'
    )
    if not isinstance(tenants, dict):
        return f"Its 'tenants' is not the object this build knows. {check}"
    off = sorted(
        str(tenant)
        for tenant, value in tenants.items()
        if isinstance(value, dict) and value.get("l1_enabled") is False
    )
    named = ", ".join(shown(t) for t in off[:_NAMED])
    more = f" and {len(off) - _NAMED} more" if len(off) > _NAMED else ""
    found = f'{len(off)} tenant(s) have "l1_enabled": false in it: {named}{more}. ' if off else ""
    return found + check


def _write(path: Path, policies: dict[str, TenantPolicy]) -> None:
    doc = {
        "version": _VERSION,
        "tenants": {
            tenant: {"l1_enabled": p.l1_enabled, "default_ttl_s": p.default_ttl_s}
            for tenant, p in sorted(policies.items())
        },
    }
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # a crashed write's, whatever its mode
    fd = open_private(tmp, os.O_WRONLY | os.O_EXCL)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(doc, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk: no empty temp file left behind
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
