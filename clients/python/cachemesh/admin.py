"""``AdminClient``: the router's ``cachemesh.v1.Admin`` API, typed.

>>> from cachemesh.admin import AdminClient
>>> with AdminClient("127.0.0.1:50051", admin_token=open(".run/admin-token").read().strip()) as a:
...     issued = a.create_key("acme", name="ci")   # issued.api_key: shown this once
...     a.revoke_key(issued.key.id)

A refusal raises ``CachemeshError`` (``AuthenticationError`` for a wrong admin token,
``InvalidRequestError`` naming the field, ...), as the Gateway's client does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Literal, TypeVar

import grpc

from cachemesh._argv import file_named
from cachemesh._auth import bearer_metadata
from cachemesh._channel import default_deadline_s
from cachemesh._errors import CachemeshError, from_rpc_error
from cachemesh._tls import Tls, refuse_plaintext, sync_channel
from cachemesh.v1 import admin_pb2 as adm
from cachemesh.v1 import admin_pb2_grpc

T = TypeVar("T")
# One limit's change in ``set_limits``: the tenant's own value (requests or tokens a minute;
# a budget in nano-dollars), "unlimited", or "default" (back to the router's setting)
LimitChange = int | Literal["unlimited", "default"]
# page_size 0 (the router's default) is sent as this, the router's most: a request with neither
# page_size nor page_token is a client's from before pages, which the router answers whole or
# refuses FAILED_PRECONDITION when the rows do not fit one reply
PAGE_SIZE = 1000
P = TypeVar("P", adm.GetStatsResponse, adm.ListKeysResponse, adm.ListLimitsResponse)  # a page
Q = TypeVar("Q", adm.GetStatsRequest, adm.ListKeysRequest, adm.ListLimitsRequest)  # its request


def rotate_request(key_id: str, seen: adm.ApiKeyInfo | None = None) -> adm.RotateKeyRequest:
    """RotateKey's request for ``AdminClient.rotate_key``: with ``seen`` (the key as its
    caller saw it), conditional on its ``rotated_at`` (``if_rotated_at``, or
    ``if_never_rotated`` when it has none)."""
    request = adm.RotateKeyRequest(id=key_id)
    _if_unchanged(request, seen)
    return request


def revoke_request(key_id: str, seen: adm.ApiKeyInfo | None = None) -> adm.RevokeKeyRequest:
    """RevokeKey's request for ``AdminClient.revoke_key``, conditional as ``rotate_request``'s."""
    request = adm.RevokeKeyRequest(id=key_id)
    _if_unchanged(request, seen)
    return request


def _if_unchanged(
    request: adm.RotateKeyRequest | adm.RevokeKeyRequest, seen: adm.ApiKeyInfo | None
) -> None:
    if seen is not None:
        if seen.HasField("rotated_at"):
            request.if_rotated_at.CopyFrom(seen.rotated_at)
        else:
            request.if_never_rotated = True


def read_admin_token(
    path: str | None,
    environ: Mapping[str, str] = os.environ,
    setting: str = "CACHEMESH_ADMIN_TOKEN_FILE",
) -> str | None:
    """The admin token: the file ``path`` names (``CACHEMESH_ADMIN_TOKEN_FILE``), else
    ``CACHEMESH_ADMIN_TOKEN``; None when neither gives one. A file that cannot be read is a
    ValueError naming ``setting`` and the path, unless ``path`` does not look like one (the
    token itself given in place of its file: never echoed)."""
    if path:
        try:
            return Path(path).read_text().strip() or None
        except OSError as exc:
            named = file_named(path, setting)
            raise ValueError(f"cannot read the admin token file {named} ({exc.strerror})") from None
    return environ.get("CACHEMESH_ADMIN_TOKEN", "").strip() or None


class AdminClient:
    def __init__(
        self,
        target: str,
        *,
        admin_token: str,
        tls: Tls | None = None,
        timeout_s: float | None = 30.0,
        insecure: bool = False,
    ) -> None:
        """``target`` not loopback without ``tls``: a ValueError unless ``insecure`` (the
        admin token would cross the network in cleartext with every call)."""
        if isinstance(admin_token, str) and not admin_token.strip():  # else bearer_metadata's
            raise ValueError("an admin token is required (the router's CACHEMESH_ADMIN_TOKEN_FILE)")
        self._metadata = bearer_metadata(admin_token, "admin_token")  # before the channel
        self._timeout_s = default_deadline_s(timeout_s)
        refuse_plaintext(target, tls, insecure, "admin token")
        self._channel = sync_channel(target, tls)
        self._stub = admin_pb2_grpc.AdminStub(self._channel)

    def stats(self, tenant: str = "", *, page_size: int = 0) -> adm.GetStatsResponse:
        """Every tenant's figures (or ``tenant``'s), every page of them in one reply (each
        page a call of ``page_size`` rows, 0: 1,000, the most). A row whose service did
        not answer names it in its ``unavailable``: those figures are unknown, not zero."""
        whole = adm.GetStatsResponse()
        for page in self._pages(
            self._stub.GetStats,
            adm.GetStatsRequest(tenant=tenant, page_size=page_size or PAGE_SIZE),
        ):
            whole.tenants.extend(page.tenants)
            whole.unavailable.extend(s for s in page.unavailable if s not in whole.unavailable)
        return whole

    def invalidate(
        self,
        tenant: str,
        *,
        entry_id: str | None = None,
        namespace: str | None = None,
        everything: bool = False,
    ) -> int:
        """Drops one entry, one namespace (``""`` = the default one) or, with ``everything``,
        every L1 entry of ``tenant``; returns how many. Exactly one target. (0 for a tenant
        the router does not know, too: ``invalidate_reply`` tells.)"""
        return self.invalidate_reply(
            tenant, entry_id=entry_id, namespace=namespace, everything=everything
        ).dropped

    def invalidate_reply(
        self,
        tenant: str,
        *,
        entry_id: str | None = None,
        namespace: str | None = None,
        everything: bool = False,
    ) -> adm.InvalidateResponse:
        """``invalidate``'s whole reply: how many were dropped, and whether the tenant is
        unknown (no API key, L1 entry or policy; ``known_as``: a tenant differing in case)."""
        if sum((entry_id is not None, namespace is not None, everything)) != 1:
            raise ValueError("name exactly one of entry_id, namespace, everything")
        request = adm.InvalidateRequest(tenant=tenant)
        if entry_id is not None:
            request.entry_id = entry_id
        elif namespace is not None:
            request.namespace = namespace
        else:
            request.all = True
        reply: adm.InvalidateResponse = self._call(self._stub.Invalidate, request)
        return reply

    def create_key(self, tenant: str, name: str = "") -> adm.IssuedKey:
        return self._call(self._stub.CreateKey, adm.CreateKeyRequest(tenant=tenant, name=name))

    def list_keys(
        self, tenant: str = "", *, include_revoked: bool = False, page_size: int = 0
    ) -> list[adm.ApiKeyInfo]:
        """Every key (of ``tenant``), every page of them (a call of ``page_size`` keys each,
        0: 1,000, the most)."""
        request = adm.ListKeysRequest(
            tenant=tenant, include_revoked=include_revoked, page_size=page_size or PAGE_SIZE
        )
        return [key for page in self._pages(self._stub.ListKeys, request) for key in page.keys]

    def revoke_key(self, key_id: str, *, seen: adm.ApiKeyInfo | None = None) -> adm.ApiKeyInfo:
        """The key refused from now on. ``seen``: the key as this caller saw it (ListKeys,
        CreateKey, its last RotateKey): revoked only if no rotation came since (its new secret
        may be in use), else ``CachemeshError`` (code FAILED_PRECONDITION) naming it, nothing
        changed; None: whatever came. A key revoked already: as it is, either way."""
        return self._call(self._stub.RevokeKey, revoke_request(key_id, seen))

    def rotate_key(self, key_id: str, *, seen: adm.ApiKeyInfo | None = None) -> adm.IssuedKey:
        """A new secret for the key. ``seen``: the key as this caller saw it (ListKeys,
        CreateKey, its last RotateKey): rotated only if no other rotation came since, else
        ``CachemeshError`` (code FAILED_PRECONDITION) naming it, nothing changed; None:
        whatever came."""
        return self._call(self._stub.RotateKey, rotate_request(key_id, seen))

    def policy(self, tenant: str) -> adm.CachePolicy:
        return self._call(self._stub.GetPolicy, adm.GetPolicyRequest(tenant=tenant))

    def set_policy(
        self,
        tenant: str,
        *,
        l1_enabled: bool | None = None,
        default_ttl_s: float | None = None,
        reset_default_ttl: bool = False,
        new_tenant: bool = False,
    ) -> adm.CachePolicy:
        """``new_tenant``: ``tenant`` may be unknown to the router (no API key, L1 entry or
        policy yet: a policy set before its first key); without it such a tenant is refused
        (``FAILED_PRECONDITION``), so that a misspelt name changes nothing."""
        request = adm.SetPolicyRequest(
            tenant=tenant, reset_default_ttl=reset_default_ttl, new_tenant=new_tenant
        )
        if l1_enabled is not None:
            request.l1_enabled = l1_enabled
        if default_ttl_s is not None:
            request.default_ttl_s = default_ttl_s
        return self._call(self._stub.SetPolicy, request)

    def limits(self, tenant: str) -> adm.TenantLimits:
        """The limits ``tenant`` is held to: each its own, or the router's setting."""
        return self._call(self._stub.GetLimits, adm.GetLimitsRequest(tenant=tenant))

    def list_limits(self, *, page_size: int = 0) -> adm.ListLimitsResponse:
        """Every tenant with a limit of its own, and the router's settings: every page of
        them in one reply (each page a call of ``page_size`` tenants, 0: 1,000, the
        most)."""
        whole = adm.ListLimitsResponse()
        request = adm.ListLimitsRequest(page_size=page_size or PAGE_SIZE)
        for page in self._pages(self._stub.ListLimits, request):
            whole.tenants.extend(page.tenants)
            whole.defaults.CopyFrom(page.defaults)
        return whole

    def set_limits(
        self,
        tenant: str,
        *,
        requests_per_min: LimitChange | None = None,
        tokens_per_min: LimitChange | None = None,
        day_budget_nanos: LimitChange | None = None,
        month_budget_nanos: LimitChange | None = None,
        new_tenant: bool = False,
    ) -> adm.TenantLimits:
        """Changes ``tenant``'s own limits (None: unchanged); in force on every router within
        a second. ``new_tenant``: as ``set_policy``'s."""
        request = adm.SetLimitsRequest(tenant=tenant, new_tenant=new_tenant)
        changes = {
            "requests_per_min": requests_per_min,
            "tokens_per_min": tokens_per_min,
            "day_budget_nanos": day_budget_nanos,
            "month_budget_nanos": month_budget_nanos,
        }
        for name, change in changes.items():
            field: adm.LimitChange = getattr(request, name)
            if change == "unlimited":
                field.unlimited = True
            elif change == "default":
                field.use_default = True
            elif change is not None:
                field.value = change
        return self._call(self._stub.SetLimits, request)

    def _pages(self, method: Callable[..., P], request: Q) -> Iterator[P]:
        """Each reply to ``request``, sent again with each reply's ``next_page_token`` until
        one has none (a router without pages: its one reply)."""
        while True:
            page = self._call(method, request)
            yield page
            if not page.next_page_token:
                return
            if page.next_page_token == request.page_token:  # a router that would loop forever
                raise CachemeshError(
                    grpc.StatusCode.INTERNAL,
                    "the router answered the same next_page_token again: a fault of the "
                    "router; report it",
                )
            request.page_token = page.next_page_token

    def _call(self, method: Callable[..., T], request: object) -> T:
        try:
            return method(request, timeout=self._timeout_s, metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
