"""The Gateway's per-connection policy: the router's settings reach its gRPC server's options,
each setting is validated at start-up naming its variable, ``0`` turns each off, the internal
services keep accepting every ping, and the Python client's pings never earn a strike."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from cachemesh import channel_options
from services.common.channels import (
    KEEPALIVE_TIME_MS,
    KEEPALIVE_TIMEOUT_MS,
    MIN_PING_INTERVAL_ARG,
    MIN_PING_INTERVAL_MS,
)
from services.common.channels import channel_options as internal_channel_options
from services.common.connections import ConnectionPolicy
from services.common.env import ConfigError, Env
from services.common.models import load_model_table
from services.common.server import ServerSettings, grpc_server_options
from services.router.settings import RouterSettings

BASE = {
    "MODEL_REPLICAS": "sim-small=127.0.0.1:1,sim-large=127.0.0.1:2",
    "CACHEMESH_API_KEYS_FILE": "/nonexistent/api-keys",
    "CACHEMESH_INTERNAL_TOKEN": "t" * 32,
}


def _router_options(extra: Mapping[str, str]) -> dict[str, int | str]:
    settings = RouterSettings.from_env(Env({**BASE, **extra}), load_model_table())
    return dict(grpc_server_options(settings.server))


def test_the_routers_defaults_reach_its_grpc_server() -> None:
    options = _router_options({})
    assert options["grpc.max_concurrent_streams"] == 1000
    assert options["grpc.keepalive_time_ms"] == 30_000
    # gRPC waits a minute for a ping's answer unless told: both are the keepalive timeout
    assert options["grpc.keepalive_timeout_ms"] == 10_000
    assert options["grpc.http2.ping_timeout_ms"] == 10_000
    assert options["grpc.http2.max_pings_without_data"] == 0
    assert options["grpc.keepalive_permit_without_calls"] == 1
    # the key gRPC reads (an unknown one is ignored: gRPC's 5 minutes applied)
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == MIN_PING_INTERVAL_MS == 1000
    assert "grpc.http2.min_recv_ping_interval_without_data_ms" not in options
    assert options["grpc.http2.max_ping_strikes"] == 5
    assert "grpc.max_connection_idle_ms" not in options
    assert "grpc.max_connection_age_ms" not in options  # long streams are never cut
    assert options["grpc.so_reuseport"] == 0


def test_the_routers_settings_reach_its_grpc_server() -> None:
    options = _router_options(
        {
            "ROUTER_MAX_CONCURRENT_STREAMS": "2",
            "ROUTER_KEEPALIVE_TIME_S": "60",
            "ROUTER_KEEPALIVE_TIMEOUT_S": "5",
            "ROUTER_MAX_PING_STRIKES": "3",
            "ROUTER_MAX_CONNECTION_IDLE_S": "900",
        }
    )
    assert options["grpc.max_concurrent_streams"] == 2
    assert options["grpc.keepalive_time_ms"] == 60_000
    assert options["grpc.keepalive_timeout_ms"] == options["grpc.http2.ping_timeout_ms"] == 5000
    assert options["grpc.http2.max_ping_strikes"] == 3
    assert options["grpc.max_connection_idle_ms"] == 900_000


def test_zero_turns_each_off() -> None:
    options = _router_options(
        {
            "ROUTER_MAX_CONCURRENT_STREAMS": "0",
            "ROUTER_KEEPALIVE_TIME_S": "0",
            "ROUTER_MAX_PING_STRIKES": "0",
            "ROUTER_MAX_CONNECTION_IDLE_S": "0",
        }
    )
    assert "grpc.max_concurrent_streams" not in options  # no limit
    assert options["grpc.keepalive_time_ms"] == 2**31 - 1  # the server never pings
    assert "grpc.http2.ping_timeout_ms" not in options
    assert options["grpc.http2.max_ping_strikes"] == 0  # pings at any rate accepted
    assert "grpc.max_connection_idle_ms" not in options


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ROUTER_MAX_CONCURRENT_STREAMS", "-1"),
        ("ROUTER_MAX_CONCURRENT_STREAMS", "many"),
        ("ROUTER_MAX_CONCURRENT_STREAMS", str(2**31)),
        ("ROUTER_KEEPALIVE_TIME_S", "-1"),
        ("ROUTER_KEEPALIVE_TIME_S", "inf"),
        ("ROUTER_KEEPALIVE_TIME_S", "3000000"),  # over gRPC's C int of milliseconds
        ("ROUTER_KEEPALIVE_TIMEOUT_S", "0"),
        ("ROUTER_MAX_PING_STRIKES", "-2"),
        ("ROUTER_MAX_CONNECTION_IDLE_S", "soon"),
    ],
)
def test_a_bad_setting_stops_the_start_up_naming_it(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        ConnectionPolicy.from_env(Env({name: value}), "ROUTER")


def test_the_internal_services_keep_accepting_every_ping_with_no_stream_limit() -> None:
    options = dict(grpc_server_options(ServerSettings("127.0.0.1:0", 1.0, 1 << 20)))
    assert options["grpc.http2.max_ping_strikes"] == 0
    assert options[MIN_PING_INTERVAL_ARG] == MIN_PING_INTERVAL_MS
    assert "grpc.max_concurrent_streams" not in options
    assert "grpc.keepalive_time_ms" not in options


def test_the_clients_pings_are_never_strikes_at_the_gateway() -> None:
    """The Python client and the HTTP front (the internal channel options) ping ten times less
    often than the Gateway accepts (tests/unit/test_ping_policy.py: on real connections)."""
    client = dict(channel_options())
    assert int(client["grpc.keepalive_time_ms"]) >= 10 * MIN_PING_INTERVAL_MS
    assert int(client["grpc.http2.max_pings_without_data"]) == 0  # a quiet stream stays watched
    assert int(client["grpc.keepalive_timeout_ms"]) == int(client["grpc.http2.ping_timeout_ms"])
    internal = dict(internal_channel_options(1 << 20))
    assert int(internal["grpc.keepalive_time_ms"]) == KEEPALIVE_TIME_MS >= 10 * MIN_PING_INTERVAL_MS


def test_internal_channels_wait_for_a_pings_answer_only_the_keepalive_timeout() -> None:
    """Unless told, gRPC waits a minute: a dead peer was noticed after 70 s, not 15."""
    options = dict(internal_channel_options(1 << 20))
    assert options["grpc.http2.ping_timeout_ms"] == KEEPALIVE_TIMEOUT_MS


def test_the_router_readme_documents_each_setting() -> None:
    readme = (Path(__file__).resolve().parents[2] / "services/router/README.md").read_text()
    for name in (
        "ROUTER_MAX_CONCURRENT_STREAMS",
        "ROUTER_KEEPALIVE_TIME_S",
        "ROUTER_KEEPALIVE_TIMEOUT_S",
        "ROUTER_MAX_PING_STRIKES",
        "ROUTER_MAX_CONNECTION_IDLE_S",
    ):
        assert f"`{name}`" in readme, name
