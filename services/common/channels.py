"""Channel and server options that make a dependency's return quick to notice.

gRPC's defaults reconnect after 1 s growing by 1.6x up to 120 s, so a peer that was down for a
few seconds is tried again only 10-25 s after it is back. Internal channels cap the reconnect
backoff at ``MAX_RECONNECT_BACKOFF_MS`` and send keepalive pings (also while idle) so that a
peer that vanished without closing its connection (SIGKILL, a cut network) is noticed within
``KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS``; servers accept those pings (``server_options``),
which they would otherwise answer with GOAWAY ``too_many_pings``. Servers also listen alone
on their port (``grpc.so_reuseport`` off).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.common.connections import ConnectionPolicy

INITIAL_RECONNECT_BACKOFF_MS = 100
MAX_RECONNECT_BACKOFF_MS = 1000
KEEPALIVE_TIME_MS = 10_000
KEEPALIVE_TIMEOUT_MS = 5_000
# The shortest interval between a client's pings a server accepts while it sends the client
# nothing (no headers, data or window update): a tenth of the shortest keepalive of this
# project's clients (KEEPALIVE_TIME_MS, which the HTTP front uses to the Gateway too; the Python
# client's 30 s). gRPC clocks a keepalive ping from the answer to the one before, so two arrive
# at least KEEPALIVE_TIME_MS apart; the BDP probe pings gRPC sends after data it receives come
# right after the server sent something, which forgives every strike. gRPC's own client never
# pings more often than every second without data, the same floor.
MIN_PING_INTERVAL_MS = 1_000
# The channel argument gRPC reads it from (GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS).
# gRPC ignores an unknown key: under the key named after the macro the Gateway kept gRPC's
# default of 5 minutes, and a front quiet for 30 s (idle, or a model still thinking) got
# GOAWAY too_many_pings on its fourth keepalive ping, failing every call on the connection.
MIN_PING_INTERVAL_ARG = "grpc.http2.min_ping_interval_without_data_ms"

Options = list[tuple[str, int | str]]


def channel_options(max_message_bytes: int) -> Options:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.initial_reconnect_backoff_ms", INITIAL_RECONNECT_BACKOFF_MS),
        ("grpc.min_reconnect_backoff_ms", INITIAL_RECONNECT_BACKOFF_MS),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        # gRPC waits a minute for a ping's answer unless told (measured through a relay that
        # stopped forwarding: the call failed after 70 s, not 15). It bounds every ping, the
        # BDP probes sent after data too: a peer stopped mid-stream (SIGSTOP) is dropped 5 s
        # on; one merely busy is not (gRPC's threads answer while Python holds the GIL)
        ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # never through an HTTP proxy: gRPC follows http(s)_proxy / grpc_proxy by default,
        # loopback included, and a shell or container with them set (Docker sets them in
        # every container when its client has proxies) sent every call between the services
        # to the proxy: failing while health said SERVING, or carrying prompts in plaintext
        ("grpc.enable_http_proxy", 0),
    ]


def server_options(policy: ConnectionPolicy | None = None) -> Options:
    """What a server needs to accept the clients' keepalive pings, and to listen alone; with a
    ``policy`` (a public server: the Gateway), its limits and keepalive instead of accepting
    every ping as the internal services do."""
    alone: Options = [
        # grpcio sets SO_REUSEPORT on Linux by default: a second replica on the same
        # MODEL_LISTEN (or two services given one address) listened beside the first, both
        # SERVING, the kernel splitting new connections between them; off, the port in use
        # stops the second's start-up naming its *_LISTEN
        ("grpc.so_reuseport", 0),
    ]
    if policy is not None:
        return [*alone, *policy.options()]
    return [
        *alone,
        ("grpc.keepalive_permit_without_calls", 1),
        (MIN_PING_INTERVAL_ARG, MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 0),
    ]
