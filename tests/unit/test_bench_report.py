"""No secret reaches a bench report: only cachemesh's settings, with keys and tokens masked."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cachemesh.envfile import read_env_file
from services.tools.bench.gateway import output
from services.tools.bench.gateway.redact import MASK, own_settings, setting_names
from services.tools.stack.lifecycle import Stack

FAKE = {
    "CACHEMESH_KEY_A": "cm_fakeKeyOfTenantA0000000000000000000000",
    "CACHEMESH_KEY_B": "cm_fakeKeyOfTenantB0000000000000000000000",
    "CACHEMESH_API_KEY": "cm_fakeClientKey00000000000000000000000",
    "CACHEMESH_INTERNAL_TOKEN": "fake-internal-token-0000000000",
    "AWS_SECRET_ACCESS_KEY": "fakeAwsSecret000000000000",
    "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer fakeBearer0000000",
    "PREFIX_CACHE_REDIS_URL": "redis://bench:fakeRedisPassword000@127.0.0.1:6379/0",
}
SECRETS = [
    "cm_fake",
    "fake-internal-token",
    "fakeAwsSecret",
    "fakeBearer",
    "fakeRedisPassword",
    "fakeDotenvToken",
    "fakeStackKey",
]


def _root(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    (root / ".env").write_text(
        "SEMANTIC_CACHE_THRESHOLD=0.85\nSIM_TIME_SCALE=1.0\nVENDOR_API_TOKEN=fakeDotenvToken000\n"
    )
    return root


def test_a_written_report_holds_no_secret_of_the_environment(tmp_path: Path) -> None:
    root = _root(tmp_path)
    environ = {**FAKE, "HOME": "/home/someone", "SEMANTIC_CACHE_THRESHOLD": "0.9"}
    stack = Stack(root, tmp_path / "run", {"SIM_TIME_SCALE": "0"}, environ=environ)
    names = setting_names(read_env_file(root / ".env"))
    stack_keys = ["fakeStackKey000000000"]
    settings = own_settings(stack.settings(), names, stack_keys)
    overrides = own_settings({"SIM_TIME_SCALE": "0", "MODEL_REPLICAS": "x=fakeStackKey000000000"},
                             names, stack_keys)  # fmt: skip
    doc = output.document(
        run={"levels": [1]}, workload={}, stack=settings, stacks={"zero": overrides},
        results={"cases": {}}, ratios={},
    )  # fmt: skip
    written = output.write(doc, [], tmp_path / "results", "2025-01-01")

    for path in (written, written.with_suffix(".html")):
        text = path.read_text()
        leaked = [s for s in SECRETS if s in text]
        assert not leaked, f"{path.name} holds {leaked}"
        assert "HOME" not in text and "AWS_SECRET_ACCESS_KEY" not in text
    assert settings["SEMANTIC_CACHE_THRESHOLD"] == "0.9"  # the environment's value wins
    assert settings["SIM_TIME_SCALE"] == "0"
    assert settings["CACHEMESH_INTERNAL_TOKEN"] == MASK
    assert settings["VENDOR_API_TOKEN"] == MASK
    assert settings["PREFIX_CACHE_REDIS_URL"] == f"redis://{MASK}@127.0.0.1:6379/0"
    assert "CACHEMESH_KEY_A" not in settings and "OTEL_EXPORTER_OTLP_HEADERS" not in settings
    assert overrides == {"MODEL_REPLICAS": f"x={MASK}", "SIM_TIME_SCALE": "0"}


def test_an_otlp_header_secret_of_dotenv_is_masked_in_the_report(tmp_path: Path) -> None:
    """``.env``'s names are kept: a hosted OTLP backend's key there (as the OpenTelemetry SDK
    reads it) is masked, in the shared settings and in a stack's overrides."""
    root = _root(tmp_path)
    headers = "x-honeycomb-team=hcaik_SECRET123,authorization=Basic dXNlcjpTRUNSRVQ="
    with (root / ".env").open("a") as env:
        env.write(f"OTEL_EXPORTER_OTLP_HEADERS={headers}\n")
    names = setting_names(read_env_file(root / ".env"))
    settings = own_settings(Stack(root, tmp_path / "run", environ={}).settings(), names)
    overrides = own_settings({"OTEL_EXPORTER_OTLP_HEADERS": headers}, names)
    doc = output.document(
        run={"levels": [1]}, workload={}, stack=settings, stacks={"zero-traced": overrides},
        results={"cases": {}}, ratios={},
    )  # fmt: skip
    written = output.write(doc, [], tmp_path / "results", "2025-01-01")
    for path in (written, written.with_suffix(".html")):
        text = path.read_text()
        assert "SECRET" not in text and "dXNl" not in text, path.name
    assert settings["OTEL_EXPORTER_OTLP_HEADERS"] == f"x-honeycomb-team={MASK},authorization={MASK}"


def test_a_second_run_never_replaces_the_first_runs_report(tmp_path: Path) -> None:
    """Named by the local date only, a second ``make bench`` the same day overwrote the first's
    report (minutes of measurement) without a word."""
    morning = datetime(2025, 6, 1, 10, 15, 0, tzinfo=UTC)
    assert output.stamp(morning) == "2025-06-01T101500Z"
    assert output.stamp(morning) != output.stamp(morning + timedelta(seconds=1))
    first = output.write({"run": "first", "ratios": {}}, [], tmp_path, output.stamp(morning))
    second = output.write({"run": "second", "ratios": {}}, [], tmp_path, output.stamp(morning))
    assert first != second and first.name == "bench-2025-06-01T101500Z.json"
    assert json.loads(first.read_text())["run"] == "first"
    assert json.loads(second.read_text())["run"] == "second"
    assert second.with_suffix(".html").exists() and first.with_suffix(".html").exists()


def test_the_http_paths_latencies_are_nearest_rank_as_the_others() -> None:
    """(e) took the median's mean of two and a p99 one rank low: on 1..118 ms, 59.5 and 116
    where every other latency of the report says 59 and 117."""
    from services.tools.bench.gateway.http_path import Point, _summary
    from services.tools.bench.gateway.stacks import Target

    point = Point([ms / 1000 for ms in range(1, 119)], 1.0, 0, 0, None)
    row = _summary(Target("127.0.0.1:1", {}, None, "t"), [point])
    assert row["latency_ms"] == {"p50": 59.0, "p99": 117.0}
