"""An operator repoints ``auto``'s small tier (CACHEMESH_AUTO_SMALL) and restarts the stack on
the same L1 data directory: the old row's answers are no longer served to ``auto``.

Real processes, two starts on one SEMANTIC_CACHE_DATA_DIR: first ``auto.small`` = sim-small,
then a second simulated small row (sim-small-b, served by the same model process). Before the
router named the rows its tiers resolve to (``accepted_models``), the second start served all
of sim-small's answers from L1 (3 of 3, model sim-small); now each is answered by sim-small-b,
and its answer is then served.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cachemesh import Client
from cachemesh.envfile import read_env_file
from cachemesh.v1 import gateway_pb2 as pb
from tests.integration.harness import ROOT, started_stack

pytestmark = pytest.mark.integration

SMALL_B = """
[models.sim-small-b]
tier = "small"
provider = "simulated"
rules = "anthropic"
source = "the repointed-tier test: a second simulated small model"
input_nanos = 1000
output_nanos = 5000
cache_write_5m_nanos = 1250
cache_write_1h_nanos = 2000
cache_read_nanos = 100
min_cacheable_tokens = 1024
context_window_tokens = 200000
max_output_tokens = 64000
prefill_tokens_per_s = 12000.0
decode_tokens_per_s = 180.0
"""
QUESTIONS = (
    "What are your opening hours on Sundays?",
    "How do I change the email address on my account?",
    "Can I bring my dog on the plane?",
)


def ask(question: str) -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model="auto",
        max_tokens=200,
        temperature=0.0,
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=question)])],
        routing=pb.RoutingOptions(threshold=1.0),  # the small tier, whatever the score
    )


def answers(run_dir: Path, data_dir: Path, small: str) -> list[tuple[int, str]]:
    """(served_by, model) of each question, asked twice, on a stack whose auto.small is
    ``small``."""
    table = run_dir / "models.toml"
    packaged = (ROOT / "services/common/models.toml").read_text(encoding="utf-8")
    table.write_text(packaged.replace("[auto]", SMALL_B + "\n[auto]"), encoding="utf-8")
    replicas = read_env_file(ROOT / ".env")["MODEL_REPLICAS"]  # moved to free ports
    one = next(item for item in replicas.split(",") if item.startswith("sim-small="))
    replicas += "," + one.replace("sim-small=", "sim-small-b=")  # the same model process
    extra = {
        "CACHEMESH_MODELS_FILE": str(table),
        "CACHEMESH_AUTO_SMALL": small,
        "MODEL_IDS": "sim-small,sim-small-b,sim-large",
        "SEMANTIC_CACHE_DATA_DIR": str(data_dir),
    }
    environ = {**os.environ, "MODEL_REPLICAS": replicas}
    seen: list[tuple[int, str]] = []
    with started_stack(run_dir, extra, environ=environ) as (runner, _):
        key = read_env_file(run_dir / "demo-keys.env")["CACHEMESH_KEY_A"]
        with Client(runner.router_address, api_key=key) as client:
            for question in QUESTIONS:
                for _ in range(2):
                    reply = client.complete(ask(question))
                    seen.append((reply.served_by, reply.model))
    return seen


def test_a_repointed_small_tier_is_not_served_the_old_rows_answers(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    run_dir = tmp_path_factory.mktemp("repointed-tier")
    data_dir = tmp_path_factory.mktemp("repointed-tier-l1")
    first = answers(run_dir, data_dir, "sim-small")
    l1, model = pb.LAYER_SEMANTIC_CACHE, pb.LAYER_MODEL
    assert [served for served, _ in first] == [model, l1] * 3
    assert {name for _, name in first} == {"sim-small"}
    second = answers(run_dir, data_dir, "sim-small-b")
    # each question answered by the new row first (not served sim-small's), then served
    assert [served != l1 for served, _ in second] == [True, False] * 3, second
    assert {name for _, name in second} == {"sim-small-b"}, second
