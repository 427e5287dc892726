"""One real stack for the integration tests: five processes on free loopback ports.

It is started by the same runner as ``make up`` (``services.tools.stack``), in a temporary run dir
with its own keys, the simulator's sleeps scaled down, the cost-aware tier rule on, and traces
exported over OTLP/gRPC to a receiver in this test process.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cachemesh import Client
from cachemesh.envfile import read_env_file
from tests.integration.harness import RunningStack, started_stack
from tests.integration.provider_stack import ProviderStack, provider_stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    run_dir = tmp_path_factory.mktemp("run")
    # the cost-aware tier rule (off by default) on: test_learned_routing keeps a conversation
    # warm on the large model there, with the reason given
    with started_stack(run_dir, {"ROUTER_COST_AWARE": "true"}) as (runner, sink):
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
def client_a(stack: RunningStack) -> Iterator[Client]:
    with Client(stack.target, api_key=stack.keys["tenant-a"]) as client:
        yield client


@pytest.fixture
def client_b(stack: RunningStack) -> Iterator[Client]:
    with Client(stack.target, api_key=stack.keys["tenant-b"]) as client:
        yield client


@pytest.fixture(scope="session")
def providers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProviderStack]:
    """A second stack, whose replicas include provider adapters (see provider_stack)."""
    with provider_stack(tmp_path_factory.mktemp("providers")) as running:
        yield running
