"""The run's spend as the stack billed it: prefix-cache's durable totals, every tenant's, read
through the router's Admin API (``GetStats``, the admin token) before the measured requests and
once the run's bills have landed.

A response carries its cost, so the report's ``cost`` is what the completed requests were
told. A request that ended in an error (its deadline passed, it was cancelled, its replica cut)
has no response, yet its model call, once past the prefill, is billed for what it produced: on
a run with a short ``--timeout`` that was 62% of the spend. The totals count those bills too.
They count every tenant's model calls: other traffic on the stack during the run is in them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cachemesh._errors import CachemeshError
from cachemesh._tls import Tls
from cachemesh.admin import AdminClient, read_admin_token
from cachemesh.loadtest.samples import CUT, Sample

POLL_S = 0.25  # between two reads of the totals
QUIET_S = 1.0  # settled: unchanged this long (a cut call's bill lands after the call ends)
MAX_WAIT_S = 15.0  # the longest the totals are waited for
SOURCE = "Admin.GetStats (every tenant)"


class BilledUnavailable(Exception):
    """The totals could not be read (no Admin API, a wrong token, prefix-cache down)."""


@dataclass(frozen=True)
class Totals:
    model_requests: int
    cost_nanos: int
    baseline_nanos: int


def admin_token(environ: Mapping[str, str] = os.environ) -> str | None:
    """The admin token, as ``cachemesh admin`` reads it (``CACHEMESH_ADMIN_TOKEN_FILE``, which
    ``source .run/demo-keys.env`` sets, else ``CACHEMESH_ADMIN_TOKEN``); None: not given. A
    file that cannot be read is a ValueError (before the run)."""
    return read_admin_token(environ.get("CACHEMESH_ADMIN_TOKEN_FILE", "").strip(), environ)


class StackTotals:
    """Reads the totals of every tenant through the router's Admin API at ``target``."""

    def __init__(
        self, target: str, token: str, timeout_s: float = 5.0, tls: Tls | None = None
    ) -> None:
        self._target = target
        self._token = token
        self._timeout_s = timeout_s
        self._tls = tls

    def __call__(self) -> Totals:
        try:
            with AdminClient(
                self._target, admin_token=self._token, tls=self._tls, timeout_s=self._timeout_s
            ) as client:
                reply = client.stats()
        except (CachemeshError, ValueError) as exc:
            raise BilledUnavailable(str(exc)) from None
        # every page of tenants (client.stats follows them); the totals are prefix-cache's
        # alone: semantic-cache not answering leaves them whole
        if "prefix-cache" in reply.unavailable:
            unknown = sum(1 for t in reply.tenants if "prefix-cache" in t.unavailable)
            raise BilledUnavailable(
                f"prefix-cache did not answer (the totals of {unknown or 'some'} of "
                f"{len(reply.tenants)} tenants unknown)"
            )
        rows = reply.tenants
        return Totals(
            sum(t.model_requests for t in rows),
            sum(t.cost_nanos for t in rows),
            sum(t.baseline_nanos for t in rows),
        )


def settled(
    read: Callable[[], Totals],
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[Totals, bool]:
    """The totals once unchanged for ``QUIET_S`` (read every ``POLL_S``), and whether they
    settled within ``MAX_WAIT_S`` (False: the last read, still moving)."""
    start = changed = clock()
    last = read()
    while True:
        sleep(POLL_S)
        current, now = read(), clock()
        if current != last:
            last, changed = current, now
        elif now - changed >= QUIET_S:
            return last, True
        if now - start >= MAX_WAIT_S:
            return last, False


def figures(before: Totals, after: Totals, measured: Sequence[Sample]) -> dict[str, Any]:
    """``results.cost.billed``: the run's billed spend (the totals' growth), its baseline (the
    model calls' from the totals, the L1 hits' from their responses: a hit makes no model
    call), and the part of the spend no response told (the requests that ended in an error)."""
    cost = after.cost_nanos - before.cost_nanos
    l1_baseline = sum(s.baseline_nanos for s in measured if s.layer == "semantic_cache")
    baseline = after.baseline_nanos - before.baseline_nanos + l1_baseline
    told = sum(s.cost_nanos for s in measured if s.ok)
    return {
        "source": SOURCE,
        "model_requests": after.model_requests - before.model_requests,
        "cost_nanos": cost,
        "baseline_nanos": baseline,
        "saved_nanos": baseline - cost,
        "saved_fraction": round(1 - cost / baseline, 4) if baseline else 0.0,
        "errored_cost_nanos": cost - told,
    }


def errored_warning(results: Mapping[str, Any], billed_unread: str | None) -> str | None:
    """What a reader of the table must know when some requests ended in an error."""
    errored = results["cost"]["errored"]["requests"]
    if not errored:
        return None
    ended = [f"{code}: {n}" for code, n in results["errors"].items()]
    if cut := results.get("cut_at_deadline"):  # the run's own cut at its end: no answer either
        ended.append(f"{CUT}: {cut}, cut at the run's end")
    how = "ended in an error" if not cut else "ended in an error or were cut"
    said = (
        f"{errored} of {results['requests']} requests {how} ({', '.join(ended)}): a model "
        "call cut after its prefill is billed for what it produced, which no response tells "
        "the client, so the table's cost and saving are the completed requests' only"
    )
    billed = results["cost"]["billed"]
    if billed is not None and not (billed["cost_nanos"] or billed["baseline_nanos"]):
        # not "$0.0000 in all ($0.0000 for ...), 0.0% saved": a share of nothing
        return f"{said}; the stack billed the run nothing"
    if billed is not None:
        return (
            f"{said}; the stack billed the run {_usd(billed['cost_nanos'])} in all "
            f"({_usd(billed['errored_cost_nanos'])} for the requests that ended in an error), "
            f"{billed['saved_fraction']:.1%} saved"
        )
    if billed_unread is not None:
        return f"{said}; the run's billed spend is unknown ({billed_unread})"
    return (
        f"{said}; for the run's billed spend give cachemesh-load the admin token "
        "(CACHEMESH_ADMIN_TOKEN_FILE, as `source .run/demo-keys.env` sets it, or "
        "CACHEMESH_ADMIN_TOKEN)"
    )


def unanswered_warning(results: Mapping[str, Any]) -> str | None:
    """What a reader must know when the stack billed more than the responses told though no
    request ended in an error: model calls whose answer never reached the client were billed
    (a request in flight when its router died, or its connection broke, is billed for what its
    call produced, and the client's retry is a new model call, billed for itself; other
    traffic on the stack during the run is in the totals too). The table's total is then
    below the run's spend, with no word why (a router killed mid-run: 3.2% below)."""
    billed = results["cost"]["billed"]
    if billed is None or results["cost"]["errored"]["requests"]:
        return None  # none read, or errored_warning says where the difference went
    extra = billed["errored_cost_nanos"]
    if extra <= 0:
        return None
    answers = sum(results["served_by"].get(layer, 0) for layer in ("prefix_cache", "model"))
    return (
        f"the stack billed the run {_usd(billed['cost_nanos'])}, {_usd(extra)} "
        f"({extra / billed['cost_nanos']:.1%}) more than the completed requests' responses "
        f"told, though none ended in an error ({billed['model_requests']} model calls billed "
        f"for {answers} answers that made one): model calls whose answer never reached the "
        "client were billed too (a request in flight when its router died or its connection "
        "broke is billed for what it produced, and the client's retry is a new model call), "
        "or other traffic on the stack ran during the run; results.cost.billed is the spend"
    )


def _usd(nanos: int) -> str:
    return f"${nanos / 1e9:,.4f}"
