"""``cachemesh admin ...``: the router's Admin API from a terminal, in readable tables.

The admin token comes from the file ``CACHEMESH_ADMIN_TOKEN_FILE`` names (``--admin-token-file``;
``source .run/demo-keys.env`` sets it for the local stack) or from ``CACHEMESH_ADMIN_TOKEN``;
never from the command line, where other users' ``ps`` would see it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from cachemesh._argv import subcommand_parsers
from cachemesh._errors import CachemeshError
from cachemesh._tls import Tls
from cachemesh.admin import AdminClient, LimitChange, read_admin_token
from cachemesh.dollars import NANOS_PER_DOLLAR, PLAIN_DOLLARS, plain_dollars, whole_nanos
from cachemesh.v1 import admin_pb2 as adm

MAX_INT64 = 2**63 - 1
# the words a limit's flag takes besides a value: none for this tenant, the router's setting
LIMIT_WORDS: dict[str, LimitChange] = {"unlimited": "unlimited", "default": "default"}


def _add_admin_arguments(parser: argparse.ArgumentParser, *, inherited: bool = False) -> None:
    """``admin``'s own options; ``inherited``: on one of its subcommands' parsers (``admin
    stats --json`` as ``admin --json stats``), with no default, so one not given there leaves
    what ``admin``'s parser took."""
    parser.add_argument(
        "--admin-token-file",
        default=argparse.SUPPRESS if inherited else os.environ.get("CACHEMESH_ADMIN_TOKEN_FILE"),
        help="a file holding the admin token (env CACHEMESH_ADMIN_TOKEN_FILE; or set "
        "CACHEMESH_ADMIN_TOKEN)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if inherited else False,
        help="print the reply as JSON",
    )


def add_parser(commands: Any) -> None:
    """Adds ``admin`` and its subcommands to the ``cachemesh`` parser's subcommands."""
    admin = commands.add_parser("admin", help="the Admin API: keys, stats, purges, policy")
    _add_admin_arguments(admin)
    what = admin.add_subparsers(dest="admin_command", required=True)

    stats = what.add_parser("stats", help="per-tenant keys, L1 hit rates, cost and saving")
    stats.add_argument("--tenant", default="", help="one tenant (default: every one)")

    keys = what.add_parser("keys", help="API keys: create, list, rotate, revoke")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="a new key (shown once)")
    create.add_argument("tenant")
    create.add_argument("--name", default="", help="a label for people, e.g. 'ci'")
    listing = key_commands.add_parser("list", help="the keys (never the secrets)")
    listing.add_argument("--tenant", default="")
    listing.add_argument("--all", action="store_true", help="revoked keys too")
    for verb, text in (
        ("rotate", "a new secret for the key (old refused)"),
        ("revoke", "refuse the key from now on"),
    ):
        command = key_commands.add_parser(verb, help=text)
        command.add_argument("key_id", help="the key's id (see keys list)")
        command.add_argument(
            "--if-rotated-at",
            type=seen_rotation,
            metavar="STAMP|never",
            help=f"{verb} only if the key is still as seen: its rotatedAt as `admin --json "
            "keys list` prints it (RFC 3339), or 'never' for a key never rotated; refused, "
            "nothing changed, when a rotation came since",
        )

    invalidate = what.add_parser("invalidate", help="drop L1 entries of one tenant")
    invalidate.add_argument("tenant")
    target = invalidate.add_mutually_exclusive_group(required=True)
    target.add_argument("--entry", help="one entry: a response's semantic.entry_id")
    target.add_argument("--namespace", help="one namespace ('' = the default one)")
    target.add_argument("--all", action="store_true", help="every L1 entry of the tenant")

    policy = what.add_parser("policy", help="a tenant's cache policy: L1 on/off, default TTL")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True)
    policy_commands.add_parser("get").add_argument("tenant")
    setting = policy_commands.add_parser("set")
    setting.add_argument("tenant")
    setting.add_argument("--l1", choices=("on", "off"), help="L1 serves and stores, or not")
    ttl = setting.add_mutually_exclusive_group()
    ttl.add_argument("--default-ttl", type=float, metavar="SECONDS", help="1 to 315360000")
    ttl.add_argument("--reset-default-ttl", action="store_true", help="back to the default")
    setting.add_argument(
        "--new-tenant",
        action="store_true",
        help="the tenant may have no key, L1 entry or policy yet (else refused: a misspelt "
        "name, tenant names being case-sensitive, would change nothing)",
    )

    limits = what.add_parser("limits", help="a tenant's rates and budgets at the Gateway")
    limit_commands = limits.add_subparsers(dest="limits_command", required=True)
    limit_commands.add_parser("get").add_argument("tenant")
    limit_commands.add_parser("list", help="every tenant with limits of its own")
    limit_set = limit_commands.add_parser(
        "set",
        help="a tenant's own limits; each a value, 'unlimited' or 'default' (the router's)",
    )
    limit_set.add_argument("tenant")
    for flag, kind, text in (
        ("--requests-per-min", rate_change, "requests a minute (at least 1)"),
        ("--tokens-per-min", rate_change, "tokens a minute (at least 1)"),
        ("--day-budget", budget_change, "US dollars a UTC day (0 refuses every request)"),
        ("--month-budget", budget_change, "US dollars a UTC month (0 refuses every request)"),
    ):
        limit_set.add_argument(
            flag,
            type=kind,
            metavar=("DOLLARS" if kind is budget_change else "N") + "|unlimited|default",
            help=f"{text}; unlimited: none for this tenant; default: the router's setting",
        )
    limit_set.add_argument(
        "--new-tenant",
        action="store_true",
        help="the tenant may have no key or limit yet (else refused: a misspelt name would "
        "change nothing)",
    )
    for sub in subcommand_parsers(admin):
        _add_admin_arguments(sub, inherited=True)


def seen_rotation(text: str) -> adm.ApiKeyInfo:
    """``--if-rotated-at``'s value: the key as seen, its rotated_at (RFC 3339, as ``--json``
    prints it, to the nanosecond) or 'never' (never rotated)."""
    seen = adm.ApiKeyInfo()
    if text == "never":
        return seen
    try:
        seen.rotated_at.FromJsonString(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            "the key's rotatedAt as `cachemesh admin --json keys list` prints it, e.g. "
            f"2026-01-02T03:04:05.123456789Z, or 'never', got {text[:40]!r}"
        ) from None
    return seen


def rate_change(text: str) -> LimitChange:
    """``--requests-per-min``'s and ``--tokens-per-min``'s value: a whole number a minute,
    'unlimited' or 'default' (the server checks the range)."""
    if text in LIMIT_WORDS:
        return LIMIT_WORDS[text]
    if not text.isascii() or not text.isdigit() or int(text) > MAX_INT64:
        raise argparse.ArgumentTypeError(
            f"a whole number a minute, 'unlimited' or 'default', got {text[:32]!r}"
        )
    return int(text)


def budget_change(text: str) -> LimitChange:
    """A budget's value: US dollars (to the nano-dollar) as nano-dollars, 'unlimited' or
    'default' (the server checks the range), read by the router's own rule for its budget
    settings (``cachemesh.dollars``): plain decimal digits, an optional sign."""
    if text in LIMIT_WORDS:
        return LIMIT_WORDS[text]
    amount = plain_dollars(text)
    nanos = None if amount is None else whole_nanos(amount)
    if nanos is None or abs(nanos) > MAX_INT64:
        raise argparse.ArgumentTypeError(
            f"US dollars in {PLAIN_DOLLARS} with at most 9 decimal places, 'unlimited' or "
            f"'default', got {text[:32]!r}"
        )
    return nanos


def admin_token(args: argparse.Namespace) -> str:
    token = read_admin_token(
        args.admin_token_file, setting="--admin-token-file / CACHEMESH_ADMIN_TOKEN_FILE"
    )
    if not token:
        raise ValueError(
            "no admin token: set CACHEMESH_ADMIN_TOKEN_FILE (`source .run/demo-keys.env` does, "
            "for the local stack), pass --admin-token-file, or set CACHEMESH_ADMIN_TOKEN"
        )
    return token


def run(args: argparse.Namespace, target: str, tls: Tls | None) -> int:
    try:
        token = admin_token(args)
        with AdminClient(target, admin_token=token, tls=tls, insecure=args.insecure) as client:
            reply = _call(client, args)
    except CachemeshError as error:
        print(f"cachemesh admin: {error}", file=sys.stderr)
        return 1
    except ValueError as error:  # no token, an unreadable file
        print(f"cachemesh admin: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(as_json(reply))
    else:
        print(_text(args, reply))
    # a purge of a tenant the router does not know did nothing: not a success for a script
    return 1 if isinstance(reply, adm.InvalidateResponse) and reply.unknown_tenant else 0


def as_json(reply: Message) -> str:
    """The reply as ``--json`` prints it: every field, a zero or false one too ("dropped": 0
    is an answer, not a missing one); a field with presence that is unset stays out."""
    return json.dumps(MessageToDict(reply, always_print_fields_with_no_presence=True), indent=2)


def _call(client: AdminClient, args: argparse.Namespace) -> Any:
    command = args.admin_command
    if command == "stats":
        return client.stats(args.tenant)
    if command == "invalidate":
        return client.invalidate_reply(
            args.tenant, entry_id=args.entry, namespace=args.namespace, everything=args.all
        )
    if command == "keys":
        verb = args.keys_command
        if verb == "create":
            return client.create_key(args.tenant, args.name)
        if verb == "list":
            return adm.ListKeysResponse(
                keys=client.list_keys(args.tenant, include_revoked=args.all)
            )
        if verb == "rotate":
            return client.rotate_key(args.key_id, seen=args.if_rotated_at)
        return client.revoke_key(args.key_id, seen=args.if_rotated_at)
    if command == "limits":
        return _limits_call(client, args)
    if args.policy_command == "get":
        return client.policy(args.tenant)
    return client.set_policy(
        args.tenant,
        l1_enabled=None if args.l1 is None else args.l1 == "on",
        default_ttl_s=args.default_ttl,
        reset_default_ttl=args.reset_default_ttl,
        new_tenant=args.new_tenant,
    )


def _limits_call(client: AdminClient, args: argparse.Namespace) -> Any:
    verb = args.limits_command
    if verb == "get":
        return client.limits(args.tenant)
    if verb == "list":
        return client.list_limits()
    return client.set_limits(
        args.tenant,
        requests_per_min=args.requests_per_min,
        tokens_per_min=args.tokens_per_min,
        day_budget_nanos=args.day_budget,
        month_budget_nanos=args.month_budget,
        new_tenant=args.new_tenant,
    )


def _text(args: argparse.Namespace, reply: Any) -> str:
    if isinstance(reply, adm.GetStatsResponse):
        return stats_table(reply)
    if isinstance(reply, adm.InvalidateResponse):
        return invalidate_text(args.tenant, reply)
    if isinstance(reply, adm.IssuedKey):
        return (
            keys_table([reply.key])
            + f"\n\nAPI key (shown this once, stored nowhere): {reply.api_key}"
        )
    if isinstance(reply, adm.ListKeysResponse):
        return keys_table(list(reply.keys)) if reply.keys else "no keys"
    if isinstance(reply, adm.ApiKeyInfo):
        return keys_table([reply])
    if isinstance(reply, adm.TenantLimits):
        return limits_table(reply)
    if isinstance(reply, adm.ListLimitsResponse):
        return limits_list(reply)
    return policy_table(reply)


NAME_CHARS = 64  # the most of a name from the server a table shows (a tenant's: 64 at most)


def printable(name: str) -> str:
    """A name from the server as a terminal may show it: each control, format or other
    unprintable character escaped (a NUL, a right-to-left override that would reverse the
    line) and a long one cut, saying its length (a 1 MB tenant name kept by an older
    semantic-cache made an 18.8 MB table)."""
    escaped = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in name[:NAME_CHARS])
    if len(name) <= NAME_CHARS:
        return escaped
    return f"{escaped}... ({len(name):,} characters)"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: int = 1) -> str:
    """Columns padded to their widest cell; from column ``right`` on, right-aligned (numbers)."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).rjust(w) if i >= right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def dollars(nanos: int) -> str:
    return f"${nanos / NANOS_PER_DOLLAR:,.4f}"


UNKNOWN = "unknown"  # a figure whose service did not answer: not a zero


def missing_figures(reply: adm.GetStatsResponse) -> list[set[str]]:
    """The services whose figures each row lacks: the row's own ``unavailable``; from a router
    that names them only for the whole reply, every row lacks those (it did not say which)."""
    if any(t.unavailable for t in reply.tenants):
        return [set(t.unavailable) for t in reply.tenants]
    return [set(reply.unavailable) for _ in reply.tenants]


def stats_table(reply: adm.GetStatsResponse) -> str:
    headers = ["tenant", "keys", "L1", "entries", "lookups", "hits", "hit rate",
               "model calls", "cost", "saved"]  # fmt: skip
    rows = []
    lacking = missing_figures(reply)
    for t, missing in zip(reply.tenants, lacking, strict=True):
        l1 = [
            "on" if t.l1_enabled else "off",
            str(t.l1_entries),
            str(t.l1_lookups),
            str(t.l1_hits),
            f"{t.l1_hit_rate:.1%}" if t.l1_lookups else "-",
        ]
        billed = [str(t.model_requests), dollars(t.cost_nanos), dollars(t.saved_nanos)]
        if "semantic-cache" in missing:
            l1 = [UNKNOWN] * len(l1)
        if "prefix-cache" in missing:
            billed = [UNKNOWN] * len(billed)
        rows.append([printable(t.tenant), str(t.active_keys), *l1, *billed])
    text = table(headers, rows) if rows else "no tenants"
    notes = ["lookups and hits: since semantic-cache started; cost and saved: model calls"]
    for service in reply.unavailable:
        rows_lacking = sum(1 for missing in lacking if service in missing)
        notes.insert(
            0,
            f"NOT ANSWERING: {service} (its figures are unknown for {rows_lacking:,} of "
            f"{len(reply.tenants):,} tenants)",
        )
    return text + "\n\n" + "\n".join(notes)


def _when(stamp: Timestamp, present: bool) -> str:
    if not present:
        return "-"
    return datetime.fromtimestamp(stamp.ToSeconds(), UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def keys_table(keys: Sequence[adm.ApiKeyInfo]) -> str:
    headers = ["id", "tenant", "name", "created", "rotated", "revoked"]
    rows = [
        [
            printable(k.id),
            printable(k.tenant),
            printable(k.name) or "-",
            _when(k.created_at, k.HasField("created_at")),
            _when(k.rotated_at, k.HasField("rotated_at")),
            _when(k.revoked_at, k.HasField("revoked_at")),
        ]
        for k in keys
    ]
    return table(headers, rows, right=len(headers))


def _did_you_mean(known_as: str | None) -> str:
    if known_as is None:
        return ""
    return f"; did you mean {printable(known_as)}? (tenant names are case-sensitive)"


def invalidate_text(tenant: str, reply: adm.InvalidateResponse) -> str:
    if reply.unknown_tenant:
        known_as = reply.known_as if reply.HasField("known_as") else None
        return (
            f"tenant {printable(tenant)} is unknown (no API key, no L1 entry, no cache "
            f"policy): nothing dropped{_did_you_mean(known_as)}"
        )
    return f"dropped {reply.dropped} L1 entries of tenant {printable(tenant)}"


def policy_table(policy: adm.CachePolicy) -> str:
    own = policy.HasField("default_ttl_s")
    ttl = f"{policy.effective_default_ttl_s:g} s" + ("" if own else " (semantic-cache's default)")
    rows = [["L1", "on" if policy.l1_enabled else "off"], ["default TTL", ttl]]
    head = f"tenant {printable(policy.tenant)}\n"
    if policy.unknown_tenant:
        known_as = policy.known_as if policy.HasField("known_as") else None
        head = (
            f"tenant {printable(policy.tenant)} was unknown (no API key, no L1 entry, no cache "
            f"policy before): this policy applies once it has a key{_did_you_mean(known_as)}\n"
        )
    return head + table(["setting", "value"], rows, right=2)


_LIMIT_ROWS = (
    ("requests_per_min", "request rate"),
    ("tokens_per_min", "token rate"),
    ("day_budget_nanos", "daily budget"),
    ("month_budget_nanos", "monthly budget"),
)


def limit_text(name: str, limit: adm.Limit) -> str:
    """One limit as people read it: "600 requests/min", "$5.00 a day", "unlimited"."""
    if not limit.HasField("value"):
        return "unlimited"
    if name == "requests_per_min":
        return f"{limit.value:,} requests/min"
    if name == "tokens_per_min":
        return f"{limit.value:,} tokens/min"
    return f"{exact_dollars(limit.value)} a {'day' if name == 'day_budget_nanos' else 'month'}"


def exact_dollars(nanos: int) -> str:
    """Cents when whole, else down to the nano-dollar ($0.00015): a budget exactly."""
    whole, part = divmod(nanos, NANOS_PER_DOLLAR)
    return f"${whole:,}.{f'{part:09d}'.rstrip('0').ljust(2, '0')}"


def limits_table(limits: adm.TenantLimits) -> str:
    rows = [
        [label, limit_text(name, getattr(limits, name)),
         "its own" if getattr(limits, name).own else "the router's setting"]
        for name, label in _LIMIT_ROWS
    ]  # fmt: skip
    head = f"tenant {printable(limits.tenant)}\n"
    if limits.unknown_tenant:
        known_as = limits.known_as if limits.HasField("known_as") else None
        head = (
            f"tenant {printable(limits.tenant)} was unknown (no API key, no limit of its own "
            f"before): these limits apply once it has a key{_did_you_mean(known_as)}\n"
        )
    return head + table(["limit", "value", "from"], rows, right=3)


def limits_list(reply: adm.ListLimitsResponse) -> str:
    headers = ["tenant", *(label for _, label in _LIMIT_ROWS)]

    def row(tenant: str, limits: adm.TenantLimits, mark: bool) -> list[str]:
        cells = [tenant]
        for name, _ in _LIMIT_ROWS:
            limit = getattr(limits, name)
            cells.append(limit_text(name, limit) + ("*" if mark and limit.own else ""))
        return cells

    rows = [row("(every other)", reply.defaults, False)]
    rows += [row(printable(t.tenant), t, True) for t in reply.tenants]
    return (
        table(headers, rows, right=1)
        + "\n\n* the tenant's own; the rest: this router's settings (ROUTER_LIMIT_*, "
        "ROUTER_BUDGET_*)"
    )
