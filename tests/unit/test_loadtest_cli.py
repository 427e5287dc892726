"""``cachemesh-load``'s command line: bad input refused before the run (not after it), secrets
of the stack's env file masked in the report, an empty run an error, the request log what was
sent."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cachemesh.loadtest import billed, cli
from cachemesh.loadtest.load import check_gateway
from cachemesh.loadtest.samples import Sample
from cachemesh.loadtest.workloads import Item
from cachemesh.loadtest.workloads.base import TENANT_A, TENANT_B, user
from cachemesh.v1 import admin_pb2 as adm
from cachemesh.v1 import admin_pb2_grpc
from cachemesh.v1 import gateway_pb2 as pb
from services.tools.stack.ports import free_port
from tests.unit.loadtest_cli import cli_env, stack_config  # noqa: F401 (cli_env: a fixture)

# the runs below are faked (run_load) or meant to reach nothing: the Gateway "is there"
pytestmark = pytest.mark.usefixtures("cli_env")


def _run(tmp_path: Path, *extra: str) -> int:
    args = ["--target", "127.0.0.1:1", "--out", str(tmp_path / "r.json"), "--requests", "2"]
    return cli.main([*args, "--stack-config", str(stack_config(tmp_path)), *extra])


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (("--timeout", "0"), "--timeout must be > 0"),
        # before: taken, every request DEADLINE_EXCEEDED at once (gRPC's deadline overflowed)
        # and the run said 'the Gateway ... answered every request with an error'
        (("--timeout", "inf"), "--timeout must be > 0 seconds, at most 86,400"),
        (("--timeout", "1e300"), "--timeout must be > 0 seconds, at most 86,400"),
        (("--timeout", "nan"), "--timeout must be > 0 seconds, at most 86,400"),
        (("--concurrency", "1", "--processes", "4"), "--processes must be <= --concurrency"),
        # before: taken, and the report held "rate_rps": Infinity (no JSON reader takes it)
        (("--mode", "open", "--rate", "inf"), "--rate must be a number over 0"),
        # before: taken, five million warm-up requests drawn before the run (minutes, memory)
        (("--warmup", "5000000"), "--warmup must be within 0..1000000"),
        (("--chart", "/proc/no/such/x.html"), "cannot write /proc/no/such/x.html"),
        (("--log-out", "/proc/cachemesh-x.jsonl"), "cannot write /proc/cachemesh-x.jsonl"),
    ],
)
def test_bad_input_is_refused_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: tuple[str, ...], said: str
) -> None:
    assert _run(tmp_path, *extra) == 2
    assert said in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--out", "--chart", "--log-out"])
def test_an_existing_report_file_is_refused_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    """An earlier run's report was replaced without a word."""
    earlier = tmp_path / "earlier"
    earlier.write_text("an earlier run's\n")
    args = ["--target", "127.0.0.1:1", "--requests", "2", "--duration", "0.5", "--stop-grace", "0",
            "--stack-config", str(stack_config(tmp_path))]  # fmt: skip
    out = [] if flag == "--out" else ["--out", str(tmp_path / "r.json")]
    assert cli.main([*args, *out, flag, str(earlier)]) == 2
    assert f"{earlier} exists: pass --force to replace it" in capsys.readouterr().err
    assert earlier.read_text() == "an earlier run's\n"
    assert cli.main([*args, *out, flag, str(earlier), "--force"]) == 1  # nothing answered
    assert earlier.read_text() != "an earlier run's\n"


def test_a_key_grpc_cannot_send_is_refused_before_the_run_naming_its_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CACHEMESH_API_KEY", "k")
    monkeypatch.setenv("CACHEMESH_KEY_B", "cm_live_\x1bsecret")
    assert _run(tmp_path) == 2
    err = capsys.readouterr().err
    assert "CACHEMESH_KEY_B must be printable ASCII" in err and "secret" not in err
    assert not (tmp_path / "r.json").exists()


def test_a_malformed_stack_config_is_refused_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.env").write_text("A=1\nexport ONLY_A_NAME\n")
    args = ["--target", "127.0.0.1:1", "--out", str(tmp_path / "r.json")]
    assert cli.main([*args, "--stack-config", str(tmp_path / "bad.env")]) == 2
    assert "--stack-config" in capsys.readouterr().err and not (tmp_path / "r.json").exists()


def test_the_stack_config_in_the_report_has_its_secrets_masked(tmp_path: Path) -> None:
    env = tmp_path / "stack.env"
    env.write_text(
        "ANTHROPIC_API_KEY=sk-ant-SECRET\n"
        "PREFIX_CACHE_REDIS_URL=redis://:hunter2@10.0.0.5:6379/0\n"
        "ROUTER_LIMITS_REDIS_URL=redis://10.0.0.5/1?password=hunter3@x\n"
        "ROUTER_ANSWERS_REDIS_URL=redis://:hunter4@x@10.0.0.5:6379/0\n"
        "SIM_TIME_SCALE=0\n"
    )
    config = cli.stack_config(env)
    assert config["SIM_TIME_SCALE"] == "0" and config["ANTHROPIC_API_KEY"] == "***"
    shown = json.dumps(config)
    assert "hunter" not in shown and "SECRET" not in shown and "@x" not in shown


OTLP_HEADERS = "x-honeycomb-team=hcaik_SECRET123,authorization=Basic dXNlcjpTRUNSRVQ="


def test_an_otlp_header_secret_of_the_stack_config_is_masked_in_the_report(
    tmp_path: Path,
) -> None:
    """A hosted OTLP backend's key (OTEL_EXPORTER_OTLP_HEADERS, as the SDK reads it) and any
    credential pair inside another value are masked; the header names stay (which backend)."""
    (tmp_path / "none.env").write_text(
        f"OTEL_EXPORTER_OTLP_HEADERS={OTLP_HEADERS}\n"
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS=api-key=tracesSECRET\n"
        "OTEL_RESOURCE_ATTRIBUTES=service.name=gw,x-api-key=attrSECRET,team=a\n"
        "VENDOR_URL=https://h.example/v1?x-auth-token=querySECRET&a=1\n"
        "VENDOR_PROXY=authorization=Bearer bearerSECRET\n"
        "SIM_TIME_SCALE=0\n"
    )
    _run(tmp_path, "--duration", "0.5", "--stop-grace", "0")
    stack = json.loads((tmp_path / "r.json").read_text())["stack"]
    assert "SECRET" not in json.dumps(stack) and "dXNl" not in json.dumps(stack)
    assert stack["OTEL_EXPORTER_OTLP_HEADERS"] == "x-honeycomb-team=***,authorization=***"
    assert stack["OTEL_EXPORTER_OTLP_TRACES_HEADERS"] == "api-key=***"
    assert stack["OTEL_RESOURCE_ATTRIBUTES"] == "service.name=gw,x-api-key=***,team=a"
    assert stack["VENDOR_URL"] == "https://h.example/v1?x-auth-token=***&a=1"
    assert stack["SIM_TIME_SCALE"] == "0"


def test_a_run_where_nothing_completed_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Gateway that answers no call: every request cut at the run's end, exit 1, and said
    (the cuts are the run's own, not errors: what fails the run is that none completed)."""
    assert _run(tmp_path, "--duration", "0.5", "--stop-grace", "0") == 1
    assert "no request completed" in capsys.readouterr().err
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert results["completed"] == 0 and results["cut_at_deadline"] == 2


def test_the_request_log_holds_what_was_sent_when_it_was_sent() -> None:
    warmup = [Item("w", TENANT_A, pb.CompleteRequest(messages=[user("warm")]))]
    plan = [Item("q", TENANT_A, pb.CompleteRequest(messages=[user(f"q{i}")])) for i in range(3)]

    def sample(index: int, at: float, warm: bool = False) -> Sample:
        return Sample("q", "model", "OK", at, 0.1, None, warmup=warm, index=index)

    samples = [sample(0, 100.0, warm=True), sample(2, 101.5), sample(0, 100.5)]  # q1 never sent
    log = cli.sent_log(samples, warmup, plan)
    assert [(r.t_ms, r.item.kind) for r in log] == [(0.0, "w"), (500.0, "q"), (1500.0, "q")]
    assert [r.item.request.messages[0].content[0].text for r in log] == ["warm", "q0", "q2"]
    # each with how long it ran (the estimator replays overlapping requests concurrently)
    assert [r.latency_ms for r in log] == [100.0, 100.0, 100.0]
    assert [r.ttft_ms for r in log] == [None, None, None]
    assert [r.warmup for r in log] == [True, False, False]  # the estimator leaves it out


def test_the_request_log_holds_a_streamed_requests_first_token() -> None:
    plan = [Item("q", TENANT_A, pb.CompleteRequest(messages=[user("q")]))]
    log = cli.sent_log([Sample("q", "model", "OK", 5.0, 2.5, 0.25, index=0)], [], plan)
    assert [(r.t_ms, r.latency_ms, r.ttft_ms) for r in log] == [(0.0, 2500.0, 250.0)]


def test_requests_cut_at_the_deadline_have_their_own_latency_figures() -> None:
    """The completed requests' percentiles leave the cut ones out: their run time (a lower
    bound) is reported beside them, so a slow tail shows."""
    from cachemesh.loadtest.samples import CUT
    from cachemesh.loadtest.stats import summarise

    done = [Sample("q", "model", "OK", 0.0, 0.024, None) for _ in range(95)]
    cut = [Sample("q", "error", CUT, 0.0, 3.0, None) for _ in range(5)]
    results = summarise([*done, *cut], {})
    # the run's own cuts: counted apart, not errors of the Gateway's
    assert results["errors"] == {} and results["cut_at_deadline"] == 5
    assert results["latency_ms"]["all"]["max"] == 24.0
    assert results["cut_at_deadline_ms"]["n"] == 5
    assert results["cut_at_deadline_ms"]["max"] == 3000.0
    assert summarise(done, {})["cut_at_deadline_ms"] is None


def test_the_request_log_holds_each_requests_live_status() -> None:
    """So the estimate of the log counts a request that failed live as it ended, not billed."""
    plan = [Item("q", TENANT_A, pb.CompleteRequest(messages=[user(f"q{i}")])) for i in range(2)]
    samples = [
        Sample("q", "model", "OK", 0.0, 0.1, None, index=0),
        Sample("q", "error", "RESOURCE_EXHAUSTED", 0.5, 0.01, None, index=1),
    ]
    assert [r.code for r in cli.sent_log(samples, [], plan)] == ["OK", "RESOURCE_EXHAUSTED"]


def _cached(question: str, model: str = "sim-large") -> pb.CompleteRequest:
    system = pb.ContentBlock(text="You are a support agent. " * 200)
    system.cache_control.SetInParent()
    return pb.CompleteRequest(model=model, system=[system], messages=[user(question)])


def test_l2_reads_of_prefixes_no_request_of_the_run_wrote_are_counted() -> None:
    """The run's namespace scopes L1 only: a read of a prefix that no earlier request of the
    run wrote (for its tenant and model) is a prefix an earlier run left in L2."""
    from cachemesh.loadtest.warm_l2 import reads_not_written

    plan = [
        Item("a", TENANT_A, _cached("q0")),
        Item("a", TENANT_A, _cached("q1")),  # reads q0's write: this run's own
        Item("a", TENANT_B, _cached("q2")),  # another tenant: not written for it in this run
        Item("a", TENANT_A, pb.CompleteRequest(model="sim-large", messages=[user("q3")])),
    ]

    def sample(i: int, at: float, read: int = 0, write: int = 0) -> Sample:
        layer = "prefix_cache" if read else "model"
        return Sample("a", layer, "OK", at, 0.1, None, model="sim-large", cache_read_tokens=read,
                      cache_write_tokens=write, index=i)  # fmt: skip

    cold = [sample(0, 0.0, write=1200), sample(1, 1.0, read=1200), sample(2, 2.0, read=1200)]
    assert reads_not_written(cold, [], plan) == (1, 1200)
    # a warm-up's write is this run's too; a read before any write in the run is not
    warm = [sample(0, 1.0, read=1200), sample(1, 2.0, read=1200), sample(3, 3.0, read=64)]
    assert reads_not_written(warm, [], plan) == (3, 2464)
    warmed = [Sample("w", "model", "OK", 0.0, 0.1, None, model="sim-large",
                     cache_write_tokens=1200, warmup=True, index=0)]  # fmt: skip
    assert reads_not_written([*warmed, *warm[:2]], [plan[0]], plan) == (0, 0)


def test_a_run_that_found_l2_warm_says_so_in_its_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same run twice on one stack: the second reads the first's prefixes (0 written),
    reports a far larger saving, and the estimate of its log (which starts cold) is not its
    bill. The report counts those reads and warns."""

    def answered(target: str, keys: object, warmup: list[Item], plan: list[Item], *_: object,
                 **__: object) -> list[Sample]:  # fmt: skip
        return [
            Sample(
                "s",
                "prefix_cache",
                "OK",
                float(i),
                0.1,
                None,
                model="sim-large",
                cache_read_tokens=1100,
                index=i,
            )
            for i in range(len(plan))
        ]

    monkeypatch.setattr(cli, "run_load", answered)
    assert _run(tmp_path) == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["results"]["l2_warm_at_start"] == {"requests": 2, "read_tokens": 2200}
    (warning,) = doc["warnings"]
    assert "L2 was warm" in warning and "estimator" in warning
    assert "make down; make reset-l2; make up" in warning  # a restart alone keeps L2 warm
    assert "L2 was warm" in capsys.readouterr().err


def _cut_run(target: str, keys: object, warmup: list[Item], plan: list[Item], *_: object,
             before_measured: Callable[[], None] = lambda: None, **__: object,
             ) -> list[Sample]:  # fmt: skip
    """The reviewer's run in small: one answer, the other request cut at its deadline."""
    before_measured()
    return [
        Sample("s", "model", "OK", 0.0, 0.1, None, cost_nanos=46_800, baseline_nanos=217_700,
               index=0),
        Sample("s", "error", "DEADLINE_EXCEEDED", 0.0, 1.2, None, index=1),
    ]  # fmt: skip


def test_a_run_with_errors_warns_that_its_cost_is_the_completed_requests_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """20 of 60 requests ended DEADLINE_EXCEEDED and the table said "78.5% saved" on the 40
    others' cost, 38% of the run's real spend, without a word."""
    monkeypatch.setattr(cli, "run_load", _cut_run)
    assert _run(tmp_path) == 1
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["results"]["cost"]["errored"] == {"requests": 1}
    assert doc["results"]["cost"]["billed"] is None
    (warning,) = doc["warnings"]
    assert "1 of 2 requests ended in an error (DEADLINE_EXCEEDED: 1)" in warning
    assert "the completed requests' only" in warning and "CACHEMESH_ADMIN_TOKEN_FILE" in warning
    out = capsys.readouterr()
    assert warning in out.err and "ended in error" in out.out


def _refused_as_b(
    target: str, keys: object, warmup: list[Item], plan: list[Item], *_: object,
    before_measured: Callable[[], None] = lambda: None, **__: object,
) -> list[Sample]:  # fmt: skip
    """Tenant B's requests refused UNAUTHENTICATED (its key unknown to the stack), A's
    answered."""
    before_measured()
    return [
        Sample("s", "error", "UNAUTHENTICATED", 0.0, 0.01, None, index=i)
        if item.tenant == TENANT_B
        else Sample("s", "model", "OK", 0.0, 0.5, None, index=i)
        for i, item in enumerate(plan)
    ]


def test_a_key_the_stack_does_not_know_is_named_by_its_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run with one tenant's key wrong (an old .run's demo keys) said only that requests
    ended UNAUTHENTICATED, with a warning about cut model calls' bills; it names the variable
    whose key the stack refused (never the key) and how to see the stack's keys."""
    monkeypatch.setattr(cli, "run_load", _refused_as_b)
    monkeypatch.setenv("CACHEMESH_KEY_B", "cm_b-key-never-shown")
    assert _run(tmp_path, "--requests", "20") == 1
    doc = json.loads((tmp_path / "r.json").read_text())
    (said,) = [w for w in doc["warnings"] if "UNAUTHENTICATED" in w and "CACHEMESH_KEY_B" in w]
    assert TENANT_B in said and "cachemesh admin keys list" in said
    assert "CACHEMESH_API_KEY" not in said  # tenant A's was taken
    assert "never-shown" not in capsys.readouterr().err + json.dumps(doc)


def test_the_help_says_what_a_large_plan_holds_in_memory() -> None:
    """--requests and --warmup up to 1,000,000 are drawn whole before the run: an agent
    workload's turn holds ~30 KiB (measured: 30.5 KiB an item over 50,000), ~29 GiB at the
    cap, which the help did not say."""
    text = " ".join(cli.parser().format_help().split())
    for flag in ("--requests", "--warmup"):
        said = text.split(f"{flag} {flag.strip('-').upper()}")[-1][:200]  # its help's line
        assert "held in memory before the run" in said and "29 GiB" in said, said


def _refused_all(
    target: str, keys: object, warmup: list[Item], plan: list[Item], *_: object,
    before_measured: Callable[[], None] = lambda: None, **__: object,
) -> list[Sample]:  # fmt: skip
    """Every request refused UNAUTHENTICATED, the warm-up's too (a stack that knows no key)."""
    refused = [
        Sample("s", "error", "UNAUTHENTICATED", 0.0, 0.01, None, warmup=True, index=i)
        for i in range(len(warmup))
    ]
    before_measured()
    return refused + [
        Sample("s", "error", "UNAUTHENTICATED", 0.0, 0.01, None, index=i) for i in range(len(plan))
    ]


def test_the_refused_key_warning_counts_what_the_table_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The warning counted the warm-up's refusals with the measured ones, not saying so: a
    run of 2 measured requests after 4 of warm-up printed ``errors {'UNAUTHENTICATED': 2}``
    and "refused requests as UNAUTHENTICATED (tenant-a's key (CACHEMESH_API_KEY): 5,
    tenant-b's key (CACHEMESH_KEY_B): 1)", 6 in all. Its counts are the measured requests'
    (the table's); the warm-up's are said apart, as not in the table."""
    monkeypatch.setattr(cli, "run_load", _refused_all)
    assert _run(tmp_path, "--requests", "6", "--warmup", "4") == 1
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["results"]["errors"] == {"UNAUTHENTICATED": 6}
    (said,) = [w for w in doc["warnings"] if "refused requests as UNAUTHENTICATED" in w]
    measured = [int(n) for n in re.findall(r"\): (\d+)", said.split(";")[0])]
    assert sum(measured) == 6, said
    assert "4 of the warm-up (not in the table)" in said, said
    assert said in capsys.readouterr().err


class FakeAdmin(admin_pb2_grpc.AdminServicer):
    """prefix-cache's totals through the router's Admin API: each GetStats reads the next of
    ``reads`` (the last one again once they run out), for the right token only."""

    def __init__(self, reads: list[list[tuple[str, int, int, int]]]) -> None:
        self.reads = reads
        self.calls = 0

    def GetStats(self, request: adm.GetStatsRequest, context: Any) -> adm.GetStatsResponse:
        if ("authorization", "Bearer admin-secret") not in context.invocation_metadata():
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong admin token")
        rows = self.reads[min(self.calls, len(self.reads) - 1)]
        self.calls += 1
        return adm.GetStatsResponse(tenants=[
            adm.TenantStats(tenant=t, model_requests=n, cost_nanos=c, baseline_nanos=b)
            for t, n, c, b in rows
        ])  # fmt: skip


@pytest.fixture
def admin() -> Iterator[tuple[FakeAdmin, str]]:
    fake = FakeAdmin([])  # type: ignore[abstract]  # GetStats only: the others unused
    server = grpc.server(futures.ThreadPoolExecutor(2))
    admin_pb2_grpc.add_AdminServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fake, f"127.0.0.1:{port}"
    server.stop(None)


def test_with_the_admin_token_the_report_has_the_runs_billed_spend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, admin: tuple[FakeAdmin, str],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The stack's totals (every tenant's) before the measured requests and once the bills of
    the cut calls have landed: the cut request's bill, which the client never saw, is in."""
    fake, target = admin
    fake.reads = [
        [("tenant-a", 5, 1_000, 2_000), ("tenant-b", 1, 10, 20)],  # before: settled at once
        [("tenant-a", 5, 1_000, 2_000), ("tenant-b", 1, 10, 20)],
        [("tenant-a", 6, 47_800, 219_700), ("tenant-b", 1, 10, 20)],  # the answer's bill
        [("tenant-a", 7, 123_800, 602_700), ("tenant-b", 1, 10, 20)],  # the cut call's, later
    ]
    token = tmp_path / "admin-token"
    token.write_text("admin-secret\n")
    monkeypatch.setenv("CACHEMESH_ADMIN_TOKEN_FILE", str(token))
    monkeypatch.setattr(cli, "run_load", _cut_run)
    monkeypatch.setattr(billed, "POLL_S", 0.0)  # fake reads: nothing to wait for, and
    monkeypatch.setattr(billed, "QUIET_S", 0.0)  # settled at the first repeated read
    args = ["--target", target, "--out", str(tmp_path / "r.json"), "--requests", "2"]
    assert cli.main([*args, "--stack-config", str(stack_config(tmp_path))]) == 1
    cost = json.loads((tmp_path / "r.json").read_text())["results"]["cost"]
    assert cost["billed"] == {
        "source": "Admin.GetStats (every tenant)",
        "model_requests": 2,
        "cost_nanos": 122_800,
        "baseline_nanos": 600_700,  # model calls only: no L1 hit in this run
        "saved_nanos": 477_900,
        "saved_fraction": round(1 - 122_800 / 600_700, 4),
        "errored_cost_nanos": 76_000,
    }
    out = capsys.readouterr()
    assert "the stack billed the run $0.0001 in all ($0.0001 for the requests that ended" in (
        out.err
    )
    assert "billed (stack)" in out.out and "admin-secret" not in out.out + out.err


def test_an_admin_token_file_that_cannot_be_read_is_refused_before_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CACHEMESH_ADMIN_TOKEN_FILE", str(tmp_path / "missing"))
    assert _run(tmp_path) == 2
    assert "cannot read the admin token file" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_a_wrong_admin_token_costs_only_the_billed_figure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, admin: tuple[FakeAdmin, str],
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    _, target = admin
    monkeypatch.setenv("CACHEMESH_ADMIN_TOKEN", "not-the-token")
    monkeypatch.setattr(cli, "run_load", _cut_run)
    args = ["--target", target, "--out", str(tmp_path / "r.json"), "--requests", "2"]
    assert cli.main([*args, "--stack-config", str(stack_config(tmp_path))]) == 1
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["results"]["cost"]["billed"] is None
    assert any("could not read the stack's billed totals" in w for w in doc["warnings"])
    assert "not-the-token" not in capsys.readouterr().err


def test_the_billed_totals_are_read_once_they_stop_moving() -> None:
    """A cut call's bill lands after the call ended (its FINAL commit): read again until the
    totals are the same for ``QUIET_S``, at most ``MAX_WAIT_S``; no real sleeping here."""
    now = [0.0]
    values = iter([1, 2, 3, 3, 3, 3, 3, 3, 3])
    totals, quiet = billed.settled(
        lambda: billed.Totals(0, next(values), 0),
        sleep=lambda s: now.__setitem__(0, now[0] + s),
        clock=lambda: now[0],
    )
    assert totals.cost_nanos == 3 and quiet and now[0] >= billed.QUIET_S
    moving = iter(range(10**6))
    now[0] = 0.0
    _, quiet = billed.settled(
        lambda: billed.Totals(0, next(moving), 0),
        sleep=lambda s: now.__setitem__(0, now[0] + s),
        clock=lambda: now[0],
    )
    assert not quiet and billed.MAX_WAIT_S <= now[0] <= billed.MAX_WAIT_S + billed.POLL_S


@pytest.fixture()
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    """A gRPC server with grpc.health.v1 only: what answers at the target is up to the test."""
    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def _never_run(*_: object, **__: object) -> list[Sample]:
    raise AssertionError("the run started")


def test_no_gateway_at_the_target_is_refused_before_the_warm_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stack that was not up: silent for --duration, then every request CUT_AT_DEADLINE and a
    warning that cut calls were billed (nothing had reached a stack)."""
    monkeypatch.setattr(cli, "check_gateway", check_gateway)
    monkeypatch.setattr(cli, "run_load", _never_run)
    target = f"127.0.0.1:{free_port()}"
    log = tmp_path / "log.jsonl"
    args = ["--target", target, "--out", str(tmp_path / "r.json"), "--log-out", str(log)]
    assert cli.main([*args, "--warmup", "2", "--stack-config", str(stack_config(tmp_path))]) == 2
    assert capsys.readouterr().err == f"cachemesh-load: no Gateway at {target} (make up?)\n"
    assert not log.exists() and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    ("status", "said"),
    [(None, "serves no Gateway"),  # another service's health (semantic-cache's port)
     (health_pb2.HealthCheckResponse.NOT_SERVING, "is not serving")],
)  # fmt: skip
def test_a_target_that_is_not_a_serving_gateway_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    health_server: tuple[str, health.HealthServicer], status: int | None, said: str,
) -> None:  # fmt: skip
    target, servicer = health_server
    if status is not None:
        servicer.set("cachemesh.v1.Gateway", status)
    monkeypatch.setattr(cli, "check_gateway", check_gateway)
    monkeypatch.setattr(cli, "run_load", _never_run)
    args = ["--target", target, "--out", str(tmp_path / "r.json")]
    assert cli.main([*args, "--stack-config", str(stack_config(tmp_path))]) == 2
    assert said in capsys.readouterr().err


def test_a_serving_gateway_is_run_against(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    health_server: tuple[str, health.HealthServicer],
) -> None:  # fmt: skip
    target, servicer = health_server
    servicer.set("cachemesh.v1.Gateway", health_pb2.HealthCheckResponse.SERVING)
    monkeypatch.setattr(cli, "check_gateway", check_gateway)
    monkeypatch.setattr(cli, "run_load", _cut_run)
    args = ["--target", target, "--out", str(tmp_path / "r.json")]
    assert cli.main([*args, "--stack-config", str(stack_config(tmp_path))]) == 1  # the cut request
    assert (tmp_path / "r.json").exists()
