"""A request log's tenant is any string that tells tenants apart ("acme corp", an e-mail
address); the caches refuse a name the key file could not hold, so the estimator replays
such a tenant under a stand-in of its own, still apart from every other tenant."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest

from cachemesh.loadtest.reqlog import LogRecord, write_log
from cachemesh.loadtest.workloads.base import TENANT_A
from services.common.clock import ManualClock
from services.common.keyfile import tenant_error
from services.tools.estimator.cli import main
from services.tools.estimator.offline import OfflineStack
from services.tools.estimator.replay import replay
from services.tools.estimator.tenants import stand_ins
from services.tools.stack.lifecycle import Stack
from tests.unit.test_estimator import _ask

ROOT = Path(__file__).resolve().parents[2]
Q = "How do I reset my password?"
ACME, USER = "acme corp", "user@x.com"


def test_a_tenant_the_caches_refuse_is_replayed_under_a_stand_in_of_its_own() -> None:
    """Was 0 of 6 completed (INVALID_ARGUMENT from semantic-cache and prefix-cache): a repeat
    is an L1 hit for its own tenant only, as for tenants named as the key file names them."""
    stack = OfflineStack(Stack(ROOT, environ={}).settings(), ManualClock())
    records = [
        LogRecord(0, _ask(Q, ACME)),
        LogRecord(1000, _ask(Q, ACME)),
        LogRecord(2000, _ask(Q, USER)),
        LogRecord(3000, _ask(Q, USER)),
        LogRecord(4000, _ask(Q, TENANT_A)),
        LogRecord(5000, _ask(Q, "acme_corp")),  # valid, and not the stand-in of "acme corp"
    ]
    samples = asyncio.run(replay(stack, records))
    assert [s.layer if s.ok else s.code for s in samples] == [
        "model", "semantic_cache", "model", "semantic_cache", "model", "model"
    ]  # fmt: skip


def test_stand_ins_are_valid_stable_and_apart() -> None:
    names = stand_ins([ACME, USER, TENANT_A, ACME, "x" * 65, "a\x00b"])
    assert list(names) == [ACME, USER, "x" * 65, "a\x00b"]  # a valid tenant is kept as logged
    assert len(set(names.values())) == 4 and not any(tenant_error(n) for n in names.values())
    assert stand_ins([USER, ACME]) == {USER: names[USER], ACME: names[ACME]}  # stable
    assert names[ACME].startswith("t-") and len(names[ACME]) == 18
    # a logged tenant already named as the stand-in would be: the stand-in is longer
    taken = stand_ins([names[ACME], ACME])
    assert taken[ACME].startswith(names[ACME]) and len(taken[ACME]) == 34


def test_the_estimator_completes_such_a_log_and_names_its_tenants(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = [LogRecord(i * 1000.0, _ask(Q, (ACME, USER)[i % 2])) for i in range(6)]
    buffer = io.StringIO()
    write_log(buffer, records)
    log, out = tmp_path / "log.jsonl", tmp_path / "estimate.json"
    log.write_text(buffer.getvalue())
    main(["--log", str(log), "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert (results["requests"], results["completed"], results["errors"]) == (6, 6, {})
    names = stand_ins([ACME, USER])
    err = capsys.readouterr().err
    assert f"'acme corp' as {names[ACME]}, 'user@x.com' as {names[USER]}" in err
