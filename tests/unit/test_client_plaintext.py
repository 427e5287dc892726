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
from cachemesh._tls import check_plaintext
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


# loopback in each form gRPC dials: each was refused by the command lines' check (a Unix
# socket with a message about the network), the first three by the clients too
LOCAL_FORMS = [
    "[::1]",
    "dns:localhost:50051",
    "LOCALHOST:50051",
    "unix:/tmp/cachemesh.sock",
    "unix-abstract:cachemesh",
    "dns:///LocalHost:50051",
    "ipv4:127.0.0.1:50051,127.0.0.2:50051",
    "ipv6:[::1]:50051",
    "[::ffff:127.0.0.1]:50051",
]
# not loopback, or not knowable without resolving a name: refused by both
REMOTE_FORMS = [
    "0.0.0.0:50051",
    "[::]:50051",
    "host.docker.internal:50051",
    "ip6-localhost:50051",
    "dns://192.0.2.53/localhost:50051",  # a DNS server of the target's says what localhost is
    "ipv4:127.0.0.1:50051,192.0.2.1:50051",
    "localhost..:50051",
    # gRPC's resolver asks DNS for these (not /etc/hosts, not read as 127.0.0.1): "hostname
    # lookup error" with no DNS server; one with a search domain may answer anything
    "localhost.:50051",
    "127.1:50051",
    "localhost.example.com:50051",
    "127.0.0.1.example.com:50051",
    "UNIX:/tmp/cachemesh.sock",
    "[::1]x",
]


@pytest.mark.parametrize("target", LOCAL_FORMS)
def test_loopback_in_any_form_needs_no_flag_for_the_clients_or_the_command_lines(
    made: list[str], target: str
) -> None:
    Client(target, api_key=KEY).close()
    AdminClient(target, admin_token=KEY).close()
    check_plaintext(target, None, False)
    assert made == [target]


@pytest.mark.parametrize("target", REMOTE_FORMS)
def test_a_host_not_known_loopback_is_refused_by_both(made: list[str], target: str) -> None:
    with pytest.raises(ValueError, match="is not loopback"):
        Client(target, api_key=KEY)
    with pytest.raises(ValueError, match="is not loopback"):
        check_plaintext(target, None, False)
    assert made == []


def test_the_loopback_forms_allowed_reach_a_gateway_on_this_host() -> None:
    """What the check lets through is what gRPC dials on loopback (a real call answered)."""
    from concurrent import futures

    from cachemesh import build_request
    from cachemesh.v1 import gateway_pb2 as pb

    def complete(request: pb.CompleteRequest, context: object) -> pb.CompleteResponse:
        return pb.CompleteResponse(request_id=request.request_id)

    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "cachemesh.v1.Gateway",
                {
                    "Complete": grpc.unary_unary_rpc_method_handler(
                        complete,
                        request_deserializer=pb.CompleteRequest.FromString,
                        response_serializer=pb.CompleteResponse.SerializeToString,
                    )
                },
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        for target in (
            f"dns:localhost:{port}",
            f"LOCALHOST:{port}",
            f"ipv4:127.0.0.1:{port},127.0.0.2:{port}",
            f"[::ffff:127.0.0.1]:{port}",
        ):
            with Client(target, api_key=KEY, wait_for_ready=False, timeout_s=5) as client:
                assert client.complete(build_request("hi")).request_id, target
    finally:
        server.stop(None)
