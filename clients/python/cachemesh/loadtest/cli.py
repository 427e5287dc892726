"""``cachemesh-load`` (= ``python -m cachemesh.loadtest``): bounded load on a running Gateway.

Closed loop (``--concurrency`` requests in flight) or open loop (``--rate`` arrivals a second,
Poisson); an agent conversation's turns are sent one after another, each on the previous
turn's answer (a closed-loop worker owns the conversation; in the open loop it arrives as
one request does). Every run stops after ``--requests`` requests or ``--duration`` seconds,
whichever comes first, after an unrecorded ``--warmup``: no request starts after
``--duration``, those in flight then have ``--stop-grace`` seconds to finish, and those still
running are cut (``CUT_AT_DEADLINE``, counted apart: the tool's cut is not an error of the
Gateway's, and the exit status is 1 for the Gateway's errors only). Targets on this host only
(loopback, a Unix socket), unless ``--allow-non-loopback``, and then over TLS (the
``cachemesh`` CLI's options and ``CACHEMESH_TLS``, ``CACHEMESH_CA_FILE``,
``CACHEMESH_CERT_FILE``, ``CACHEMESH_KEY_FILE`` settings) unless ``--insecure``
(``CACHEMESH_INSECURE``). Writes a JSON report (SCHEMA.md), optionally an HTML chart and the
JSONL request log the offline estimator replays (``python -m services.tools.estimator``).
Given the admin token (``CACHEMESH_ADMIN_TOKEN_FILE`` or ``CACHEMESH_ADMIN_TOKEN``), it also
reports the run's spend as the stack billed it, the requests that ended in an error included
(the token goes over TLS or to a target on this host only). Ctrl-C stops the run: the
requests in flight are cut (``INTERRUPTED``) and the files written for the run until then
(exit 130).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from cachemesh._argv import Parser, piped, secret_flag
from cachemesh._auth import bearer_metadata
from cachemesh._channel import TIMEOUT_MAX_S
from cachemesh._client import DEFAULT_TARGET
from cachemesh._tls import (
    INSECURE_ENV,
    Tls,
    check_plaintext,
    cleartext_off_host,
    insecure_from_args,
)
from cachemesh._tls import add_arguments as add_tls_arguments
from cachemesh._tls import from_args as tls_from_args
from cachemesh.envfile import EnvFileError, read_env_file
from cachemesh.loadtest import billed, chart, report
from cachemesh.loadtest.load import (
    NoGateway,
    NotLoopback,
    check_gateway,
    check_target,
    draw,
    run_load,
)
from cachemesh.loadtest.redact import mask
from cachemesh.loadtest.reqlog import LogRecord, write_log
from cachemesh.loadtest.runner import DEFAULT_STOP_GRACE_S, Interrupted, LoadShape
from cachemesh.loadtest.samples import CUT, INTERRUPTED, LOST, Sample
from cachemesh.loadtest.stats import summarise
from cachemesh.loadtest.warm_l2 import reads_not_written
from cachemesh.loadtest.workloads import (
    DEFAULT_MIX,
    NAMES,
    DataMissing,
    Item,
    WorkloadSpec,
    build,
)
from cachemesh.loadtest.workloads.base import TENANT_A, TENANT_B

MAX_REQUESTS = 1_000_000
MAX_DURATION_S = 3600.0
# --requests and --warmup are drawn whole before the run: measured, 30.5 KiB an agent turn
DRAWN_NOTE = (
    f"at most {MAX_REQUESTS:,}; each drawn and held in memory before the run: an agent "
    "workload's turn ~30 KiB, 1,000,000 of them ~29 GiB"
)
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="cachemesh-load", description=__doc__)
    p.add_argument("--target", default=os.environ.get("CACHEMESH_TARGET", DEFAULT_TARGET))
    p.add_argument(
        "--allow-non-loopback", action="store_true", help="permit a target off this host"
    )
    add_tls_arguments(  # and --insecure
        p,
        "the API keys in cleartext on the network; the admin token is never sent so: the "
        f"billed totals are then not read; env {INSECURE_ENV}: 1/0, true/false, yes/no, on/off",
    )
    p.add_argument("--workload", choices=NAMES, default="synthetic")
    p.add_argument("--mix", default=DEFAULT_MIX, help="weights for --workload mix")
    p.add_argument("--repeat-rate", type=float, default=0.3, help="faq: exact repeats")
    p.add_argument("--paraphrase-rate", type=float, default=0.3, help="faq: paraphrases")
    data = os.environ.get("CACHEMESH_DATA_DIR", "../shared/data")
    p.add_argument("--data-dir", type=Path, default=Path(data))
    p.add_argument(
        "--namespace", default=None, help="L1 namespace (default: a fresh one; L1 only, not L2)"
    )
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--mode", choices=("closed", "open"), default="closed")
    p.add_argument("--concurrency", type=int, default=8, help="closed loop: in flight")
    p.add_argument("--rate", type=float, default=20.0,
                   help="open loop: arrivals/s (a request, an agent conversation)")  # fmt: skip
    p.add_argument("--requests", type=int, default=200,
                   help=f"measured requests (upper bound; {DRAWN_NOTE})")  # fmt: skip
    p.add_argument("--duration", type=float, default=120.0,
                   help="seconds (upper bound): no request starts after it")  # fmt: skip
    p.add_argument("--stop-grace", type=float, default=DEFAULT_STOP_GRACE_S,
                   help="seconds the requests in flight at --duration's end have to finish "
                   "before they are cut (CUT_AT_DEADLINE, not errors); 0: cut at once "
                   f"(default {DEFAULT_STOP_GRACE_S:g})")  # fmt: skip
    p.add_argument("--warmup", type=int, default=0,
                   help=f"unrecorded requests sent first ({DRAWN_NOTE})")  # fmt: skip
    p.add_argument("--processes", type=int, default=1, help="client processes")
    p.add_argument("--stream", action="store_true", help="StreamComplete (records TTFT)")
    p.add_argument("--timeout", type=float, default=120.0, help="per-request deadline (s)")
    p.add_argument("--out", type=Path, required=True, help="the JSON report")
    p.add_argument("--chart", type=Path, default=None, help="an HTML chart of the run")
    p.add_argument("--log-out", type=Path, default=None, help="the requests as a JSONL log")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out, --chart or --log-out file")  # fmt: skip
    p.add_argument("--stack-config", type=Path, default=None,
                   help="env file the stack was started with (recorded in the report; "
                   "default: .env)")  # fmt: skip
    p.add_argument("--run-dir", type=Path, default=None,
                   help="the target stack's run dir (its ports.env: where `up --free-ports` "
                   "moved it; default: .run beside --stack-config)")  # fmt: skip
    return p


def _check(args: argparse.Namespace, tls: Tls | None) -> None:
    check_target(args.target, args.allow_non_loopback)
    check_plaintext(args.target, tls, args.insecure)
    if tls is not None:
        tls.credentials()  # a CA, cert or key file that cannot be read: now, not per client
    if not 1 <= args.requests <= MAX_REQUESTS:
        raise ValueError(f"--requests must be within 1..{MAX_REQUESTS}")
    if not 0 < args.duration <= MAX_DURATION_S:
        raise ValueError(f"--duration must be within (0, {MAX_DURATION_S:.0f}] seconds")
    if not 0 <= args.stop_grace <= MAX_DURATION_S:  # nan too
        raise ValueError(f"--stop-grace must be within [0, {MAX_DURATION_S:.0f}] seconds")
    if args.concurrency < 1 or args.processes < 1:
        raise ValueError("--concurrency and --processes must be >= 1")
    if not 0 <= args.warmup <= MAX_REQUESTS:  # each is drawn before the run
        raise ValueError(f"--warmup must be within 0..{MAX_REQUESTS}")
    if args.mode == "closed" and args.processes > args.concurrency:
        raise ValueError("--processes must be <= --concurrency (each keeps one in flight)")
    if args.mode == "open" and not 0 < args.rate < math.inf:  # nan too: the report is JSON
        raise ValueError("--rate must be a number over 0 (arrivals a second) for --mode open")
    if not 0 < args.timeout <= TIMEOUT_MAX_S:  # nan and inf too: gRPC's deadline overflows
        raise ValueError(f"--timeout must be > 0 seconds, at most {TIMEOUT_MAX_S:,.0f}")
    if args.stack_config is not None and not args.stack_config.is_file():  # a typo's report
        raise ValueError(  # recorded no setting of the stack, without a word
            f"--stack-config {args.stack_config}: no such file (the env file the stack was "
            "started with: .env in the repository)"
        )
    files = {"--out": args.out, "--chart": args.chart, "--log-out": args.log_out}
    for flag, path in files.items():  # before the run, not after it
        if path is not None:
            if path.exists() and not args.force:  # an earlier run's report
                raise ValueError(
                    f"{flag} {path} exists: pass --force to replace it, or name another file"
                )
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                existed = path.exists()
                path.open("a").close()  # writable? (an existing file is left as it is)
                if not existed:
                    path.unlink()
            except OSError as exc:
                raise ValueError(f"cannot write {path}: {exc.strerror}") from None


def stack_config(path: Path) -> dict[str, str]:
    """The stack's settings as the env file says, overridden by this environment, with
    secrets masked (an API key, a provider key, a Redis password)."""
    if not path.is_file():
        return {}
    try:
        values = read_env_file(path)
    except EnvFileError as exc:
        raise ValueError(f"--stack-config: {exc}") from None
    return {key: mask(key, os.environ.get(key, value)) for key, value in values.items()}


DEFAULT_STACK_CONFIG = Path(".env")  # the repository's, when run from its root
MOVED_FILE = "ports.env"  # in a stack's run dir: the addresses `up --free-ports` chose
LISTEN = "ROUTER_LISTEN"  # where the stack's Gateway listens


def target_stack(
    path: Path, run_dir: Path | None, target: str
) -> tuple[dict[str, str], str | None]:
    """The target stack's settings for the report (``stack_config``'s, over them the run
    dir's moved ones, ``run_dir/ports.env``) and None; or, when the Gateway they name is not
    ``target`` (another port: the cwd's .env of a stack moved to free ports; another host, on
    any port: another stack's), no settings and why: never another stack's values."""
    settings = stack_config(path)
    moved = run_dir / MOVED_FILE if run_dir is not None else None
    if moved is not None and moved.is_file():
        try:
            settings.update({k: mask(k, v) for k, v in read_env_file(moved).items()})
        except EnvFileError as exc:
            raise ValueError(f"--run-dir: {exc}") from None
    listen = settings.get(LISTEN)
    if listen is None or _same_gateway(listen, target):
        return settings, None
    said = f"{path} and {moved} say" if moved is not None and moved.is_file() else f"{path} says"
    unknown = "the target stack's settings are unknown (the report's stack is empty)"
    if target.startswith(("unix:", "unix-abstract:")):  # no ROUTER_LISTEN names a socket
        return {}, (
            f"{unknown}: {said} the Gateway listens at {listen}, and the target is a Unix "
            f"socket ({target}): which stack answers behind it cannot be told"
        )
    return {}, (
        f"{unknown}: {said} the Gateway listens at {listen}, the target is {target}; give "
        "--run-dir (the run dir the target stack was started with: its ports.env) and "
        "--stack-config"
    )


_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
_ANY = {"", "0.0.0.0", "*", "::", "[::]"}


def _same_gateway(listen: str, target: str) -> bool:
    """Whether a Gateway listening at ``listen`` is the one ``target`` dials: the same port,
    and the same host, or a loopback target of one listening on loopback or every address (a
    target on another host, even on the same port, may be another stack)."""
    listen_host, _, listen_port = listen.rpartition(":")
    target_host, _, target_port = target.rpartition(":")
    if listen_port != target_port:
        return False
    if target_host.lower() == listen_host.lower():
        return True
    return target_host.lower() in _LOOPBACK and (listen_host in _ANY or listen_host in _LOOPBACK)


KEY_VARIABLES = {TENANT_A: ("CACHEMESH_API_KEY", "CACHEMESH_KEY_A"), TENANT_B: ("CACHEMESH_KEY_B",)}


def key_variable(tenant: str) -> str:
    """The variable ``keys_from_env`` took ``tenant``'s key from (its first one when none)."""
    variables = KEY_VARIABLES[tenant]
    return next((v for v in variables if os.environ.get(v)), variables[0])


def keys_from_env() -> dict[str, str]:
    """Each tenant's key, from the first of its variables set; a key gRPC cannot send is a
    ValueError naming its variable (before the run, not one error per request)."""
    keys = {}
    for tenant, variables in KEY_VARIABLES.items():
        for variable in variables:
            if key := os.environ.get(variable):
                bearer_metadata(key, variable)
                keys[tenant] = key
                break
    return keys


def main(argv: list[str] | None = None) -> int:
    return piped(_main, argv)  # a reader of stdout that goes away: quiet, 141


def _main(argv: list[str] | None) -> int:
    given, p = sys.argv[1:] if argv is None else argv, parser()
    if (flag := secret_flag(given, p)) is not None:  # --key, --api-key, --token: never echoed
        print(
            f"cachemesh-load: {flag} is refused (its value is not shown: other users' ps would "
            "see it): set CACHEMESH_API_KEY (CACHEMESH_KEY_A, CACHEMESH_KEY_B: source "
            ".run/demo-keys.env); the admin token: CACHEMESH_ADMIN_TOKEN_FILE",
            file=sys.stderr,
        )
        return 2
    args = p.parse_args(argv)
    try:
        tls = tls_from_args(args)
        args.insecure = insecure_from_args(args)  # with CACHEMESH_INSECURE
        _check(args, tls)
        keys = keys_from_env()
        if TENANT_A not in keys:
            raise ValueError("set CACHEMESH_API_KEY (or source .run/demo-keys.env)")
        namespace = args.namespace if args.namespace is not None else f"load-{time.time_ns()}"
        spec = WorkloadSpec(args.workload, args.seed, namespace, args.data_dir, args.mix,
                            args.repeat_rate, args.paraphrase_rate)  # fmt: skip
        workload = build(spec)
        warmup, plan = draw(workload, args.warmup), draw(workload, args.requests)
        missing = {i.tenant for i in [*warmup, *plan]} - set(keys)
        if missing:
            raise ValueError(f"the workload sends as {sorted(missing)}: set CACHEMESH_KEY_B")
        config = args.stack_config or DEFAULT_STACK_CONFIG
        run_dir = args.run_dir or config.parent / ".run"
        stack, unknown = target_stack(config, run_dir, args.target)
        if unknown is None and not config.is_file():  # run from outside the repository
            unknown = (
                f"the target stack's settings are not recorded: no {config} here (the report's "
                "stack holds only the run dir's ports, if any); give --stack-config"
            )
        token = billed.admin_token()
        check_gateway(args.target, tls)  # before the warm-up: not --duration of silence
    except (ValueError, NotLoopback, DataMissing) as exc:
        print(f"cachemesh-load: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cachemesh-load: interrupted before the run: no report", file=sys.stderr)
        return INTERRUPTED_EXIT
    shape = LoadShape(args.mode, args.concurrency, args.rate, args.duration, args.stream,
                      args.timeout, args.seed, tls, insecure=args.insecure,
                      grace_s=args.stop_grace)  # fmt: skip
    unread: str | None = None  # why the billed totals could not be read
    # --insecure allows the keys only: the token never goes in cleartext off this host
    if token and cleartext_off_host(args.target, tls, insecure=False):
        token = None
        unread = (
            "the billed totals were not read: the admin token goes over TLS or to this host "
            f"only (loopback, a Unix socket), never in plaintext to {args.target} (give --tls "
            "or --ca-file)"
        )
    read = billed.StackTotals(args.target, token, tls=tls) if token else None
    before: billed.Totals | None = None

    def measured_begins() -> None:
        nonlocal before, unread
        if read is not None:
            try:
                before, _ = billed.settled(read)  # the warm-up's bills landed
            except billed.BilledUnavailable as exc:
                unread = f"could not read the stack's billed totals: {exc}"

    warnings: list[str] = []  # what makes the figures differ from a whole run on a cold stack
    if unknown is not None:
        warnings.append(unknown)
    interrupted = False
    try:
        samples = run_load(args.target, keys, warmup, plan, shape, args.processes,
                           args.workload, before_measured=measured_begins,
                           warn=warnings.append)  # fmt: skip
    except Interrupted as stop:  # Ctrl-C: the report of the run until then
        samples, interrupted = stop.samples, True
    except KeyboardInterrupt:  # a second Ctrl-C while the first cut the requests in flight
        print("cachemesh-load: interrupted twice: stopped without a report", file=sys.stderr)
        return INTERRUPTED_EXIT
    results = summarise(samples, workload.labels())
    if interrupted:
        warnings.insert(0, _interrupted_warning(results, len(plan)))
    elif results["cut_at_deadline"]:
        warnings.append(_cut_warning(results["cut_at_deadline"], args.stop_grace))
    warm = reads_not_written(samples, warmup, plan)
    results["l2_warm_at_start"] = {"requests": warm.requests, "read_tokens": warm.read_tokens}
    if warm.requests:
        warnings.append(_warm_warning(warm.requests, warm.read_tokens))
    if read is not None and before is not None:
        try:
            after, quiet = billed.settled(read)
        except billed.BilledUnavailable as exc:
            unread = f"could not read the stack's billed totals: {exc}"
        except KeyboardInterrupt:
            interrupted = True
            unread = "not read: interrupted while the run's bills were landing"
        else:
            measured = [s for s in samples if not s.warmup]
            results["cost"]["billed"] = billed.figures(before, after, measured)
            if not quiet:
                warnings.append(
                    f"the stack's billed totals still moved {billed.MAX_WAIT_S:g} s after the "
                    "run (other traffic on the stack, or bills still landing): "
                    "results.cost.billed is the last read"
                )
    said = billed.errored_warning(results, unread)
    if said is not None or unread is not None:
        warnings.append(said or str(unread))
    if (unanswered := billed.unanswered_warning(results)) is not None:
        warnings.append(unanswered)
    if (refused := _refused_key_warning(samples, warmup, plan)) is not None:
        warnings.append(refused)
    if not interrupted and (gone := _gone_warning(args.target, tls, results)) is not None:
        warnings.append(gone)
    run = {
        "target": args.target, "mode": args.mode, "concurrency": args.concurrency,
        "rate_rps": args.rate if args.mode == "open" else None, "requests_limit": args.requests,
        "duration_limit_s": args.duration, "stop_grace_s": args.stop_grace,
        "warmup_requests": args.warmup,
        "processes": args.processes, "stream": args.stream, "seed": args.seed,
        "namespace": namespace, "timeout_s": args.timeout, "tls": tls is not None,
        "sessions": {"count": len({i.session for i in plan if i.session}),
                     "turns": "after_previous_answer"},
    }  # fmt: skip
    params = {"name": args.workload, **workload.params()}
    doc = report.document(run=run, workload=params, stack=stack, results=results)
    doc["warnings"] = warnings
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with report.replacing(args.out) as out:
        out.write(json.dumps(doc, indent=2) + "\n")
    if args.chart:
        with report.replacing(args.chart) as out:
            out.write(chart.render_html(f"cachemesh load: {args.workload}",
                                        [(args.workload, results)]))  # fmt: skip
    if args.log_out:
        with report.replacing(args.log_out) as out:
            write_log(out, sent_log(samples, warmup, plan))
    print(report.table(results))
    print(f"report: {args.out}" + (f"; chart: {args.chart}" if args.chart else ""))
    for warning in warnings:
        print(f"cachemesh-load: warning: {warning}", file=sys.stderr)
    if interrupted:
        return INTERRUPTED_EXIT
    if not results["completed"]:
        why = _none_sent(args, results["requests"]) or _none_completed(
            args.target, tls, results["errors"]
        )
        print(f"cachemesh-load: no request completed: {why}", file=sys.stderr)
    # the Gateway's errors (and a lost client process's) only: not the run's own cut at its end
    return 0 if results["completed"] and not results["errors"] else 1


# how a request ends that waited for a Gateway gone (the client waits for one that went away,
# within --timeout: wait_for_ready), as it ends that waited for a slow answer
WAITED = ("DEADLINE_EXCEEDED", CUT, "UNAVAILABLE")


def _gone_warning(target: str, tls: Tls | None, results: dict[str, Any]) -> str | None:
    """When some requests completed and others ended ``WAITED``: whether the Gateway still
    answers at the end of the run. One that went away mid-run (its router stopped or
    crashed) leaves its requests waiting for it until ``--timeout`` or the run's end, where
    they are counted ``DEADLINE_EXCEEDED`` or cut, their time the timeout: a report that
    would read as a slow stack. (None completed: ``_none_completed`` says why.)"""
    ended = dict(sorted({**results["errors"], CUT: results["cut_at_deadline"]}.items()))
    waited = {code: n for code, n in ended.items() if code in WAITED and n}
    if not waited or not results["completed"]:
        return None
    try:
        check_gateway(target, tls)
    except NoGateway as exc:
        codes = ", ".join(f"{code}: {n}" for code, n in waited.items())
        return (
            f"the Gateway no longer answers at the end of the run ({exc}): the "
            f"{sum(waited.values())} requests that ended {codes} may have waited for a Gateway "
            "that went away mid-run (the client waits for it within --timeout), not for a "
            "slow answer; their times are not the stack's latency (make status; the "
            "router's log: <run dir>/logs/router.log)"
        )
    return None


def _none_sent(args: argparse.Namespace, requests: int) -> str | None:
    """Why no request completed when none was sent: an open loop's first arrival (Poisson, a
    mean of ``--rate`` a second) fell after ``--duration`` (``--rate 1e-300``: nothing was
    asked of the Gateway, which was said to have answered nothing). None when some were."""
    if requests:
        return None
    if args.mode == "open":
        return (
            f"no request was sent: no arrival fell within --duration {args.duration:g} s at "
            f"--rate {args.rate:g} a second (a mean of {args.rate * args.duration:.3g} "
            "arrivals in the run); give a higher --rate or a longer --duration"
        )
    return f"no request was sent within --duration {args.duration:g} s"


def _none_completed(target: str, tls: Tls | None, errors: dict[str, int]) -> str:
    """Why no request completed: asked again of the target's health, so "is a Gateway
    running?" is said only when nothing answers there (a Gateway that answered every request
    with an error, UNAVAILABLE or a refusal, is running)."""
    try:
        check_gateway(target, tls)
    except NoGateway as exc:
        return f"{exc} (make up)"
    if not set(errors) - {INTERRUPTED, LOST}:  # none of them had an answer (a cut is no error)
        return f"the Gateway at {target} serves, yet answered no request before the run ended"
    return (
        f"the Gateway at {target} serves, and answered every request with an error (the "
        "table's errors; the router's log says why: <run dir>/logs/router.log)"
    )


def _refused_key_warning(samples: list[Sample], warmup: list[Item], plan: list[Item]) -> str | None:
    """Which tenants' keys the stack refused (UNAUTHENTICATED), by the variable each came
    from, never the key: the errors' count alone did not say which key to fix. Counted as
    the table counts, the measured requests; the warm-up's refusals (not in the table) said
    apart."""
    refused: Counter[str] = Counter()
    in_warmup: Counter[str] = Counter()
    for s in samples:
        if s.code == "UNAUTHENTICATED" and s.index >= 0:
            counter = in_warmup if s.warmup else refused
            counter[(warmup if s.warmup else plan)[s.index].tenant] += 1
    if not refused and not in_warmup:
        return None
    named = "the measured requests: " + ", ".join(
        f"{tenant}'s key ({key_variable(tenant)}): {refused[tenant]}"
        for tenant in sorted(refused.keys() | in_warmup.keys())
    )
    if in_warmup:
        named += f"; and {in_warmup.total()} of the warm-up (not in the table): " + ", ".join(
            f"{tenant}'s {n}" for tenant, n in sorted(in_warmup.items())
        )
    return (
        f"the stack refused requests as UNAUTHENTICATED ({named}): a key it does not know or "
        "has revoked (another stack's demo keys? source that stack's run dir's "
        "demo-keys.env); cachemesh admin keys list shows the stack's keys"
    )


def _cut_warning(cut: int, grace_s: float) -> str:
    requests = "1 request" if cut == 1 else f"{cut} requests"
    was = "was" if cut == 1 else "were"
    when = (
        f"{grace_s:g} s after --duration's end"
        if grace_s
        else "at --duration's end (--stop-grace 0)"
    )
    return (
        f"{requests} still running {when} {was} cut ({CUT}: "
        "results.cut_at_deadline, not an error of the Gateway's, and not in the latency "
        "figures: results.cut_at_deadline_ms has the time each had run, a lower bound); a "
        "longer --stop-grace lets them finish"
    )


def _interrupted_warning(results: dict[str, Any], planned: int) -> str:
    cut = results["errors"].get(INTERRUPTED, 0)
    return (
        f"run interrupted (Ctrl-C) after {results['requests']} of {planned} measured requests: "
        f"the {cut} in flight then were cancelled (counted as {INTERRUPTED}) and the rest not "
        "sent; the report and the request log cover the run until then"
    )


def _warm_warning(requests: int, tokens: int) -> str:
    return (
        f"L2 was warm at start: {requests} model calls read {tokens} prefix-cache tokens "
        "of prefixes no request of this run wrote (an earlier run's: the fresh namespace "
        "isolates L1 only). This run's saving is larger than a cold stack's, and the offline "
        "estimator, which assumes a cold stack, will estimate more than its bill; for "
        "comparable runs, start each with L2 cold: make down; make reset-l2; make up (a "
        "restart alone keeps L2: the stack's Redis holds it), or wait until the prefixes "
        "expire (5 minutes unused, an hour for 1h breakpoints)"
    )


def sent_log(samples: list[Sample], warmup: list[Item], plan: list[Item]) -> list[LogRecord]:
    """The requests that were sent, warm-up first (marked: the estimator leaves them out of its
    totals, as the run's report does), each at the time it was sent (ms from the first) with
    how long after that it ended (and its first token, streamed) and how (its status), as
    the offline estimator replays them: requests that overlapped are replayed concurrently."""
    sent = sorted(
        (s for s in samples if s.index >= 0 and s.code != LOST),  # lost: sent? when? unknown
        key=lambda s: (not s.warmup, s.started_s),
    )
    if not sent:
        return []
    start = sent[0].started_s
    records, last = [], 0.0
    for s in sent:
        began = (s.started_s - start) * 1000.0
        last = max(last, began)  # non-decreasing, as the log requires
        t_ms = round(last, 3)
        latency = round(max(0.0, began + s.latency_s * 1000.0 - t_ms), 3)
        ttft = None
        if s.ttft_s is not None:
            ttft = min(latency, round(max(0.0, began + s.ttft_s * 1000.0 - t_ms), 3))
        item = (warmup if s.warmup else plan)[s.index]
        records.append(LogRecord(t_ms, item, latency, ttft, warmup=s.warmup, code=s.code))
    return records
