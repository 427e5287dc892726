"""A hung model replica on real processes: its own supervised stack (sim-large served by
``model`` and ``model-2``), ``model-2`` stopped with SIGSTOP as a hung engine is. Requests with
a client deadline keep being answered by ``model``: a call to the hung replica that has no
first report far past its predicted prefill is abandoned (billed to no one: a simulated or
self-hosted engine bills nothing before its first token, and the router bills only from it)
and the request handed over, instead of waiting out the client's deadline until the replica
is ejected. A call the hung replica was already decoding (mid-answer) is cut once it has been
silent for ``ROUTER_MID_ANSWER_STALL_S`` and its Complete answered by the other replica, the cut
call billed for what it produced; the last replica an ``auto`` request has left is not."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cachemesh import CachemeshError, Client, build_request
from cachemesh.v1 import gateway_pb2 as pb
from services.common.channels import KEEPALIVE_TIMEOUT_MS
from tests.integration.harness import prefix_totals, started_stack, stoppable

pytestmark = pytest.mark.integration

DEADLINE_S = 5.0  # the client's: sooner than the router's ROUTER_MODEL_TIMEOUT_S
ASKED = 8


def _ask(client: Client, question: str) -> str:
    request = build_request(question, model="sim-large", max_tokens=16)
    request.cache.semantic = pb.SEMANTIC_MODE_BYPASS
    try:
        client.complete(request)
    except CachemeshError as error:
        return error.code.name
    return "answered"


def test_a_hung_replicas_requests_are_handed_over_within_the_clients_deadline(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    with started_stack(run_dir, {"OTEL_TRACES_EXPORTER": "none"}) as (stack, _sink):
        stopped = stoppable(stack, run_dir, "model-2", DEADLINE_S)
        client, token = stopped.client, stopped.token
        tag = uuid.uuid4().hex[:8]
        with client:
            for i in range(4):  # both replicas answer: their prefill rates are measured
                assert _ask(client, f"{tag} warm-up {i}: how do I reset it?") == "answered"
            before = prefix_totals(stack.addresses["prefix-cache"], token, "tenant-a")
            outcomes = stopped.while_hung(
                lambda: [
                    _ask(client, f"{tag} question {i}: how do I reset it?") for i in range(ASKED)
                ]
            )
        print(f"\nwith model-2 hung: {outcomes}")
        assert outcomes == ["answered"] * ASKED  # was DEADLINE_EXCEEDED until it was ejected
        after = prefix_totals(stack.addresses["prefix-cache"], token, "tenant-a")
        assert after.requests - before.requests == ASKED  # each billed once: no abandoned call


AUTO_DEADLINE_S = 6.0
AUTO_ASKED = 6


def test_a_hung_one_replica_tier_hands_auto_requests_to_the_next_tier(tmp_path: Path) -> None:
    """The shipped layout: sim-small on ``model`` alone, sim-large on ``model`` and ``model-2``.
    ``model`` hung: an ``auto`` request the router sends to the small tier (its own
    ``routing.threshold`` 1.0) is answered by sim-large within the client's deadline, before
    and after the hung replica is ejected (each waited out the whole deadline there, its
    tier's one replica taken for the request's last: DEADLINE_EXCEEDED)."""
    run_dir = tmp_path / "run"
    with started_stack(run_dir, {"OTEL_TRACES_EXPORTER": "none"}) as (stack, _sink):
        stopped = stoppable(stack, run_dir, "model", AUTO_DEADLINE_S)
        tag = uuid.uuid4().hex[:8]

        def ask(i: int) -> str:
            request = build_request(
                f"{tag} question {i}: how do I reset it?",
                max_tokens=32,
                semantic=pb.SEMANTIC_MODE_BYPASS,
            )
            request.routing.threshold = 1.0  # every score is below it: the small tier
            try:
                answer = stopped.client.complete(request)
            except CachemeshError as error:
                return error.code.name
            return f"{answer.tier} {answer.model}"

        with stopped.client:
            assert ask(-1) == "small sim-small"  # both models answer on `model` meanwhile
            outcomes = stopped.while_hung(lambda: [ask(i) for i in range(AUTO_ASKED)])
        print(f"\nsmall-routed auto requests with `model` hung: {outcomes}")
        assert outcomes == ["large sim-large"] * AUTO_ASKED


MID_DEADLINE_S = 20.0  # the client's: the hang outlasts it (model-2 stays stopped until all end)
LONG_ANSWER_TOKENS = 80  # the simulator's answers are 20-120 tokens long, by the prompt's seed


def _long_questions(client: Client, pool: ThreadPoolExecutor, tag: str, wanted: int) -> list[str]:
    """At least ``wanted`` questions whose answers are at least ``LONG_ANSWER_TOKENS`` long
    (the simulator answers the same prompt the same), asked ``ASKED`` at a time."""
    long: list[str] = []
    asked = 0
    while len(long) < wanted:
        batch = [f"{tag} warm-up {asked + i}: explain it" for i in range(ASKED)]
        asked += ASKED
        for question, answer in zip(
            batch, pool.map(lambda q: _complete(client, q), batch), strict=True
        ):
            assert not isinstance(answer, str), answer
            if answer.usage.output_tokens >= LONG_ANSWER_TOKENS:
                long.append(question)
        assert asked <= 20 * ASKED, "the simulator's answers are all short"
    return long


def _complete(client: Client, question: str) -> pb.CompleteResponse | str:
    request = build_request(question, model="sim-large", max_tokens=200)
    request.cache.semantic = pb.SEMANTIC_MODE_BYPASS
    try:
        return client.complete(request)
    except CachemeshError as error:
        return error.code.name


def _model_metrics(address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("model") == "sim-large"
    }


def test_a_replica_hung_mid_answer_hands_its_complete_calls_to_the_other_replica(
    tmp_path: Path,
) -> None:
    """sim-large on two replicas, chosen in turn (round robin); eight Complete calls with long
    answers (1.1-1.7 s of decode at SIM_TIME_SCALE 1), model-2 stopped once its four have their
    first token and some are still decoding, and kept stopped until every call has ended:
    each call is answered (the hung replica's calls cut after 1 s of silence and run again on
    ``model``, not left to the client's 20 s deadline), and the cut calls are billed too."""
    run_dir = tmp_path / "run"
    extra = {
        "OTEL_TRACES_EXPORTER": "none",
        "SIM_TIME_SCALE": "1",
        "SIM_SPECULATIVE": "false",
        "ROUTER_REPLICA_POLICY": "round_robin",
        "ROUTER_MID_ANSWER_STALL_S": "1",
    }
    with started_stack(run_dir, extra) as (stack, _sink):
        stopped = stoppable(stack, run_dir, "model-2", MID_DEADLINE_S)
        client, token, pid = stopped.client, stopped.token, stopped.pid
        metrics = stack.metrics_addresses["model-2"]
        tag = uuid.uuid4().hex[:8]
        with client, ThreadPoolExecutor(ASKED) as pool:
            # questions whose answers are long (the same prompt, the same answer)
            long = _long_questions(client, pool, tag, ASKED)
            before = prefix_totals(stack.addresses["prefix-cache"], token, "tenant-a")
            first_tokens = "cachemesh_model_time_to_first_token_seconds_count"
            started = _model_metrics(metrics).get(first_tokens, 0.0)
            calls = [pool.submit(_complete, client, question) for question in long[:ASKED]]
            try:
                waited = time.monotonic() + 10
                while True:  # model-2's four calls have their first token, some still decode
                    now = _model_metrics(metrics)
                    if now.get(first_tokens, 0.0) - started >= ASKED // 2:
                        in_flight = now.get("cachemesh_model_in_flight", 0.0)
                        break
                    assert time.monotonic() < waited, "model-2 was not given its calls"
                    time.sleep(0.02)  # the next look
                os.kill(pid, signal.SIGSTOP)
                outcomes = [call.result() for call in calls]
            finally:
                os.kill(pid, signal.SIGCONT)
        codes = [a if isinstance(a, str) else "answered" for a in outcomes]
        print(f"\nmodel-2 hung with {in_flight:.0f} calls decoding: {codes}")
        assert in_flight >= 1, "model-2 had ended its answers before it was stopped"
        assert codes == ["answered"] * ASKED  # was DEADLINE_EXCEEDED after 20 s
        after = prefix_totals(stack.addresses["prefix-cache"], token, "tenant-a")
        # each answer billed once, and each cut call for what it produced (its own commit)
        billed = after.requests - before.requests
        assert ASKED + 1 <= billed <= ASKED + in_flight, (billed, in_flight)


# model-2 stopped mid-answer: past the silence allowed (50 chunk gaps: a cut came at 2.7-3.0 s),
# within the router's channel's wait for a ping's answer (a stopped peer answers none: the
# connection was dropped 5.2-5.4 s after the stop, the call UNAVAILABLE). A replica merely busy
# answers its pings: gRPC's own threads do, with the model service's GIL held or loop blocked.
PAUSE_S = KEEPALIVE_TIMEOUT_MS / 1000 - 1.0


def test_an_auto_request_for_the_large_tier_alone_waits_for_its_last_replica(
    tmp_path: Path,
) -> None:
    """sim-large on ``model-2`` alone; an ``auto`` request with ``routing.threshold`` -1
    accepts only the large tier's answer, so ``model-2`` is its last replica: stopped once the
    call has its first token, for ``PAUSE_S``, then resumed, it answers in full (it was cut
    as silent mid-answer: UNAVAILABLE, "went silent mid-answer", where a request for
    model=sim-large was waited for). Stopped for longer than the channel waits for a ping's
    answer it is taken for dead, as a killed peer is: UNAVAILABLE, "failed mid-answer"."""
    run_dir = tmp_path / "run"
    environ = {
        **os.environ,
        "MODEL_REPLICAS": "sim-small=127.0.0.1:50054,sim-large=127.0.0.1:50055",
    }
    extra = {
        "OTEL_TRACES_EXPORTER": "none",
        "SIM_TIME_SCALE": "1",
        "SIM_SPECULATIVE": "false",
        "ROUTER_MID_ANSWER_STALL_S": "0.5",
    }
    with started_stack(run_dir, extra, environ=environ) as (stack, _sink):
        stopped = stoppable(stack, run_dir, "model-2", MID_DEADLINE_S + PAUSE_S)
        client, pid = stopped.client, stopped.pid
        metrics = stack.metrics_addresses["model-2"]
        tag = uuid.uuid4().hex[:8]
        with client, ThreadPoolExecutor(ASKED) as pool:
            long = _long_questions(client, pool, tag, 1)[0]
            request = build_request(long, max_tokens=200, semantic=pb.SEMANTIC_MODE_BYPASS)
            request.routing.threshold = -1.0  # the large tier's answer alone

            def ask() -> pb.CompleteResponse | str:
                try:
                    return client.complete(request)
                except CachemeshError as error:
                    return str(error)

            first_tokens = "cachemesh_model_time_to_first_token_seconds_count"
            started = _model_metrics(metrics).get(first_tokens, 0.0)
            call = pool.submit(ask)
            try:
                waited = time.monotonic() + 10
                while True:  # the call has its first token, and decodes on
                    now = _model_metrics(metrics)
                    if now.get(first_tokens, 0.0) > started:
                        in_flight = now.get("cachemesh_model_in_flight", 0.0)
                        break
                    assert time.monotonic() < waited, "model-2 was not given the call"
                    time.sleep(0.02)  # the next look
                os.kill(pid, signal.SIGSTOP)
                time.sleep(PAUSE_S)  # the hang the router sees: no chunk, no sign of life
            finally:
                os.kill(pid, signal.SIGCONT)
            answer = call.result()
    outcome = answer if isinstance(answer, str) else "answered"
    print(f"\nmodel-2 stopped {PAUSE_S} s with {in_flight:.0f} call decoding: {outcome}")
    assert in_flight >= 1, "model-2 had ended its answer before it was stopped"
    assert not isinstance(answer, str), answer
    assert (answer.tier, answer.model) == ("large", "sim-large")
    assert answer.usage.output_tokens >= LONG_ANSWER_TOKENS  # in full, not cut
