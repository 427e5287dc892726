"""``python -m services.tools.estimator``: what would cachemesh save on this traffic?

Replays a JSONL request log (format: clients/python/SCHEMA.md, "Request log") or one of the
load test's workloads through the stack's own logic in one process, on a virtual clock (no
servers, no sleeps), and prints what each layer would serve and save. Requests that overlapped
in the log (``latency_ms``) are served concurrently, each answer ending at its logged end; a
log without ends is replayed one request at a time (a warning says so). What-ifs: ``--threshold``
(L1), ``--l1-ttl``, ``--no-l1``, ``--l2-ttl 1h`` (every breakpoint), ``--routing auto`` (the
router picks the tier), ``--set KEY=VALUE`` (any stack setting, as in .env; a name no service
reads is refused, naming the closest one). The replay starts
cold (every cache empty): a load run whose report warns that L2 was warm at start read an
earlier run's prefixes, and its bill is below what this estimates.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import math
import sys
import time
from pathlib import Path

from cachemesh._argv import Parser
from cachemesh.envfile import read_env_file
from cachemesh.loadtest import report
from cachemesh.loadtest.reqlog import LogError, LogRecord, read_log
from cachemesh.loadtest.stats import summarise
from cachemesh.loadtest.workloads import DEFAULT_MIX, NAMES, DataMissing, WorkloadSpec, build
from services.common.clock import ManualClock
from services.common.env import ConfigError
from services.common.keyfile import TENANT_RULE
from services.common.tokens import TokenizerError
from services.tools.bench.gateway.redact import own_settings, setting_names
from services.tools.estimator.offline import REPLAY_START_MS, OfflineStack
from services.tools.estimator.replay import WhatIf, log_timing, replay
from services.tools.estimator.tenants import described, stand_ins
from services.tools.out_path import check_writable
from services.tools.stack.lifecycle import Stack
from services.tools.stack.service_table import SERVICES

ROOT = Path(__file__).resolve().parents[3]
SCHEMA = "cachemesh.estimate.v1"
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C
# what --set may name: the variables some service of the stack reads
SETTINGS = frozenset(key for service in SERVICES for key in service.env_keys)


class UsageError(ValueError):
    """A flag's value is refused before anything runs (exit 2, as argparse's own)."""


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m services.tools.estimator", description=__doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--log", type=Path, help="a JSONL request log")
    source.add_argument("--workload", choices=NAMES, help="a load-test workload instead")
    p.add_argument("--requests", type=int, default=500, help="workload: how many requests")
    p.add_argument("--interval-ms", type=float, default=1000.0, help="workload: arrival gap")
    p.add_argument("--mix", default=DEFAULT_MIX)
    p.add_argument("--repeat-rate", type=float, default=0.3)
    p.add_argument("--paraphrase-rate", type=float, default=0.3)
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--threshold", type=float, help="L1 similarity threshold")
    p.add_argument("--l1-ttl", type=float, help="L1 entry TTL in seconds")
    p.add_argument("--no-l1", action="store_true", help="bypass the semantic cache")
    p.add_argument("--l2-ttl", choices=("logged", "5m", "1h"), default="logged")
    p.add_argument("--routing", choices=("logged", "auto"), default="logged")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, help="write the JSON estimate here")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    return p


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE")
        if key not in SETTINGS:  # a typo's what-if would be the baseline, without a word
            near = difflib.get_close_matches(key.upper(), SETTINGS, n=1)
            hint = f"did you mean {near[0]}?" if near else "see .env for the settings"
            raise UsageError(f"--set {key}: no service of the stack reads it ({hint})")
        out[key] = value
    if args.threshold is not None:
        out["SEMANTIC_CACHE_THRESHOLD"] = str(args.threshold)
    if args.l1_ttl is not None:
        out["SEMANTIC_CACHE_TTL_S"] = str(args.l1_ttl)
    return out


def _check(args: argparse.Namespace) -> None:
    if args.out is not None and args.out.exists() and not args.force:  # an earlier estimate
        raise ValueError(
            f"--out {args.out} exists: pass --force to replace it, or name another file"
        )
    if args.out is not None:
        check_writable(args.out)
    if args.workload is None:
        return
    if args.requests < 1:
        raise ValueError(f"--requests must be >= 1, got {args.requests}")
    if not (math.isfinite(args.interval_ms) and args.interval_ms >= 0):
        raise ValueError(f"--interval-ms must be a finite number >= 0, got {args.interval_ms}")


def _records(
    args: argparse.Namespace,
) -> tuple[list[LogRecord], dict[str, object], dict[frozenset[str], int]]:
    if args.log is not None:
        records = list(read_log(args.log))
        if not any(not r.warmup for r in records):  # its estimate: $0 of $0, "0.0% saved"
            warmups = sum(r.warmup for r in records)
            held = f"only {warmups} warm-up request(s)" if warmups else "no request"
            raise ValueError(
                f"{args.log} holds {held}: nothing to estimate (a cachemesh-load --log-out "
                "log of a run that sent its measured requests)"
            )
        return records, {"log": str(args.log), "timing": log_timing(records)}, {}
    spec = WorkloadSpec(args.workload, args.seed, "estimate", args.data_dir, args.mix,
                        args.repeat_rate, args.paraphrase_rate)  # fmt: skip
    workload = build(spec)
    records = [LogRecord(i * args.interval_ms, workload.next_item()) for i in range(args.requests)]
    source = {"workload": {"name": args.workload, **workload.params()}, "requests": args.requests,
              "interval_ms": args.interval_ms}  # fmt: skip
    return records, source, workload.labels()


def main(argv: list[str] | None = None) -> None:
    try:
        _main(argv)
    except KeyboardInterrupt:  # was a traceback from wherever the replay was
        print("estimator: interrupted (Ctrl-C): no estimate", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT)


def _main(argv: list[str] | None) -> None:
    args = _parser().parse_args(argv)
    what_if = WhatIf(l1=not args.no_l1, l2_ttl=args.l2_ttl, routing=args.routing)
    try:
        overrides = _overrides(args)
    except UsageError as exc:
        print(f"estimator: {exc}", file=sys.stderr)
        sys.exit(2)
    try:
        _check(args)
        settings = Stack(ROOT, env_overrides=overrides).settings()
        records, source, labels = _records(args)
        stack = OfflineStack(settings, ManualClock(REPLAY_START_MS))
    except TokenizerError as exc:  # a vocabulary missing: what to do, as a bad setting
        print(f"estimator: {exc}", file=sys.stderr)
        sys.exit(2)
    except (ValueError, ConfigError, LogError, DataMissing, OSError) as exc:
        sys.exit(f"estimator: {exc}")
    start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(REPLAY_START_MS // 1000))
    source["clock_start"] = start
    budgets = stack.router.limits.policy
    if budgets.day_budget_nanos is not None or budgets.month_budget_nanos is not None:
        print(
            f"estimator: the requests' times are relative (t_ms), so they are taken to start at "
            f"{start} (00:00 UTC on the 1st of a month): a daily budget renews every 24 h of "
            "them and a monthly one 31 days in, not where the live run's midnight fell",
            file=sys.stderr,
        )
    timing = source.get("timing")
    if isinstance(timing, dict) and timing["without_end"]:
        print(
            f"estimator: {timing['without_end']} of {timing['records']} records have no "
            "latency_ms (a log written before cachemesh-load logged it): each is replayed as "
            "if its answer took no time, so requests that overlapped live are estimated as "
            "sequential (optimistic: a prompt's prefix and L1 entry ready for the next one)",
            file=sys.stderr,
        )
    if renamed := stand_ins(r.item.tenant for r in records):
        print(
            f"estimator: {len(renamed)} tenant(s) of the log are not names the caches keep data "
            f"under ({TENANT_RULE}; live, the caller's key names the tenant), so they are "
            f"replayed as {described(renamed)}: each still apart from every other",
            file=sys.stderr,
        )
    samples = asyncio.run(replay(stack, records, what_if))
    results = summarise(samples, labels, wall_s=0.0)
    for key in ("latency_ms", "failed_ms", "ttft_ms", "wall_s", "throughput_rps"):
        results.pop(key)
    doc = {
        "schema": SCHEMA,
        "source": source,
        "what_if": {"l1": what_if.l1, "l2_ttl": what_if.l2_ttl, "routing": what_if.routing},
        # cachemesh's own settings only (not the shell's environment), secrets masked
        "stack": own_settings(settings, setting_names(read_env_file(ROOT / ".env"))),
        "results": results,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with report.replacing(args.out) as out:
            out.write(json.dumps(doc, indent=2) + "\n")
    print(report.table(results, latency=False))
