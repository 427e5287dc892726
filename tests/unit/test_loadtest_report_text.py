"""cachemesh-load's report says what is true: the billed row counts the stack's model calls,
"is a Gateway running?" only when nothing answered, the target stack's settings (or none),
only secrets masked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cachemesh.loadtest import billed, cli, report
from cachemesh.loadtest.redact import mask
from cachemesh.loadtest.samples import Sample
from cachemesh.loadtest.stats import summarise
from tests.unit.loadtest_cli import cli_env, run_cli  # noqa: F401 (cli_env: a fixture)

pytestmark = pytest.mark.usefixtures("cli_env")


def _billed_results() -> dict[str, Any]:
    done = [Sample("q", "model", "OK", 0.0, 0.5, None) for _ in range(4)]
    results = summarise(done, {})
    results["cost"]["billed"] = {
        "source": "Admin.GetStats (every tenant)", "model_requests": 40, "cost_nanos": 1,
        "baseline_nanos": 2, "saved_nanos": 1, "saved_fraction": 0.5, "errored_cost_nanos": 0,
    }  # fmt: skip
    return results


def test_the_billed_row_counts_the_stacks_model_calls() -> None:
    (row,) = [x for x in report.table(_billed_results()).splitlines() if x.startswith("billed")]
    assert "40 model calls" in row and " 4 " not in row, row


def test_a_gateway_that_answered_every_request_with_an_error_is_not_said_to_be_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refused(target: str, keys: object, warmup: list[Any], plan: list[Any], *_: object,
                **__: object) -> list[Sample]:  # fmt: skip
        return [
            Sample("q", "error", "UNAVAILABLE", 0.0, 0.1, None, index=i) for i in range(len(plan))
        ]

    monkeypatch.setattr(cli, "run_load", refused)
    assert run_cli(tmp_path) == 1
    err = capsys.readouterr().err
    assert "no request completed" in err and "is a Gateway running" not in err, err
    assert "UNAVAILABLE" in err


def test_the_stack_section_is_the_run_dirs_moved_settings_or_unknown(tmp_path: Path) -> None:
    """A FREE_PORTS stack recorded ROUTER_LISTEN 127.0.0.1:50051 (the cwd .env) while the
    target was :34213."""
    env = tmp_path / ".env"
    env.write_text("ROUTER_LISTEN=127.0.0.1:50051\nSIM_TIME_SCALE=0\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "ports.env").write_text("ROUTER_LISTEN=127.0.0.1:34213\n")
    stack, why = cli.target_stack(env, run_dir, "127.0.0.1:34213")
    assert stack["ROUTER_LISTEN"] == "127.0.0.1:34213" and stack["SIM_TIME_SCALE"] == "0"
    assert why is None
    stack, why = cli.target_stack(env, None, "127.0.0.1:34213")
    assert stack == {} and why is not None and "34213" in why and "--run-dir" in why


@pytest.mark.parametrize(
    ("listen", "target", "same"),
    [
        ("0.0.0.0:50051", "127.0.0.1:50051", True),
        ("127.0.0.1:50051", "localhost:50051", True),
        ("[::]:50051", "[::1]:50051", True),
        ("gpu-box.internal:50051", "gpu-box.internal:50051", True),
        # another host on the same port: the cwd .env's local stack is not that one
        ("0.0.0.0:50051", "gpu-box.internal:50051", False),
        ("127.0.0.1:50051", "10.0.0.7:50051", False),
        ("127.0.0.1:50051", "127.0.0.1:50052", False),
    ],
)
def test_the_stack_section_is_the_targets_own_host_and_port(
    tmp_path: Path, listen: str, target: str, same: bool
) -> None:
    """Ports alone were compared: a remote target on the local stack's port got the local
    .env's settings (MODEL_BACKEND=simulator for a GPU box) and no warning."""
    env = tmp_path / ".env"
    env.write_text(f"ROUTER_LISTEN={listen}\nMODEL_BACKEND=simulator\n")
    stack, why = cli.target_stack(env, None, target)
    assert (stack.get("MODEL_BACKEND") == "simulator" and why is None) is same, (stack, why)
    assert (stack == {} and why is not None) is not same


def test_only_secret_named_settings_are_masked() -> None:
    assert mask("CACHEMESH_TOKENIZER_CACHE_TOKENS", "4096") == "4096"
    assert mask("ROUTER_MAX_OUTPUT_TOKENS", "512") == "512"
    # a limit per key, a number of seconds: figures of the run's stack (they were "***")
    for name in ("HTTP_FRONT_MAX_IN_FLIGHT_PER_KEY", "CACHEMESH_API_KEYS_POLL_S",
                 "PROVIDER_AUTH_RECHECK_S"):  # fmt: skip
        assert mask(name, "8") == "8", name
    for name in ("ANTHROPIC_API_KEY", "CACHEMESH_ADMIN_TOKEN", "REDIS_PASSWORD", "APP_SECRET",
                 "GCP_CREDENTIALS", "OPENAI_API_KEY_FILE", "X_AUTH", "HF_TOKEN"):  # fmt: skip
        assert mask(name, "v") == "***", name


@pytest.mark.parametrize(
    "name",
    ["STRIPE_SECRET_KEY_S", "ANTHROPIC_API_KEY_MS", "APP_TOKEN_SECONDS", "SIGNING_PER_KEY",
     "HTTP_FRONT_MAX_IN_FLIGHT_PER_KEY", "CACHEMESH_API_KEYS_POLL_S"],
)  # fmt: skip
def test_a_figures_name_unmasks_a_number_only(name: str) -> None:
    """The exemption of a figure's name (``..._S``, ``..._PER_KEY``) looked at the name only:
    ``STRIPE_SECRET_KEY_S=sk-live-abc`` was printed in clear in the report's ``stack``. A value
    is shown only when it is a number (the figure those names hold)."""
    assert mask(name, "sk-live-abc") == "***"
    assert mask(name, "8") == "8" and mask(name, "0.25") == "0.25"
    assert mask(name, "") == ""


@pytest.mark.parametrize("name", ["VAULT_SECRET_PER_KEY", "SIGNING_TOKEN_PER_TENANT"])
def test_a_secret_word_beside_a_per_unit_stays_masked_even_for_a_number(name: str) -> None:
    """``PER KEY`` is a figure's unit, but SECRET (TOKEN) before it still names a secret: the
    name reads as "the secret per key" (a per-key salt, a PIN) as well as "secrets per key",
    and a number can be a secret (a numeric password or PIN); the name cannot tell, so the
    value stays masked (a hidden figure is the cheaper mistake)."""
    assert mask(name, "8") == "***"


def test_a_report_against_a_moved_stack_records_no_other_stacks_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "none.env").write_text("ROUTER_LISTEN=127.0.0.1:50051\nSIM_TIME_SCALE=0\n")
    run_cli(tmp_path, "--duration", "0.5", "--stop-grace", "0", target="127.0.0.1:34213")
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["stack"] == {}
    assert any("settings are unknown" in w and "127.0.0.1:50051" in w for w in doc["warnings"])
    (tmp_path / ".run").mkdir()
    (tmp_path / ".run" / "ports.env").write_text("ROUTER_LISTEN=127.0.0.1:34213\n")
    run_cli(tmp_path, "--duration", "0.5", "--stop-grace", "0", "--force", target="127.0.0.1:34213")
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["stack"] == {"ROUTER_LISTEN": "127.0.0.1:34213", "SIM_TIME_SCALE": "0"}


def test_a_gateway_that_answered_nothing_before_the_end_is_not_said_to_have_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        run_cli(tmp_path, "--duration", "0.5", "--stop-grace", "0") == 1
    )  # nothing listens at :1; health faked
    err = capsys.readouterr().err
    assert "answered no request before the run ended" in err, err


def test_an_open_loop_whose_first_arrival_fell_after_the_run_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--mode open --rate 1e-300 --duration 5`` sent nothing (the first Poisson arrival is
    due ~1e300 s later) and said the Gateway "serves, yet answered no request before the run
    ended": nothing was asked of it. It says no arrival fell within --duration at --rate."""
    args = ("--mode", "open", "--rate", "1e-300", "--duration", "0.5", "--stop-grace", "0")
    assert run_cli(tmp_path, *args) == 1
    err = capsys.readouterr().err
    assert "answered no request" not in err, err
    assert "no request was sent" in err and "--rate 1e-300" in err and "--duration" in err, err


def _retried_results(errored_cost: int, errors: int = 0) -> dict[str, Any]:
    done = [Sample("q", "model", "OK", 0.0, 0.5, None, cost_nanos=1_000_000) for _ in range(10)]
    failed = [Sample("q", "error", "UNAVAILABLE", 0.0, 0.5, None) for _ in range(errors)]
    results = summarise([*done, *failed], {})
    results["cost"]["billed"] = {
        "source": "Admin.GetStats (every tenant)", "model_requests": 12,
        "cost_nanos": 10_000_000 + errored_cost, "baseline_nanos": 30_000_000,
        "saved_nanos": 20_000_000 - errored_cost, "saved_fraction": 0.6,
        "errored_cost_nanos": errored_cost,
    }  # fmt: skip
    return results


def test_a_bill_above_the_responses_with_no_error_is_said() -> None:
    """Measured: a run whose router was SIGKILLed 5 s in completed all 150 requests (the
    client retried the 8 in flight), its table's total $0.2153 while the stack billed $0.2221
    over 134 model calls for 127 answers (errored_cost_nanos 6,870,950 with 0 errored): no
    warning said why the two differ."""
    said = billed.unanswered_warning(_retried_results(400_000))
    assert said is not None
    assert said.startswith(
        "the stack billed the run $0.0104, $0.0004 (3.8%) more than the completed requests' "
        "responses told, though none ended in an error (12 model calls billed for 10 answers"
    )
    assert billed.unanswered_warning(_retried_results(0)) is None  # the bill is the responses'
    # with errors, errored_warning says where the difference went
    assert billed.unanswered_warning(_retried_results(400_000, errors=1)) is None
    assert billed.unanswered_warning(summarise([], {})) is None  # no totals read


def test_estimated_costs_are_not_said_to_mean_prefix_cache_was_down() -> None:
    """A cost is estimated when prefix-cache had not billed the call as its answer went: down,
    or slower than what the request's deadline left (a short ``--timeout``, a healthy stack:
    the exact bill follows). Both tables said "prefix-cache was unreachable"."""
    from cachemesh.demo.table import LayerTable
    from cachemesh.v1 import gateway_pb2 as pb

    done = [Sample("q", "model", "OK", 0.0, 0.5, None, estimated=True)]
    demo = LayerTable()
    demo.add(pb.CompleteResponse(served_by=pb.LAYER_MODEL, cost=pb.Cost(estimated=True)))
    for text in (report.table(summarise(done, {})), demo.render()):
        (line,) = [x for x in text.splitlines() if "estimated" in x]
        assert "unreachable" not in line and "deadline" in line, line


def test_the_demo_table_does_not_call_the_model_row_full_price() -> None:
    """The demo's LAYER_MODEL row holds the answers no cache read served: the agent's first
    turn writing its prefix (at 1.25 times the input price) and the FAQ's on the small tier
    ("auto": below the baseline's large tier, a saving shown in that row). It was named
    "model, full price" beside its own nonzero saving."""
    from cachemesh.demo.table import LayerTable
    from cachemesh.v1 import gateway_pb2 as pb

    demo = LayerTable()
    cost = pb.Cost(cost_nanos=400, baseline_nanos=1200, saved_nanos=800)
    demo.add(pb.CompleteResponse(served_by=pb.LAYER_MODEL, cost=cost))
    (row,) = [x for x in demo.render().splitlines() if x.startswith("model") and "$0.000001" in x]
    assert "full price" not in row and "no cache read" in row, row


def test_a_unix_socket_target_is_not_told_to_give_the_run_dir_it_gave(tmp_path: Path) -> None:
    """Behind a Unix socket no ROUTER_LISTEN can be matched: the warning told the user to give
    --run-dir, which they had given; it says why the settings are unknown instead."""
    (tmp_path / "ports.env").write_text("ROUTER_LISTEN=127.0.0.1:34213\n")
    stack, why = cli.target_stack(tmp_path / "none.env", tmp_path, "unix:/run/gw.sock")
    assert stack == {} and why is not None
    assert "Unix socket" in why and "give --run-dir" not in why, why


def test_a_run_with_no_completed_request_shows_no_latency_or_saving_figure() -> None:
    """A run interrupted in its warm-up (or whose every request failed) printed an ``all``
    latency row of 0.0 ms at every percentile and "(0.0% saved)": times and a share of
    requests that did not happen."""
    table = report.table(summarise([], {}))
    (latency,) = [x for x in table.splitlines() if x.startswith("all")]
    assert latency.split() == ["all", "0", "-", "-", "-", "-", "-"], latency
    (total,) = [x for x in table.splitlines() if x.startswith("total")]
    assert "% saved" not in total and "no completed request" in total, total
    failed = summarise([Sample("q", "error", "RESOURCE_EXHAUSTED", 0.0, 0.1, None)], {})
    (total,) = [x for x in report.table(failed).splitlines() if x.startswith("total")]
    assert "% saved" not in total and "no completed request" in total, total


def test_a_run_with_completed_requests_keeps_its_figures() -> None:
    table = report.table(_billed_results())
    (latency,) = [x for x in table.splitlines() if x.startswith("all")]
    assert latency.split()[1] == "4" and "-" not in latency.split(), latency
    (total,) = [x for x in table.splitlines() if x.startswith("total")]
    assert "% saved)" in total, total


def test_a_stack_config_that_does_not_exist_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: a mistyped --stack-config was read as no settings: the report's stack held
    only the run dir's ports (18 of the stack's 61 settings), without a word."""
    args = ["--target", "127.0.0.1:1", "--out", str(tmp_path / "r.json"), "--requests", "2"]
    assert cli.main([*args, "--stack-config", str(tmp_path / "typo.env")]) == 2
    err = capsys.readouterr().err
    assert f"--stack-config {tmp_path / 'typo.env'}: no such file" in err, err
    assert not (tmp_path / "r.json").exists()


def test_no_env_file_where_it_is_run_is_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run outside the repository (no .env in the cwd, no --stack-config): the report's stack
    was empty without a word."""
    monkeypatch.chdir(tmp_path)
    args = ["--target", "127.0.0.1:1", "--out", str(tmp_path / "r.json"), "--requests", "2"]
    cli.main([*args, "--duration", "0.5", "--stop-grace", "0"])
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["stack"] == {}
    assert any("settings are not recorded: no .env here" in w for w in doc["warnings"])


def test_a_run_the_stack_billed_nothing_shows_no_billed_share() -> None:
    """A --duration 0.001 run (its one request cut before its model call) printed "(0.0% saved
    over 0 model calls ...)" in the billed row and "the stack billed the run $0.0000 in all
    ($0.0000 for the requests that ended in an error), 0.0% saved" in its warning."""
    results = summarise([Sample("q", "error", "CUT_AT_DEADLINE", 0.0, 0.1, None)], {})
    results["cost"]["billed"] = {
        "source": "Admin.GetStats (every tenant)", "model_requests": 0, "cost_nanos": 0,
        "baseline_nanos": 0, "saved_nanos": 0, "saved_fraction": 0.0, "errored_cost_nanos": 0,
    }  # fmt: skip
    (row,) = [x for x in report.table(results).splitlines() if x.startswith("billed")]
    assert "% saved" not in row and "nothing billed" in row, row
    said = billed.errored_warning(results, None)
    assert said is not None and "% saved" not in said and said.endswith("billed the run nothing")
    # a run the stack billed keeps its share
    (row,) = [x for x in report.table(_billed_results()).splitlines() if x.startswith("billed")]
    assert "50.0% saved over 40 model calls" in row, row
