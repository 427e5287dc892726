"""The HTTP front's settings, read from the environment once at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.common.env import ConfigError, Env
from services.common.metrics import MetricsSettings
from services.common.model_overrides import model_table_from_env
from services.common.models import AUTO, ModelTable
from services.common.server import REQUEST_SHARE, default_request_bytes, max_message_bytes
from services.common.tls import ClientTls, ServerTls
from services.http_front.connections import MAX_CONNECTIONS
from services.router.key_settings import KeyStoreSettings
from services.router.settings import parse_replicas

DEFAULT_LISTEN = "127.0.0.1:8088"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9106"
MIN_BODY_BYTES = 1024
# JSON may write any character as a ``\uXXXX`` escape, 6 bytes, where the Gateway's request
# (UTF-8 in protobuf) holds it in 1 to 3 (a control character; é; 東; an emoji, 4 bytes, is a
# pair of escapes, 12): a request of N bytes, its text all escapes, is up to this many times N.
# Python's ``json.dumps`` and ``requests``' ``json=`` escape everything not ASCII: 2 to 3 times.
ESCAPE_EXPANSION = 6
DEFAULT_MAX_CONNECTIONS = 4096
# HTTP_FRONT_BODY_BUDGET_BYTES unset: this many requests at HTTP_FRONT_MAX_BODY_BYTES (128 MiB
# at 2 MiB) written in plain ASCII, all tenants together; ten bodies at the worst case of their
# JSON (escapes, 12 MiB each). One tenant's share (BODY_TENANT_SHARE) holds 16 such bodies (two
# at the worst case): its default in-flight cap's worth of uploads (64) is not all read at once,
# those past its share are refused (529 / 503, retried) before their bodies are read
BODY_BUDGET_BODIES = 64
# one tenant's bodies hold at most this fraction of HTTP_FRONT_BODY_BUDGET_BYTES (a quarter), or
# the largest body's JSON when that is more, their declared lengths reserved before they are
# read: one tenant's uploads cannot fill the front's budget
BODY_TENANT_SHARE = 4


@dataclass(frozen=True)
class HttpFrontSettings:
    listen: str
    gateway_addr: str
    keys: KeyStoreSettings  # the shared API key file, as the router's
    # HTTP_FRONT_MAX_BODY_BYTES: the largest request the front passes on, measured as the router
    # measures its ROUTER_MAX_REQUEST_BYTES (the Gateway request serialized: the text, not its
    # JSON escapes); a body's JSON may be ``max_json_bytes`` (``ESCAPE_EXPANSION`` times it)
    max_body_bytes: int
    # CACHEMESH_MAX_MESSAGE_BYTES: the largest message to and from the Gateway
    max_message_bytes: int
    max_in_flight_per_key: int  # per tenant (all its keys): one more concurrent request: 429
    ping_s: float  # a stream with nothing to send for this long sends a ping
    # a write to the caller that has not gone out within this (the caller stopped reading):
    # the connection is closed, the Gateway call cancelled
    write_timeout_s: float
    gateway_timeout_s: float
    grace_s: float
    # a connection that has not finished a request's headers this long after it opened or after
    # its last response (idle or dribbling them) is closed
    idle_timeout_s: float
    # a body not whole this long after its headers: 408, the connection closed
    body_timeout_s: float
    # HTTP_FRONT_BODY_BUDGET_BYTES: bytes of bodies the front holds while it reads them, all
    # requests together (a body takes its bytes as they arrive; one tenant's bodies a quarter at
    # most, their declared lengths reserved of it up front); a body finding no room gets 529 /
    # 503 (retry)
    body_budget_bytes: int
    # connections open at once; one more is answered 503 and closed (below RLIMIT_NOFILE)
    max_connections: int
    # HTTP_FRONT_MAX_CONNECTIONS was set: an open-file limit too low for it stops the start
    # (unset: the default is lowered to what the limit holds, with a WARNING)
    max_connections_set: bool
    models: tuple[str, ...]  # what /v1/models lists: "auto" and the deployed models
    default_max_tokens: dict[
        str, int
    ]  # model -> its output limit (OpenAI's max_tokens is optional)
    # the models that think unless told not to (their row's thinks_by_default), and "auto"
    # when a model it may pick is one: an Anthropic thinking "disabled" to one is refused
    thinks_by_default: frozenset[str]
    metrics: MetricsSettings
    tls: ServerTls | None = None  # HTTP_FRONT_TLS_*: HTTPS, optionally client certificates
    gateway_tls: ClientTls | None = None  # HTTP_FRONT_GATEWAY_TLS_*: how it dials the Gateway

    @property
    def max_json_bytes(self) -> int:
        """The most a body's JSON may be: a longer one is refused (413) before it is read
        whole. A request under ``max_body_bytes`` written in escapes is this long."""
        return self.max_body_bytes * ESCAPE_EXPANSION

    @property
    def body_tenant_bytes(self) -> int:
        """The most of ``body_budget_bytes`` one tenant's bodies hold at once: a
        ``BODY_TENANT_SHARE``th of it, or the largest body's JSON (``max_json_bytes``) when
        that is more (one body as long as the front reads is always read)."""
        return max(self.body_budget_bytes // BODY_TENANT_SHARE, self.max_json_bytes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> HttpFrontSettings:
        env = Env(environ)
        table = model_table_from_env(env)
        deployed = parse_replicas(env.str("MODEL_REPLICAS"), table)
        models = (AUTO, *sorted(deployed))
        message_bytes = max_message_bytes(env)
        body_bytes = max_body_bytes(env, message_bytes)
        return cls(
            listen=env.address("HTTP_FRONT_LISTEN", DEFAULT_LISTEN),
            gateway_addr=env.address("HTTP_FRONT_GATEWAY_ADDR", "127.0.0.1:50051"),
            keys=KeyStoreSettings.from_env(env),
            max_body_bytes=body_bytes,
            max_message_bytes=message_bytes,
            max_in_flight_per_key=env.count("HTTP_FRONT_MAX_IN_FLIGHT_PER_KEY", 64, minimum=1),
            ping_s=env.seconds("HTTP_FRONT_PING_S", 10.0, minimum=0.01),
            write_timeout_s=env.seconds("HTTP_FRONT_WRITE_TIMEOUT_S", 30.0, minimum=0.001),
            gateway_timeout_s=env.seconds("HTTP_FRONT_GATEWAY_TIMEOUT_S", 600.0, minimum=0.001),
            grace_s=env.seconds("CACHEMESH_GRACE_S", 10.0, minimum=0.0),
            idle_timeout_s=env.seconds("HTTP_FRONT_IDLE_TIMEOUT_S", 15.0, minimum=0.001),
            body_timeout_s=env.seconds("HTTP_FRONT_BODY_TIMEOUT_S", 30.0, minimum=0.001),
            body_budget_bytes=body_budget_bytes(env, body_bytes),
            max_connections=env.count(MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS, minimum=1),
            max_connections_set=bool(environ.get(MAX_CONNECTIONS, "").strip()),
            models=models,
            default_max_tokens={m: _output_limit(table, m) for m in models},
            thinks_by_default=frozenset(m for m in models if _thinks(table, m)),
            metrics=MetricsSettings.from_env(env, "HTTP_FRONT", DEFAULT_METRICS_LISTEN),
            tls=ServerTls.read(env, "HTTP_FRONT"),
            gateway_tls=ClientTls.read(env, "HTTP_FRONT_GATEWAY"),
        )


def max_body_bytes(env: Env, message_bytes: int) -> int:
    """HTTP_FRONT_MAX_BODY_BYTES, at most CACHEMESH_MAX_MESSAGE_BYTES (``message_bytes``;
    unset: the Gateway's own default, 2 MiB or half that limit when lower, so that a request the
    front takes is one the Gateway takes too). It bounds the request the front sends on, as the
    router's ROUTER_MAX_REQUEST_BYTES does (``CompleteRequest.ByteSize()``), not the body's JSON:
    a body of text written as ``\\uXXXX`` escapes is several times its request (a body bound
    at this refused requests the router takes). Above the message limit, a request the front
    took was refused by gRPC (a 413 quoting "CLIENT: Sent message larger than max")."""
    name = "HTTP_FRONT_MAX_BODY_BYTES"
    default = default_request_bytes(message_bytes)
    if env.optional_str(name) is None and default < MIN_BODY_BYTES:
        # the variable that made the default too low is the one to name: this one is unset
        raise ConfigError(
            f"CACHEMESH_MAX_MESSAGE_BYTES ({message_bytes}) leaves the HTTP front a body limit "
            f"of {default} bytes ({name} is unset: it defaults to the Gateway's, half the "
            f"message limit when that is under 2 MiB), under the least, {MIN_BODY_BYTES}: raise "
            f"CACHEMESH_MAX_MESSAGE_BYTES (every service's) to at least "
            f"{MIN_BODY_BYTES * REQUEST_SHARE}"
        )
    value = env.bytes(name, default, minimum=MIN_BODY_BYTES)
    if value > message_bytes:
        raise ConfigError(
            f"{name} ({value}) must be at most CACHEMESH_MAX_MESSAGE_BYTES ({message_bytes}): "
            "the front sends each request to the Gateway as one gRPC message under that limit "
            "(this bounds the request, as the router measures it); raise "
            "CACHEMESH_MAX_MESSAGE_BYTES (and the router's ROUTER_MAX_REQUEST_BYTES, which "
            "bounds what the Gateway takes), or lower this"
        )
    return value


def body_budget_bytes(env: Env, body_bytes: int) -> int:
    """HTTP_FRONT_BODY_BUDGET_BYTES: at least the largest body's JSON (``ESCAPE_EXPANSION``
    times HTTP_FRONT_MAX_BODY_BYTES, ``body_bytes``), which could never be read under less;
    unset, ``BODY_BUDGET_BODIES`` times ``body_bytes``."""
    name = "HTTP_FRONT_BODY_BUDGET_BYTES"
    least = body_bytes * ESCAPE_EXPANSION
    value = env.bytes(name, body_bytes * BODY_BUDGET_BODIES)
    if value < least:
        raise ConfigError(
            f"{name} ({value}) must be at least {least}: {ESCAPE_EXPANSION} times "
            f"HTTP_FRONT_MAX_BODY_BYTES ({body_bytes}), the largest body the front reads (a "
            "request at that limit written in JSON escapes), which could never be read under "
            "less; raise it, or lower HTTP_FRONT_MAX_BODY_BYTES"
        )
    return value


def _output_limit(table: ModelTable, model: str) -> int:
    # parse_replicas checked every deployed model
    return min(spec.max_output_tokens for spec in table.answering(model))


def _thinks(table: ModelTable, model: str) -> bool:
    return any(spec.thinks_by_default for spec in table.answering(model))
