"""The clients refuse to send a secret in cleartext across a network: ``Client``,
``AsyncClient`` and ``AdminClient`` made for a target that is not loopback (nor a Unix socket)
without ``tls`` are a ValueError naming it and the way out (``tls=Tls(...)``,
``insecure=True``), before any channel is made. The command lines refused such a target
(``--insecure`` to allow it) but the library sent the API key or admin token with every call
in plaintext (a fake Gateway on this host's network address read ``authorization: Bearer
<key>`` off the wire)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from cachemesh import AsyncClient, Client, Tls
from cachemesh import _client as client_module
from cachemesh.admin import AdminClient

REMOTE = "192.0.2.1:50051"  # TEST-NET-1: not loopback (never dialled here)
KEY = "cm_the-key-never-shown"


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The targets the clients made a channel for (none is dialled: no call is made)."""
    targets: list[str] = []

    def record(target: str, *_: object) -> object:
        targets.append(target)
        return grpc.insecure_channel("127.0.0.1:9")  # closed by the client, never called

    monkeypatch.setattr(client_module, "sync_channel", record)
    return targets


@pytest.mark.parametrize("target", [REMOTE, "gateway.example.com:50051", "dns:///10.0.0.5:443"])
def test_a_remote_target_in_plaintext_is_refused_naming_the_way_out(
    made: list[str], target: str
) -> None:
    for make in (
        lambda: Client(target, api_key=KEY),
        lambda: AsyncClient(target, api_key=KEY),
        lambda: AdminClient(target, admin_token=KEY),
    ):
        with pytest.raises(ValueError, match="is not loopback and tls is None") as raised:
            make()
        said = str(raised.value)
        assert target in said and "cleartext" in said
        assert "tls=Tls(" in said and "insecure=True" in said
        assert KEY not in said
    assert made == []


def test_insecure_or_tls_lets_a_remote_target_through(made: list[str], tmp_path: Path) -> None:
    Client(REMOTE, api_key=KEY, insecure=True).close()
    asyncio.run(AsyncClient(REMOTE, api_key=KEY, insecure=True).close())
    AdminClient(REMOTE, admin_token=KEY, insecure=True).close()
    Client(REMOTE, api_key=KEY, tls=Tls()).close()  # the system's CA roots
    assert made == [REMOTE, REMOTE]  # AdminClient's channel is made in cachemesh._tls


@pytest.mark.parametrize(
    "target",
    ["127.0.0.1:50051", "localhost:50051", "[::1]:50051", "unix:///tmp/cachemesh.sock"],
)
def test_a_local_target_in_plaintext_needs_no_flag(made: list[str], target: str) -> None:
    Client(target, api_key=KEY).close()
    AdminClient(target, admin_token=KEY).close()
    assert made == [target]


def test_insecure_with_an_injected_channel_is_refused() -> None:
    """As ``tls=`` and ``max_attempts=``: it sets up the channel the client makes."""
    with (
        grpc.insecure_channel(REMOTE) as channel,
        pytest.raises(ValueError, match="insecure= cannot be used with channel="),
    ):
        Client(REMOTE, api_key=KEY, channel=channel, insecure=True)
    with grpc.insecure_channel(REMOTE) as channel:  # the caller's own channel: as it is
        Client(REMOTE, api_key=KEY, channel=channel).close()
