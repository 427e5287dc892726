"""What a public gRPC server (the Gateway) allows each client connection, and how it notices a
dead one.

gRPC's defaults suit neither: a connection may open any number of concurrent streams, and the
server pings a quiet connection only after 2 hours, then waits a minute for the answer, so a
client gone without closing its connection (a NAT that dropped it, a laptop asleep) holds its
streams, and their model calls, until TCP gives up (~15 min). Here:

- ``max_concurrent_streams``: advertised in HTTP/2's SETTINGS; a client's gRPC starts a stream
  past it only once one of its streams on that connection ends (it waits, within the call's
  deadline). ``0``: no limit.
- ``keepalive_time_s`` / ``keepalive_timeout_s``: the server pings a connection quiet for
  ``keepalive_time_s`` (with or without calls) and closes it when the ping is not answered
  within ``keepalive_timeout_s``, cancelling its calls. gRPC waits for a ping's answer for
  ``grpc.http2.ping_timeout_ms`` (1 minute) unless told, so both are set. ``0``: no pings.
- ``max_ping_strikes``: a client pinging more often than every ``MIN_PING_INTERVAL_MS`` (1 s,
  a tenth of this project's clients' shortest keepalive; while nothing is sent to it) gets
  GOAWAY ``too_many_pings`` after this many such pings (gRPC's ping-flood guard: a client
  pinging in a loop is cut at once). A strike is forgiven only when the server next sends
  something (headers, data, a window update). ``0``: any rate is accepted.
- ``max_connection_idle_s``: a connection without a call for this long is closed (GOAWAY; the
  client reconnects at its next call). ``0``: never. There is no maximum connection age: it
  would cut streams that run for minutes.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.channels import MIN_PING_INTERVAL_ARG, MIN_PING_INTERVAL_MS, Options
from services.common.env import C_INT_MAX, Env

MOST_S = C_INT_MAX // 1000  # gRPC takes these in milliseconds, as a C int

DEFAULT_MAX_CONCURRENT_STREAMS = 1000
DEFAULT_KEEPALIVE_TIME_S = 30.0
DEFAULT_KEEPALIVE_TIMEOUT_S = 10.0
# gRPC's own 2 leaves no room: a strike is forgiven only when the server sends something, and
# a keepalive ping with two BDP probe pings close behind it (after data the server sent just
# before the keepalive arrived) can make two. A client pinging in a loop is cut at the 6th.
DEFAULT_MAX_PING_STRIKES = 5
DEFAULT_MAX_CONNECTION_IDLE_S = 0.0


@dataclass(frozen=True)
class ConnectionPolicy:
    max_concurrent_streams: int = DEFAULT_MAX_CONCURRENT_STREAMS  # 0 = no limit
    keepalive_time_s: float = DEFAULT_KEEPALIVE_TIME_S  # 0 = the server sends no pings
    keepalive_timeout_s: float = DEFAULT_KEEPALIVE_TIMEOUT_S
    max_ping_strikes: int = DEFAULT_MAX_PING_STRIKES  # 0 = pings at any rate accepted
    max_connection_idle_s: float = DEFAULT_MAX_CONNECTION_IDLE_S  # 0 = never closed for idling
    # the least interval between a client's pings accepted while nothing is sent to it (not
    # configurable: tests scale it with the clients' keepalive)
    min_ping_interval_ms: int = MIN_PING_INTERVAL_MS

    @classmethod
    def from_env(cls, env: Env, prefix: str) -> ConnectionPolicy:
        """``{prefix}_MAX_CONCURRENT_STREAMS``, ``_KEEPALIVE_TIME_S``, ``_KEEPALIVE_TIMEOUT_S``,
        ``_MAX_PING_STRIKES``, ``_MAX_CONNECTION_IDLE_S``."""
        return cls(
            max_concurrent_streams=env.int(
                f"{prefix}_MAX_CONCURRENT_STREAMS",
                DEFAULT_MAX_CONCURRENT_STREAMS,
                minimum=0,
                maximum=C_INT_MAX,
            ),
            keepalive_time_s=_seconds(env, f"{prefix}_KEEPALIVE_TIME_S", DEFAULT_KEEPALIVE_TIME_S),
            keepalive_timeout_s=env.seconds(
                f"{prefix}_KEEPALIVE_TIMEOUT_S",
                DEFAULT_KEEPALIVE_TIMEOUT_S,
                minimum=0.001,
                maximum=MOST_S,
            ),
            max_ping_strikes=env.int(
                f"{prefix}_MAX_PING_STRIKES", DEFAULT_MAX_PING_STRIKES, minimum=0, maximum=C_INT_MAX
            ),
            max_connection_idle_s=_seconds(
                env, f"{prefix}_MAX_CONNECTION_IDLE_S", DEFAULT_MAX_CONNECTION_IDLE_S
            ),
        )

    def options(self) -> Options:
        """The server's gRPC options for this policy (beside ``server_options``' own)."""
        options: Options = [
            ("grpc.keepalive_permit_without_calls", 1),
            (MIN_PING_INTERVAL_ARG, self.min_ping_interval_ms),
            ("grpc.http2.max_ping_strikes", self.max_ping_strikes),
        ]
        if self.max_concurrent_streams > 0:
            options.append(("grpc.max_concurrent_streams", self.max_concurrent_streams))
        if self.keepalive_time_s > 0:
            timeout_ms = _ms(self.keepalive_timeout_s)
            options += [
                ("grpc.keepalive_time_ms", _ms(self.keepalive_time_s)),
                ("grpc.keepalive_timeout_ms", timeout_ms),
                ("grpc.http2.ping_timeout_ms", timeout_ms),
                # keeps pinging a stream that is quiet for long (a model still thinking)
                ("grpc.http2.max_pings_without_data", 0),
            ]
        else:
            options.append(("grpc.keepalive_time_ms", C_INT_MAX))  # gRPC's "never"
        if self.max_connection_idle_s > 0:
            options.append(("grpc.max_connection_idle_ms", _ms(self.max_connection_idle_s)))
        return options


def _seconds(env: Env, name: str, default: float) -> float:
    return env.seconds(name, default, minimum=0.0, maximum=MOST_S)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))  # a positive setting under a millisecond stays on
