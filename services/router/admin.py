"""``cachemesh.v1.Admin`` on the router: keys, stats, invalidation and cache policy.

Every call is checked against the admin credential first (``admin_auth``). Keys are changed in
the shared key file (``KeyStore``: every router and HTTP front sees a change within a second);
L1 invalidation, stats and policy are semantic-cache's (its Drop, Stats: a page of tenants in
one call, GetPolicy and SetPolicy, with the internal credential); the billed totals are
prefix-cache's (TotalsBatch: a page of tenants in one call; Totals of each from a prefix-cache
without it). Each change is logged by key id and tenant, never with a key or a token.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from cachemesh.v1 import admin_pb2 as adm
from cachemesh.v1 import admin_pb2_grpc, prefix_cache_pb2_grpc, semantic_cache_pb2_grpc
from cachemesh.v1 import prefix_cache_pb2 as pc
from cachemesh.v1 import semantic_cache_pb2 as sc
from services.common.auth import AmbiguousCredential, bearer_token
from services.common.errors import shown
from services.common.key_store import (
    KeyChanged,
    KeyRevoked,
    KeyStore,
    KeyStoreError,
    Seen,
    UnknownKey,
    check_tenant,
)
from services.common.keyfile import KeyFileError, same_but_case, tenant_error
from services.common.status import abort
from services.router.admin_auth import FILE_VAR, TOKEN_VAR, AdminCredential, AuthFailures
from services.router.admin_messages import (
    key_info,
    limits_message,
    policy_message,
    tenant_row,
    unknown_tenant,
)
from services.router.admin_pages import (
    WHOLE_REPLY_BYTES,
    PageError,
    cursor,
    key_cursor,
    key_order,
    keys_page,
    limits_cursor,
    limits_page,
    page_size,
    stats_page,
    tenant_cursor,
    token,
    whole_reply,
    whole_requested,
)
from services.router.tenant_limits import (
    DEFAULT,
    LIMITS,
    UNLIMITED,
    Change,
    LimitsFileError,
    LimitValueError,
    PerTenantPolicies,
    TenantOverride,
)
from services.router.validation import MAX_ID_CHARS

log = logging.getLogger("cachemesh.admin")
Context = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")
C = TypeVar("C")

_OFF = (
    f"the Admin API is off on this router: start it with {FILE_VAR} (a file holding a token "
    f"of at least 16 characters) or {TOKEN_VAR}"
)
# semantic-cache refusing these is about the router's internal credential, not the caller's
_OURS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
_ENTRY_ID = re.compile(r"[0-9a-f]{32}\Z")  # uuid4().hex, as semantic-cache makes them
_TOTALS_IN_FLIGHT = 16  # a prefix-cache without TotalsBatch: Totals calls at once, at most
TOTALS_BATCH = 1000  # tenants a TotalsBatch call asks for: prefix-cache's TOTALS_BATCH_MAX
_UNAUTHENTICATED = (
    "missing or wrong admin credential: send 'authorization: Bearer <admin token>' metadata "
    f"with the router's admin token ({FILE_VAR}); API keys are not accepted here"
)


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(
        self,
        credential: AdminCredential | None,
        keys: KeyStore,
        semantic: semantic_cache_pb2_grpc.SemanticCacheAsyncStub,
        prefix: prefix_cache_pb2_grpc.PrefixCacheAsyncStub,
        internal: tuple[tuple[str, str], ...],
        timeout_s: float,
        *,
        auth_failures: AuthFailures,
        limits: PerTenantPolicies | None = None,
    ) -> None:
        """``internal``: the internal credential's metadata, for ``semantic`` and ``prefix``;
        ``auth_failures``: where calls refused for their credential are counted and logged;
        ``limits``: each tenant's limits at the Gateway (None: GetLimits and SetLimits are
        refused)."""
        self._auth_failures = auth_failures
        self._limits = limits
        self._credential = credential
        self._keys = keys
        self._semantic = semantic
        self._prefix = prefix
        self._internal = internal
        self._timeout_s = timeout_s

    # --- stats ------------------------------------------------------------------------------
    async def GetStats(
        self, request: adm.GetStatsRequest, context: Context
    ) -> adm.GetStatsResponse:
        await self._authorize(context, "GetStats")
        if request.tenant:
            await _valid_tenant(context, request.tenant)
        filters = {"tenant": request.tenant}
        size, after = await _paging(context, "stats", filters, request, tenant_cursor)
        response = adm.GetStatsResponse()
        l1: dict[str, sc.L1TenantStats] = {}
        l1_through: str | None = None
        l1_answered = True
        try:
            # only this page's tenants of L1's: every tenant's rows in one reply, asked for
            # each page, passed gRPC's 4 MiB limit at ~57,000 tenants (every row then said
            # semantic-cache unavailable)
            stats = await self._semantic.Stats(
                sc.L1StatsRequest(tenant=request.tenant, page_size=size, after=after or ""),
                **self._options(),
            )
            l1 = {row.tenant: row for row in stats.tenants}
            if stats.paged and stats.more and stats.tenants:
                l1_through = stats.tenants[-1].tenant
        except grpc.aio.AioRpcError:
            l1_answered = False
            response.unavailable.append("semantic-cache")
        # the tenants and their keys, grouped in one pass (a scan of every key for each
        # tenant was 3.4 s on the event loop at 10,000 of each), off the event loop
        page = await asyncio.to_thread(
            stats_page, self._keys.records(), l1, request.tenant, after, size, l1_through
        )
        billed = await self._billed(page.tenants)
        # a tenant whose totals did not come is said to be unknown, never shown as zero: 5,309
        # of 10,000 tenants were shown $0 when the totals of all within one deadline ran out
        for tenant in page.tenants:
            row = tenant_row(tenant, page.keys.get(tenant, ()), l1.get(tenant), billed.get(tenant))
            if not l1_answered:
                row.unavailable.append("semantic-cache")
            if tenant not in billed and not tenant_error(tenant):
                row.unavailable.append("prefix-cache")
            response.tenants.append(row)
        if any("prefix-cache" in row.unavailable for row in response.tenants):
            response.unavailable.append("prefix-cache")
        if page.more and page.tenants:
            response.next_page_token = token("stats", filters, [page.tenants[-1]])
        return response

    async def _billed(self, tenants: Sequence[str]) -> dict[str, pc.TotalsResponse]:
        """prefix-cache's totals of ``tenants``, by tenant, within one timeout: those it did
        not answer in time are absent. A name prefix-cache refuses (L1's entries kept by an
        older version under it: nothing could be billed under it) is not asked."""
        asked = [t for t in tenants if not tenant_error(t)]
        found: dict[str, pc.TotalsResponse] = {}
        if not asked:
            return found
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        try:
            for start in range(0, len(asked), TOTALS_BATCH):
                left_s = deadline - loop.time()
                if left_s <= 0:
                    raise TimeoutError
                reply: pc.TotalsBatchResponse = await self._prefix.TotalsBatch(
                    pc.TotalsBatchRequest(tenants=asked[start : start + TOTALS_BATCH]),
                    timeout=left_s,
                    metadata=self._internal,
                )
                found.update((row.tenant, row.totals) for row in reply.tenants)
        except TimeoutError:
            failure = grpc.StatusCode.DEADLINE_EXCEEDED.name
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                # a prefix-cache older than TotalsBatch (a rolling upgrade): a call a tenant
                return await self._billed_one_by_one(asked, deadline)
            failure = exc.code().name
        else:
            return found
        log.warning(
            "admin: prefix-cache did not give the totals of %d of %d tenants (%s): their rows "
            "say so (unknown, not zero)",
            len(asked) - len(found),
            len(asked),
            failure,
        )
        return found

    async def _billed_one_by_one(
        self, tenants: Sequence[str], deadline: float
    ) -> dict[str, pc.TotalsResponse]:
        """``Totals`` of each tenant, at most _TOTALS_IN_FLIGHT at a time (every tenant's at
        once, thousands, was a burst on the prefix-cache serving live traffic), all by
        ``deadline``: a prefix-cache that does not answer costs one timeout, not one a batch."""
        in_flight = asyncio.Semaphore(_TOTALS_IN_FLIGHT)
        loop = asyncio.get_running_loop()

        async def totals_of(tenant: str) -> pc.TotalsResponse:
            async with in_flight:
                left_s = deadline - loop.time()
                if left_s <= 0:
                    raise TimeoutError
                reply: pc.TotalsResponse = await self._prefix.Totals(
                    pc.TotalsRequest(tenant=tenant), timeout=left_s, metadata=self._internal
                )
                return reply

        totals = await asyncio.gather(*map(totals_of, tenants), return_exceptions=True)
        return {
            tenant: total
            for tenant, total in zip(tenants, totals, strict=True)
            if isinstance(total, pc.TotalsResponse)
        }

    # --- invalidation -----------------------------------------------------------------------
    async def Invalidate(
        self, request: adm.InvalidateRequest, context: Context
    ) -> adm.InvalidateResponse:
        await self._authorize(context, "Invalidate")
        await _valid_tenant(context, request.tenant)
        target = request.WhichOneof("target")
        # a value that names nothing is refused, not answered "dropped 0" (as if it had been
        # removed) after a record of it went into L1's journal
        if target == "namespace" and len(request.namespace) > MAX_ID_CHARS:
            await abort(  # a request's cache.namespace: the Gateway checks its length alone
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"namespace: at most {MAX_ID_CHARS} characters (the Gateway's limit), got "
                f"{len(request.namespace):,}",
            )
        if target == "entry_id" and request.entry_id and not _ENTRY_ID.match(request.entry_id):
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "entry_id: must be 32 lowercase hex digits, an L1 entry's id as a response's "
                f"semantic.entry_id gives it, got {shown(request.entry_id)}",
            )
        drop = sc.DropRequest(tenant=request.tenant)
        if target == "entry_id" and request.entry_id:
            drop.entry_id = request.entry_id
        elif target == "namespace":
            drop.namespace = request.namespace
        elif target == "all" and request.all:
            pass  # no namespace: every one of the tenant's
        else:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                'say what to invalidate: entry_id, namespace ("" = the default namespace) '
                "or all=true (every L1 entry of the tenant)",
            )
        known, known_as = await self._known(context, request.tenant)
        dropped = await self._l1(context, self._semantic.Drop(drop, **self._options()))
        log.info(
            "admin: invalidated %d L1 entries of tenant %s (%s)%s",
            dropped.dropped,
            request.tenant,
            target,
            "" if known else " (an unknown tenant)",
        )
        reply = adm.InvalidateResponse(dropped=dropped.dropped, unknown_tenant=not known)
        if known_as is not None:
            reply.known_as = known_as
        return reply

    # --- keys -------------------------------------------------------------------------------
    async def CreateKey(self, request: adm.CreateKeyRequest, context: Context) -> adm.IssuedKey:
        await self._authorize(context, "CreateKey")
        await _valid_tenant(context, request.tenant)  # an empty one too: a tenant, not an id
        record, key = await self._changed(context, self._keys.create, request.tenant, request.name)
        log.info("admin: key %s created for tenant %s", record.id, record.tenant)
        return adm.IssuedKey(key=key_info(record), api_key=key)

    async def ListKeys(
        self, request: adm.ListKeysRequest, context: Context
    ) -> adm.ListKeysResponse:
        await self._authorize(context, "ListKeys")
        if whole_requested(request.page_size, request.page_token):
            every, count = await asyncio.to_thread(
                self._every_key, request.tenant, request.include_revoked
            )
            if every is None:
                await _not_one_reply(context, f"the {count:,} keys")
            return adm.ListKeysResponse(keys=every)
        filters = {"tenant": request.tenant, "include_revoked": request.include_revoked}
        size, after = await _paging(context, "keys", filters, request, key_cursor)
        chosen, more = await asyncio.to_thread(
            keys_page, self._keys.records(), request.tenant, request.include_revoked, after, size
        )
        reply = adm.ListKeysResponse(keys=[key_info(r) for r in chosen])
        if more:
            reply.next_page_token = token("keys", filters, key_order(chosen[-1]))
        return reply

    def _every_key(
        self, tenant: str, include_revoked: bool
    ) -> tuple[list[adm.ApiKeyInfo] | None, int]:
        """Every key asked for, in ListKeys's order (None: more than one reply holds), and
        how many there are."""
        records = self._keys.records()
        chosen, _ = keys_page(records, tenant, include_revoked, None, len(records))
        return whole_reply(map(key_info, chosen), _message_bytes), len(chosen)

    async def RevokeKey(self, request: adm.RevokeKeyRequest, context: Context) -> adm.ApiKeyInfo:
        await self._authorize(context, "RevokeKey")
        seen = await _seen(context, request, "revoke")
        record = await self._changed(context, self._keys.revoke, request.id, seen)
        log.info("admin: key %s of tenant %s revoked", record.id, record.tenant)
        return key_info(record)

    async def RotateKey(self, request: adm.RotateKeyRequest, context: Context) -> adm.IssuedKey:
        await self._authorize(context, "RotateKey")
        seen = await _seen(context, request, "rotate")
        record, key = await self._changed(context, self._keys.rotate, request.id, seen)
        log.info("admin: key %s of tenant %s rotated", record.id, record.tenant)
        return adm.IssuedKey(key=key_info(record), api_key=key)

    # --- policy -----------------------------------------------------------------------------
    async def GetPolicy(self, request: adm.GetPolicyRequest, context: Context) -> adm.CachePolicy:
        await self._authorize(context, "GetPolicy")
        await _valid_tenant(context, request.tenant)
        known, known_as = await self._known(context, request.tenant)
        policy = await self._l1(
            context,
            self._semantic.GetPolicy(sc.L1PolicyRequest(tenant=request.tenant), **self._options()),
        )
        return policy_message(policy, known, known_as)

    async def SetPolicy(self, request: adm.SetPolicyRequest, context: Context) -> adm.CachePolicy:
        await self._authorize(context, "SetPolicy")
        await _valid_tenant(context, request.tenant)
        change = sc.SetL1PolicyRequest(
            tenant=request.tenant, reset_default_ttl=request.reset_default_ttl
        )
        if request.HasField("l1_enabled"):
            change.l1_enabled = request.l1_enabled
        if request.HasField("default_ttl_s"):
            change.default_ttl_s = request.default_ttl_s
        known, known_as = await self._known(context, request.tenant)
        if not known and not request.new_tenant:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{unknown_tenant(request.tenant, known_as)}; nothing changed: to set the "
                "policy of a tenant before its first key, send new_tenant=true "
                "(cachemesh admin policy set --new-tenant)",
            )
        policy = await self._l1(context, self._semantic.SetPolicy(change, **self._options()))
        log.info(
            "admin: cache policy of tenant %s: L1 %s, default TTL %s%s",
            request.tenant,
            "on" if policy.l1_enabled else "off",
            f"{policy.default_ttl_s:g} s" if policy.HasField("default_ttl_s") else "the default",
            "" if known else " (a new tenant: no key, L1 entry or policy before)",
        )
        return policy_message(policy, known, known_as)

    # --- limits -----------------------------------------------------------------------------
    async def GetLimits(self, request: adm.GetLimitsRequest, context: Context) -> adm.TenantLimits:
        await self._authorize(context, "GetLimits")
        await _valid_tenant(context, request.tenant)
        limits = await self._tenant_limits(context)
        known, known_as = self._known_to_limits(request.tenant, limits)
        own = limits.store.override(request.tenant)
        return limits_message(request.tenant, limits.defaults, own, known, known_as)

    async def ListLimits(
        self, request: adm.ListLimitsRequest, context: Context
    ) -> adm.ListLimitsResponse:
        await self._authorize(context, "ListLimits")
        limits = await self._tenant_limits(context)
        defaults = limits_message("", limits.defaults, None)
        if whole_requested(request.page_size, request.page_token):

            def every_tenant() -> tuple[list[adm.TenantLimits] | None, int]:
                overrides = sorted(limits.store.overrides(), key=_tenant_of)
                rows = (limits_message(o.tenant, limits.defaults, o) for o in overrides)
                return whole_reply(rows, _message_bytes), len(overrides)

            every, count = await asyncio.to_thread(every_tenant)  # sorted off the event loop
            if every is None:
                await _not_one_reply(context, f"the {count:,} tenants with limits of their own")
            return adm.ListLimitsResponse(tenants=every, defaults=defaults)
        size, after = await _paging(context, "limits", {}, request, limits_cursor)
        chosen, more = await asyncio.to_thread(  # the table sorted off the event loop
            lambda: limits_page(limits.store.overrides(), _tenant_of, after, size)
        )
        reply = adm.ListLimitsResponse(
            tenants=[limits_message(own.tenant, limits.defaults, own) for own in chosen],
            defaults=defaults,
        )
        if more:
            reply.next_page_token = token("limits", {}, [chosen[-1].tenant])
        return reply

    async def SetLimits(self, request: adm.SetLimitsRequest, context: Context) -> adm.TenantLimits:
        await self._authorize(context, "SetLimits")
        await _valid_tenant(context, request.tenant)
        limits = await self._tenant_limits(context)
        changes: dict[str, Change] = {}
        for name in LIMITS:
            change: adm.LimitChange = getattr(request, name)
            which = change.WhichOneof("change")
            if which == "value":
                changes[name] = change.value
            elif which == "unlimited" and change.unlimited:
                changes[name] = UNLIMITED
            elif which == "use_default" and change.use_default:
                changes[name] = DEFAULT
        if not changes:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"say what to change: one or more of {', '.join(LIMITS)}, each a value, "
                "unlimited=true or use_default=true (the router's setting)",
            )
        known, known_as = self._known_to_limits(request.tenant, limits)
        if not known and not request.new_tenant:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"tenant {request.tenant} is unknown (no API key, no limit of its own)"
                + (
                    f": tenant names are case-sensitive, did you mean '{known_as}'?"
                    if known_as is not None
                    else ""
                )
                + "; nothing changed: to set the limits of a tenant before its first key, "
                "send new_tenant=true (cachemesh admin limits set --new-tenant)",
            )
        try:
            own = await asyncio.to_thread(limits.store.change, request.tenant, changes)
        except LimitValueError as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (LimitsFileError, OSError) as exc:
            log.error("admin: the tenant limits file could not be changed: %s", exc)
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the tenant limits file could not be changed ({exc}); it must be writable by "
                "the router (ROUTER_TENANT_LIMITS_FILE, by default beside "
                "CACHEMESH_API_KEYS_FILE)",
            )
        log.info(
            "admin: limits of tenant %s: %s%s",
            request.tenant,
            ", ".join(f"{name} {value}" for name, value in changes.items()),
            "" if known else " (a new tenant: no key or limit before)",
        )
        return limits_message(request.tenant, limits.defaults, own, known, known_as)

    # --- inside -----------------------------------------------------------------------------
    async def _tenant_limits(self, context: Context) -> PerTenantPolicies:
        if self._limits is None:
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "this router serves no per-tenant limits",
            )
        assert self._limits is not None
        return self._limits

    def _known_to_limits(self, tenant: str, limits: PerTenantPolicies) -> tuple[bool, str | None]:
        """Whether ``tenant`` has an API key (active or revoked) or a limit of its own; when
        neither, a tenant that has one and differs from it only in case (or None)."""
        tenants = {record.tenant for record in self._keys.records()}
        tenants.update(own.tenant for own in limits.store.overrides())
        if tenant in tenants:
            return True, None
        return False, same_but_case(tenant, tenants)

    async def _authorize(self, context: Context, method: str) -> None:
        """Refuses a call without the admin token (``method``: its name, for the failure's
        line: counted and logged, never the token)."""
        if self._credential is None:
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, _OFF)
        assert self._credential is not None
        try:
            token = bearer_token(context.invocation_metadata())
        except AmbiguousCredential as exc:
            self._auth_failures.failed("ambiguous", method, context.peer())
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, f"{exc}; {_UNAUTHENTICATED}")
        if not self._credential.matches(token):
            self._auth_failures.failed(
                "missing" if token is None else "wrong", method, context.peer()
            )
            await abort(context, grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)

    async def _known(self, context: Context, tenant: str) -> tuple[bool, str | None]:
        """Whether ``tenant`` has an API key (active or revoked), or L1 entries, counts or a
        policy; when it has none, a known tenant whose name differs from it only in case (or
        None). Asks semantic-cache only for a tenant without a key (its refusal is this
        call's: the call it precedes would fail alike)."""
        tenants = {record.tenant for record in self._keys.records()}
        if tenant in tenants:
            return True, None
        # L1 is asked about this tenant alone: every tenant's rows passed gRPC's 4 MiB limit
        # at ~57,000 tenants, and the call failed RESOURCE_EXHAUSTED
        stats = await self._l1(
            context,
            self._semantic.Stats(sc.L1StatsRequest(tenant=tenant), **self._options()),
        )
        if stats.HasField("known"):
            if stats.known:
                return True, None
            twins = [same_but_case(tenant, tenants)]
            if stats.HasField("known_as"):
                twins.append(stats.known_as)
            return False, min((t for t in twins if t is not None), default=None)
        # an L1 older than `known`: every tenant's rows, as before
        stats = await self._l1(
            context, self._semantic.Stats(sc.L1StatsRequest(), **self._options())
        )
        tenants.update(row.tenant for row in stats.tenants)
        if tenant in tenants:
            return True, None
        return False, same_but_case(tenant, tenants)

    def _options(self) -> dict[str, Any]:
        return {"timeout": self._timeout_s, "metadata": self._internal}

    async def _l1(self, context: Context, call: Awaitable[T]) -> T:
        """semantic-cache's reply; its refusal is this call's, said as semantic-cache's."""
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            details = exc.details() or exc.code().name
            code = exc.code()
            if code in _OURS:  # the router's own credential refused, not the caller's token
                log.error("semantic-cache refused this router's internal credential: %s", details)
                await abort(
                    context,
                    grpc.StatusCode.INTERNAL,
                    "semantic-cache refused this router's internal credential "
                    "(CACHEMESH_INTERNAL_TOKEN differs between them?); the operator must fix it",
                )
            await abort(context, code, f"semantic-cache: {details}")
        raise AssertionError("unreachable: abort raises")

    async def _changed(self, context: Context, change: Any, *args: object) -> Any:
        """A key change, made off the event loop (it waits for the file's lock and fsyncs)."""
        if not args[0]:
            await abort(
                context, grpc.StatusCode.INVALID_ARGUMENT, "id is required: a key's id (ListKeys)"
            )
        try:
            return await asyncio.to_thread(change, *args)
        except UnknownKey as exc:
            await abort(context, grpc.StatusCode.NOT_FOUND, str(exc))
        except (KeyRevoked, KeyChanged) as exc:
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except KeyStoreError as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (KeyFileError, OSError) as exc:
            log.error("admin: the API key file could not be changed: %s", exc)
            await abort(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the API key file could not be changed ({exc}); it must be writable by the "
                "router (CACHEMESH_API_KEYS_FILE)",
            )


class _Paged(Protocol):
    page_size: int
    page_token: str


async def _paging(
    context: Context,
    kind: str,
    filters: dict[str, Any],
    request: _Paged,
    read: Callable[[list[Any] | None], C],
) -> tuple[int, C]:
    """The request's page size and the cursor its page starts after (refused, naming the
    field, when either is bad)."""
    try:
        return page_size(request.page_size), read(cursor(kind, filters, request.page_token))
    except PageError as exc:
        await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    raise AssertionError("unreachable: abort raises")


async def _not_one_reply(context: Context, rows: str) -> NoReturn:
    """Refuses a request without page_size or page_token (an older client's, which reads one
    reply) whose rows do not fit one: it would have shown the first page as the whole."""
    await abort(
        context,
        grpc.StatusCode.FAILED_PRECONDITION,
        f"{rows} do not fit one reply (over {WHOLE_REPLY_BYTES >> 20} MiB), and this request "
        "has no page_size: a client from before pages, which reads one reply only. Upgrade the "
        "cachemesh CLI / AdminClient (they page), or send page_size and follow next_page_token",
    )


def _message_bytes(message: Message) -> int:
    return message.ByteSize()


def _tenant_of(own: TenantOverride) -> str:
    return own.tenant


async def _seen(
    context: Context, request: adm.RotateKeyRequest | adm.RevokeKeyRequest, verb: str
) -> Seen | None:
    """The key as a conditional RotateKey's or RevokeKey's caller saw it (their
    ``if_unchanged``), None when unset (an older client: the change whatever happened)."""
    which = request.WhichOneof("if_unchanged")
    if which == "if_rotated_at":
        return Seen(await _stamp_nanos(context, request.if_rotated_at, "if_rotated_at"))
    if which == "if_never_rotated":
        if not request.if_never_rotated:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                "if_never_rotated must be true when sent (or send if_rotated_at, or "
                f"neither to {verb} whatever happened since)",
            )
        return Seen(None)
    return None


async def _stamp_nanos(context: Context, stamp: Timestamp, field: str) -> int:
    """A sent Timestamp in nanoseconds; one out of a Timestamp's range (protobuf's
    ``ToNanoseconds`` checks it, raising a bare ValueError: UNKNOWN) is INVALID_ARGUMENT
    naming ``field``."""
    try:
        return stamp.ToNanoseconds()
    except ValueError:
        await abort(
            context,
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{field} is not a valid timestamp (seconds {stamp.seconds}, nanos {stamp.nanos}: "
            "a time from 0001-01-01 to 9999-12-31 UTC, nanos 0 to 999999999); send the key's "
            "rotated_at exactly as ListKeys, CreateKey or RotateKey gave it",
        )


async def _valid_tenant(context: Context, tenant: str) -> None:
    try:
        check_tenant(tenant)
    except KeyStoreError as exc:
        await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
