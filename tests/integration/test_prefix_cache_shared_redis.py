"""Two prefix-cache processes share one real Redis: a prefix made warm through one is read
through the other (PREFIX_CACHE_REDIS_URL), with the same split both would compute; a WARM
through one and the FINAL through the other bill once, and both report the same totals. And
one whose Redis is down (at its start, then stopped and started again) is NOT_SERVING for as
long as it is, SERVING once it answers."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import prefix_cache_pb2 as pc
from cachemesh.v1 import prefix_cache_pb2_grpc
from services.tools.stack.health import SERVING, UNREACHABLE, probe
from services.tools.stack.ports import free_port
from tests.processes import stop_process, stop_processes
from tests.redis_server import redis_server, sync_client_of

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
TOKEN = "shared-redis-test-token-0123456789"
AUTH = (("x-cachemesh-internal", TOKEN),)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    work = tmp_path_factory.mktemp("shared-redis")
    with redis_server(work) as url:
        addresses = [f"127.0.0.1:{free_port()}" for _ in range(2)]
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "services.prefix_cache"],
                cwd=ROOT,
                env={
                    "PATH": "/usr/bin:/bin",
                    "PREFIX_CACHE_LISTEN": address,
                    "PREFIX_CACHE_METRICS_LISTEN": "127.0.0.1:0",  # any free port, each
                    "PREFIX_CACHE_REDIS_URL": url,
                    "CACHEMESH_INTERNAL_TOKEN": TOKEN,
                    "OTEL_TRACES_EXPORTER": "none",
                },
                stdout=(work / f"pc-{i}.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
            for i, address in enumerate(addresses)
        ]
        try:
            deadline = time.monotonic() + 120
            while not all(probe(a, 1.0) == SERVING for a in addresses):
                assert all(p.poll() is None for p in procs), "a prefix-cache process died"
                assert time.monotonic() < deadline, "prefix-cache not SERVING in 120 s"
                time.sleep(0.2)
            yield addresses
        finally:
            stop_processes(procs, 20)


def _request(question: str) -> pb.CompleteRequest:
    system = " ".join(f"Rule {i}: answer from the policy." for i in range(200))
    return pb.CompleteRequest(
        model="sim-large",
        system=[pb.ContentBlock(text=system, cache_control=pb.CacheControl())],
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=question)])],
        max_tokens=20,
    )


def test_a_prefix_warmed_through_one_replica_is_read_through_the_other(
    replicas: list[str],
) -> None:
    one, other = (grpc.insecure_channel(a) for a in replicas)
    with one, other:
        first = prefix_cache_pb2_grpc.PrefixCacheStub(one)
        second = prefix_cache_pb2_grpc.PrefixCacheStub(other)
        warm = first.Commit(
            pc.CommitRequest(
                tenant="t",
                request_id="r1",
                phase=pc.COMMIT_PHASE_WARM,
                model="sim-large",
                request=_request("Rule 3?"),
            ),
            metadata=AUTH,
            timeout=30,
        )
        written = warm.usage.cache_creation_input_tokens
        assert written > 1024 and warm.usage.cache_read_input_tokens == 0
        plan = second.Plan(
            pc.PlanRequest(tenant="t", model="sim-large", request=_request("Rule 4?")),
            metadata=AUTH,
            timeout=30,
        )
        assert plan.usage.cache_read_input_tokens == written
        read = second.Commit(
            pc.CommitRequest(
                tenant="t",
                request_id="r2",
                phase=pc.COMMIT_PHASE_WARM,
                model="sim-large",
                request=_request("Rule 4?"),
            ),
            metadata=AUTH,
            timeout=30,
        )
        assert read.usage.cache_read_input_tokens == written
        isolated = first.Plan(
            pc.PlanRequest(tenant="u", model="sim-large", request=_request("Rule 4?")),
            metadata=AUTH,
            timeout=30,
        )
        assert isolated.usage.cache_read_input_tokens == 0  # another tenant


def _commit(
    stub: prefix_cache_pb2_grpc.PrefixCacheStub, request: pc.CommitRequest
) -> pc.CommitResponse:
    response: pc.CommitResponse = stub.Commit(request, metadata=AUTH, timeout=30)
    return response


def _warm(request_id: str, question: str) -> pc.CommitRequest:
    return pc.CommitRequest(
        tenant="w",
        request_id=request_id,
        phase=pc.COMMIT_PHASE_WARM,
        model="sim-large",
        request=_request(question),
    )


def _final(
    request_id: str, output_tokens: int = 0, report: pc.ProviderUsage | None = None
) -> pc.CommitRequest:
    return pc.CommitRequest(
        tenant="w",
        request_id=request_id,
        phase=pc.COMMIT_PHASE_FINAL,
        output_tokens=output_tokens,
        provider_usage=report,
    )


def _totals(stub: prefix_cache_pb2_grpc.PrefixCacheStub, tenant: str) -> pc.TotalsResponse:
    response: pc.TotalsResponse = stub.Totals(
        pc.TotalsRequest(tenant=tenant), metadata=AUTH, timeout=30
    )
    return response


def test_warm_through_one_replica_final_through_the_other_totals_agree(
    replicas: list[str],
) -> None:
    one, other = (grpc.insecure_channel(a) for a in replicas)
    with one, other:
        first = prefix_cache_pb2_grpc.PrefixCacheStub(one)
        second = prefix_cache_pb2_grpc.PrefixCacheStub(other)
        warm = _commit(first, _warm("r1", "Rule 5?"))
        final = _commit(second, _final("r1", output_tokens=40))
        assert final.usage.input_tokens == warm.usage.input_tokens
        assert final.usage.cache_creation_input_tokens == warm.usage.cache_creation_input_tokens
        # sim-large prices: input 3000, 5-minute write 3750, output 15000 nanos per token
        usage = warm.usage
        cost = usage.input_tokens * 3000 + usage.cache_creation_input_tokens * 3750 + 40 * 15000
        assert final.cost.cost_nanos == cost
        # the retry reaches the first replica: the same bill, not a second one, said to be
        # the recorded one (repeated: its caller counted it on the first reply)
        retried = _commit(first, _final("r1", output_tokens=40))
        assert retried.repeated and not final.repeated
        retried.repeated = False
        assert retried == final
        # a reconciled request, WARM and FINAL again on different replicas
        _commit(second, _warm("r2", "Rule 6?"))
        read = usage.cache_creation_input_tokens
        report = pc.ProviderUsage(
            anthropic=pc.AnthropicUsage(
                input_tokens=50, cache_read_input_tokens=read, output_tokens=7
            )
        )
        reconciled = _commit(first, _final("r2", report=report))
        assert reconciled.reconciled
        totals = _totals(first, "w")
        assert totals == _totals(second, "w")
        assert totals.requests == 2 and totals.reconciled_requests == 1
        assert totals.cost_nanos == cost + reconciled.cost.cost_nanos
        assert totals.usage.output_tokens == 47
        assert totals.usage.cache_read_input_tokens == read
        assert totals.drift.prompt_tokens == reconciled.drift.prompt_tokens
        assert totals.drift.cost_nanos == reconciled.drift.cost_nanos


def _until_health(address: str, status: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until prefix-cache at ``address`` reports ``status`` (its Redis is PINGed every 2 s)."""
    deadline = time.monotonic() + 60
    while (now := probe(address, 1.0)) != status:
        assert proc.poll() is None, f"prefix-cache exited ({proc.returncode}): {log.read_text()}"
        assert time.monotonic() < deadline, f"still {now}, not {status}, after 60 s"
        time.sleep(0.1)


def test_prefix_cache_is_not_serving_while_its_redis_is_down(tmp_path: Path) -> None:
    """Before: prefix-cache restarted while its Redis was down refused to start (exit 2), and
    one running stayed SERVING while every call failed UNAVAILABLE (10 of 10 answers billed at
    the router's estimate). Now it starts NOT_SERVING, is SERVING once Redis answers, NOT_SERVING
    again when Redis stops, and SERVING when it is back, its calls answered again."""
    port, address = free_port(), f"127.0.0.1:{free_port()}"
    log = tmp_path / "pc.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.prefix_cache"],
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "PREFIX_CACHE_LISTEN": address,
            "PREFIX_CACHE_METRICS_LISTEN": "127.0.0.1:0",
            "PREFIX_CACHE_REDIS_URL": f"redis://default:S3cretPassw0rd@127.0.0.1:{port}/0",
            "CACHEMESH_INTERNAL_TOKEN": TOKEN,
            "OTEL_TRACES_EXPORTER": "none",
        },
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while probe(address, 1.0) == UNREACHABLE:  # warming up (its tokenizers)
            assert proc.poll() is None, (
                f"prefix-cache exited ({proc.returncode}): {log.read_text()}"
            )
            assert time.monotonic() < deadline, "prefix-cache not listening in 120 s"
            time.sleep(0.2)
        _until_health(address, "NOT_SERVING", proc, log)
        text = log.read_text()
        assert f"Redis at redis://default:***@127.0.0.1:{port}/0 does not answer" in text
        assert "S3cretPassw0rd" not in text
        for run in ("first", "again"):
            (tmp_path / run).mkdir()
            with redis_server(tmp_path / run, port=port) as url:
                admin = sync_client_of(url)
                try:  # the password its URL gives
                    admin.config_set("requirepass", "S3cretPassw0rd")
                finally:
                    admin.close()
                _until_health(address, SERVING, proc, log)
                with grpc.insecure_channel(address) as channel:
                    stub = prefix_cache_pb2_grpc.PrefixCacheStub(channel)
                    _commit(stub, _warm(f"down-{run}", "Rule 7?"))
            _until_health(address, "NOT_SERVING", proc, log)
            with grpc.insecure_channel(address) as channel:
                stub = prefix_cache_pb2_grpc.PrefixCacheStub(channel)
                with pytest.raises(grpc.RpcError) as failed:
                    _commit(stub, _warm(f"down-{run}-2", "Rule 8?"))
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        stop_process(proc, 20)
