"""The caches' names for a request log's tenants.

A log's ``tenant`` is any string that tells tenants apart (SCHEMA.md, "Request log"): a
customer's own id, ``acme corp``, an e-mail address. The caches the estimator calls in this
process keep data only under a name the key file could hold (``tenant_error``), as live, where
the Gateway takes the tenant from the caller's key. So each log tenant that rule refuses is
replayed under a stand-in, ``t-`` and the start of its name's sha256: the same for every line
of it, a different one for each tenant (longer when a shorter one is another tenant's name).
The estimate's samples keep the logged tenant; only the stack sees the stand-in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from services.common.errors import shown
from services.common.keyfile import tenant_error

_PREFIX = "t-"
_HEX_CHARS = (16, 32, 62)  # 62: the longest name the rule allows (64 characters)


def stand_ins(tenants: Iterable[str]) -> dict[str, str]:
    """Each of ``tenants`` the caches would refuse, mapped to its stand-in (in the order first
    seen); a tenant they accept is not in it and is replayed as logged."""
    seen = list(dict.fromkeys(tenants))
    taken = {t for t in seen if not tenant_error(t)}
    out: dict[str, str] = {}
    for tenant in seen:
        if tenant in taken:
            continue
        digest = hashlib.sha256(tenant.encode("utf-8", "surrogatepass")).hexdigest()
        for chars in _HEX_CHARS:
            name = _PREFIX + digest[:chars]
            if name not in taken:
                break
        else:  # a 62-character prefix of sha256 taken by another tenant: not in this world
            raise ValueError(f"no stand-in for tenant {shown(tenant)}: {name} is taken")
        taken.add(name)
        out[tenant] = name
    return out


def described(mapping: dict[str, str]) -> str:
    """The stand-ins, for the estimator's note: each logged tenant (escaped, cut) and its name."""
    return ", ".join(f"{shown(tenant)} as {name}" for tenant, name in mapping.items())
