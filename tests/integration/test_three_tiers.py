"""Three tiers through the running stack: a model table with a simulated medium model between
sim-small and sim-large (CACHEMESH_MODELS_FILE, CACHEMESH_AUTO_TIERS), served by the model
replica (MODEL_IDS) and routed by the learned router's score bands, cost-aware."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from cachemesh import Client
from cachemesh.envfile import read_env_file
from cachemesh.v1 import gateway_pb2 as pb
from tests.integration.harness import ROOT, RunningStack, router_spans, started_stack

pytestmark = pytest.mark.integration

MEDIUM = """
[models.sim-medium]
tier = "medium"
provider = "simulated"
rules = "anthropic"
source = "the three-tier test: a simulated model priced halfway from sim-small to sim-large"
input_nanos = 2000
output_nanos = 10000
cache_write_5m_nanos = 2500
cache_write_1h_nanos = 4000
cache_read_nanos = 200
min_cacheable_tokens = 1024
context_window_tokens = 200000
max_output_tokens = 64000
prefill_tokens_per_s = 8000.0
decode_tokens_per_s = 120.0
"""
MATH = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether in April and May?"
)


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    run_dir = tmp_path_factory.mktemp("three-tiers")
    table = run_dir / "models.toml"
    packaged = (ROOT / "services/common/models.toml").read_text(encoding="utf-8")
    table.write_text(packaged.replace("[auto]", MEDIUM + "\n[auto]"), encoding="utf-8")
    replicas = read_env_file(ROOT / ".env")["MODEL_REPLICAS"]  # moved to free ports
    small = next(item for item in replicas.split(",") if item.startswith("sim-small="))
    replicas += "," + small.replace("sim-small=", "sim-medium=")  # the same model process
    extra = {
        "CACHEMESH_MODELS_FILE": str(table),
        "CACHEMESH_AUTO_TIERS": "medium=sim-medium",
        "MODEL_IDS": "sim-small,sim-medium,sim-large",
        "ROUTER_COST_AWARE": "true",
    }
    environ = {**os.environ, "MODEL_REPLICAS": replicas}
    with started_stack(run_dir, extra, environ=environ) as (runner, sink):
        demo = read_env_file(run_dir / "demo-keys.env")
        yield RunningStack(
            target=runner.router_address,
            addresses=runner.addresses,
            keys={"tenant-a": demo["CACHEMESH_KEY_A"], "tenant-b": demo["CACHEMESH_KEY_B"]},
            internal_token=(run_dir / "internal-token").read_text().strip(),
            sink=sink,
            stack=runner,
        )


@pytest.fixture
def client(three: RunningStack) -> Iterator[Client]:
    with Client(three.target, api_key=three.keys["tenant-a"]) as client:
        yield client


def _ask(
    question: str, threshold: float, *, system: str = "", history: tuple[pb.Message, ...] = ()
) -> pb.CompleteRequest:
    request = pb.CompleteRequest(
        model="auto",
        max_tokens=16,
        messages=[
            *history,
            pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=question)]),
        ],
        cache=pb.CacheOptions(semantic=pb.SEMANTIC_MODE_BYPASS),
        routing=pb.RoutingOptions(threshold=threshold),
    )
    if system:
        request.system.append(pb.ContentBlock(text=system, cache_control=pb.CacheControl()))
    return request


def test_each_band_of_the_score_goes_to_its_tier(client: Client, three: RunningStack) -> None:
    probe = client.complete(_ask(MATH, -1.0))
    score = probe.routing.score
    assert (probe.tier, probe.model) == ("large", "sim-large")
    assert 0.0 < score < 0.5, "the thresholds below assume a positive score under 0.5"
    # sim-medium is priced halfway: its threshold is derived as half the large tier's
    medium = client.complete(_ask(MATH, 1.5 * score))
    assert (medium.tier, medium.model) == ("medium", "sim-medium"), medium.routing.reason
    assert "in the medium band" in medium.routing.reason
    assert "medium" in medium.routing.reason and "(derived)" in medium.routing.reason
    assert medium.routing.threshold == pytest.approx(0.75 * score, rel=1e-6)
    assert client.complete(_ask(MATH, 0.5 * score)).tier == "large"
    small = client.complete(_ask(MATH, 1.0))
    assert (small.tier, small.model) == ("small", "sim-small")
    root, chat = router_spans(three.sink, medium.trace_id)
    assert root.attributes["cachemesh.tier"] == "medium"
    assert root.attributes["cachemesh.routing.reason"] == medium.routing.reason
    assert chat.name == "chat sim-medium"


def test_a_conversation_warm_on_the_medium_tier_stays_there(client: Client) -> None:
    def system() -> str:
        rules = " ".join(f"Rule {i}: a checked bag over 23 kg costs a fee." for i in range(150))
        return f"Support desk {uuid.uuid4().hex}. {rules}"

    question = "What does a 25 kg bag cost?"
    score = client.complete(_ask(question, -1.0)).routing.score
    assert score > 0.0
    warm = system()
    first = client.complete(_ask(question, 1.5 * score, system=warm))
    assert first.tier == "medium", first.routing.reason  # every tier cold: the plain bands
    history = (
        pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=question)]),
        pb.Message(role=pb.ROLE_ASSISTANT, content=first.content),
    )
    # alone (a prefix cold everywhere) the request's threshold of 1 sends it to the small tier
    cold = client.complete(_ask("And a 30 kg one?", 1.0, system=system()))
    assert cold.tier == "small", cold.routing.reason
    kept = client.complete(_ask("And a 30 kg one?", 1.0, system=warm, history=history))
    assert (kept.tier, kept.model) == ("medium", "sim-medium"), kept.routing.reason
    assert "kept on the medium tier" in kept.routing.reason
    assert kept.routing.base_threshold == pytest.approx(1.0)
    assert kept.usage.cache_read_input_tokens > 0
