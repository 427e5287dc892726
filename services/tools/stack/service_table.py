"""The one declarative table of the stack's services.

``python -m services.tools.stack up`` starts exactly these processes, and the compose test checks
that docker-compose.yml runs the same modules with the same settings. A service's ``env_keys``
are every variable it reads (required or optional); the stack passes them from ``.env``, the
caller's environment and the secrets under ``.run/``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from services.common.setting_names import unread_names

# Read by every service through services.common (server, telemetry, models, auth).
COMMON_ENV_KEYS: tuple[str, ...] = (
    "CACHEMESH_INTERNAL_TOKEN",
    "CACHEMESH_INTERNAL_TOKEN_FILE",
    "CACHEMESH_GRACE_S",
    "CACHEMESH_LOG_LEVEL",
    "CACHEMESH_LOG_FORMAT",
    "CACHEMESH_METRICS_MAX_TENANTS",
    "CACHEMESH_MAX_MESSAGE_BYTES",
    "CACHEMESH_MODELS_FILE",
    "CACHEMESH_PRICES",
    "CACHEMESH_PRIOR_PREFILL_TPS",
    "CACHEMESH_CONTEXT_WINDOWS",
    "CACHEMESH_AUTO_SMALL",
    "CACHEMESH_AUTO_LARGE",
    "CACHEMESH_AUTO_TIERS",
    "CACHEMESH_MAX_OUTPUT_TOKENS",
    "CACHEMESH_TOKENIZER_CACHE_TOKENS",
    "OTEL_SERVICE_NAME",
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_INSECURE",
    "OTEL_EXPORTER_OTLP_TRACES_INSECURE",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
)


# A model replica's settings: the simulator's, and a provider adapter's (MODEL_BACKEND).
MODEL_ENV_KEYS: tuple[str, ...] = (
    "MODEL_IDS",
    "MODEL_REPLICA_ID",
    "SIM_TIME_SCALE",
    "SIM_SPECULATIVE",
    "MODEL_KV_CAPACITY_BLOCKS",
    "MODEL_MAX_CONCURRENT_CALLS",
    "MODEL_BACKEND",
    "MODEL_UPSTREAM_IDS",
    "ANTHROPIC_BASE_URL",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_API_KEY_FILE",
    "OPENAI_BASE_URL",
    "OPENAI_API_KEY",
    "OPENAI_API_KEY_FILE",
    "PROVIDER_MAX_RETRIES",
    "PROVIDER_BACKOFF_S",
    "PROVIDER_BACKOFF_MAX_S",
    "PROVIDER_AUTH_RECHECK_S",
)


@dataclass(frozen=True)
class ServiceDef:
    name: str  # the compose service name and the name in logs, pid files and OTel
    module: str  # run as ``python -m <module>``
    listen_var: str  # the env variable holding its listen address
    default_port: int
    own_env_keys: tuple[str, ...]
    # the env variable holding its GET /metrics address, a port of its own ("" = none: Redis)
    metrics_var: str = ""
    default_metrics_port: int = 0
    # env variable -> the services whose addresses it holds (MODEL_REPLICAS holds several)
    peers: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: MappingProxyType({}))
    # A second replica of a service runs the same module with its own settings: process
    # variable -> the stack variable it is read from (MODEL_LISTEN <- MODEL_2_LISTEN).
    renames: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # "grpc": health is grpc.health.v1 on the listen address; "http": GET /readyz answers 200
    protocol: str = "grpc"
    # inside the mesh: holds the internal credential (and the admin token's file). The HTTP
    # front is not: it calls only the Gateway, with each caller's own key
    internal: bool = True

    @property
    def package(self) -> str:
        return self.module.rpartition(".")[2]

    @property
    def peer_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name for names in self.peers.values() for name in names))

    def process_env(self, env: Mapping[str, str]) -> dict[str, str]:
        """``env`` with each renamed variable taken from its stack variable (when set)."""
        moved = dict(env)
        for target, source in self.renames.items():
            if source in env:
                moved[target] = env[source]
        return moved

    @property
    def otel_service_name(self) -> str:
        return self.name

    @property
    def env_keys(self) -> tuple[str, ...]:
        keys = (
            self.listen_var,
            *((self.metrics_var,) if self.metrics_var else ()),
            *self.own_env_keys,
            *self.renames,
            *self.renames.values(),
        )
        return tuple(dict.fromkeys((*keys, *COMMON_ENV_KEYS)))

    @property
    def command(self) -> tuple[str, ...]:
        return ("python", "-m", self.module)


SERVICES: tuple[ServiceDef, ...] = (
    ServiceDef(
        name="semantic-cache",
        module="services.semantic_cache",
        listen_var="SEMANTIC_CACHE_LISTEN",
        default_port=50052,
        metrics_var="SEMANTIC_CACHE_METRICS_LISTEN",
        default_metrics_port=9102,
        own_env_keys=(
            "SEMANTIC_CACHE_THRESHOLD",
            "SEMANTIC_CACHE_VERIFIER_MIN_P",
            "SEMANTIC_CACHE_AMBIGUITY_MARGIN",
            "SEMANTIC_CACHE_TTL_S",
            "SEMANTIC_CACHE_MAX_ENTRIES",
            "SEMANTIC_CACHE_MAX_BYTES",
            "SEMANTIC_CACHE_FAISS_THREADS",
            "SEMANTIC_CACHE_ORT_THREADS",
            "SEMANTIC_CACHE_ORT_SOLO_THREADS",
            "SEMANTIC_CACHE_DATA_DIR",
            "SEMANTIC_CACHE_SNAPSHOT_S",
            "SEMANTIC_CACHE_NAMESPACE_TTL_S",
            "SEMANTIC_CACHE_TOOL_USE_NAMESPACES",
            "SEMANTIC_CACHE_PRESENT_TIME_NAMESPACES",
            "SEMANTIC_CACHE_MAX_TEMPERATURE",
            "SEMANTIC_CACHE_LEASE_S",
            "SEMANTIC_CACHE_LEASE_WAIT_S",
            "SEMANTIC_CACHE_EMBED_MAX_BATCH",
            "SEMANTIC_CACHE_EMBED_MAX_QUEUE",
            "SEMANTIC_CACHE_EMBED_MAX_QUEUE_PER_TENANT",
            "SEMANTIC_CACHE_ANN_MIN_ENTRIES",
            "SEMANTIC_CACHE_ANN_NPROBE",
        ),
    ),
    ServiceDef(
        name="prefix-cache",
        module="services.prefix_cache",
        listen_var="PREFIX_CACHE_LISTEN",
        default_port=50053,
        metrics_var="PREFIX_CACHE_METRICS_LISTEN",
        default_metrics_port=9103,
        own_env_keys=(
            "PREFIX_CACHE_LOOKBACK_BLOCKS",
            "PREFIX_CACHE_RECORD_TTL_S",
            "PREFIX_CACHE_MAX_WARM_ENTRIES",
            "PREFIX_CACHE_MAX_RECORDS",
            "PREFIX_CACHE_REDIS_URL",
            "CACHEMESH_REDIS_PASSWORD_FILE",
            "PREFIX_CACHE_REDIS_MAX_CONNECTIONS",
            "PREFIX_CACHE_REPLICA_CAPACITY_BLOCKS",
            "PREFIX_CACHE_REPLICA_IDLE_S",
            "PREFIX_CACHE_PLAN_TTL_S",
            "PREFIX_CACHE_PLAN_MEMO_BLOCKS",
            "PREFIX_CACHE_KV_MEMO_HASHES",
        ),
    ),
    ServiceDef(
        name="model",
        module="services.model",
        listen_var="MODEL_LISTEN",
        default_port=50054,
        metrics_var="MODEL_METRICS_LISTEN",
        default_metrics_port=9104,
        own_env_keys=MODEL_ENV_KEYS,
    ),
    # L3: a second replica of the large model, so KV-aware routing has a choice.
    ServiceDef(
        name="model-2",
        module="services.model",
        listen_var="MODEL_2_LISTEN",
        default_port=50055,
        metrics_var="MODEL_2_METRICS_LISTEN",
        default_metrics_port=9105,
        own_env_keys=MODEL_ENV_KEYS,
        # an OpenAI-compatible engine of its own (up --local-engine: a second llama-server)
        renames=MappingProxyType(
            {
                "MODEL_LISTEN": "MODEL_2_LISTEN",
                "MODEL_METRICS_LISTEN": "MODEL_2_METRICS_LISTEN",
                "MODEL_IDS": "MODEL_2_IDS",
                "OPENAI_BASE_URL": "MODEL_2_OPENAI_BASE_URL",
            }
        ),
    ),
    ServiceDef(
        name="router",
        module="services.router",
        listen_var="ROUTER_LISTEN",
        default_port=50051,
        metrics_var="ROUTER_METRICS_LISTEN",
        default_metrics_port=9101,
        own_env_keys=(
            "SEMANTIC_CACHE_ADDR",
            "PREFIX_CACHE_ADDR",
            "MODEL_REPLICAS",
            "CACHEMESH_API_KEYS_FILE",
            "CACHEMESH_API_KEYS_POLL_S",
            "CACHEMESH_API_KEYS_SEED_FILE",
            "CACHEMESH_ADMIN_TOKEN",
            "CACHEMESH_ADMIN_TOKEN_FILE",
            "ROUTER_ADMIN_TIMEOUT_S",
            "ROUTER_MAX_REQUEST_BYTES",
            "ROUTER_MAX_CONCURRENT_STREAMS",
            "ROUTER_KEEPALIVE_TIME_S",
            "ROUTER_KEEPALIVE_TIMEOUT_S",
            "ROUTER_MAX_PING_STRIKES",
            "ROUTER_MAX_CONNECTION_IDLE_S",
            "ROUTER_SEMANTIC_TIMEOUT_S",
            "ROUTER_SEMANTIC_LEASE_WAIT_S",
            "ROUTER_SEMANTIC_STORE_TIMEOUT_S",
            "ROUTER_SEMANTIC_BREAKER_S",
            "ROUTER_PREFIX_TIMEOUT_S",
            "ROUTER_PREFIX_BREAKER_S",
            "ROUTER_MODEL_TIMEOUT_S",
            "ROUTER_IDEMPOTENCY_TTL_S",
            "ROUTER_IDEMPOTENCY_MAX",
            "ROUTER_IDEMPOTENCY_MAX_BYTES",
            "ROUTER_BALANCE_ABS_THRESHOLD",
            "ROUTER_BALANCE_REL_THRESHOLD",
            "ROUTER_CACHE_THRESHOLD",
            "ROUTER_REPLICA_POLICY",
            "ROUTER_TTFT_TIE_FRACTION",
            "ROUTER_TTFT_TIE_FLOOR_S",
            "ROUTER_TTFT_PRIOR_PREFILL_TPS",
            "ROUTER_TTFT_WORK_WEIGHT",
            "ROUTER_KV_CAPACITY_TOKENS",
            "ROUTER_EJECT_AFTER_FAILURES",
            "ROUTER_EJECT_BASE_S",
            "ROUTER_EJECT_MAX_S",
            "ROUTER_MID_ANSWER_STALL_S",
            "ROUTER_LIMIT_REQUESTS_PER_MIN",
            "ROUTER_LIMIT_TOKENS_PER_MIN",
            "ROUTER_BUDGET_USD_PER_DAY",
            "ROUTER_BUDGET_USD_PER_MONTH",
            "ROUTER_TENANT_LIMITS_FILE",
            "ROUTER_LIMITS_REDIS_URL",
            "ROUTER_LIMITS_TIMEOUT_S",
            "ROUTER_REDIS_MAX_CONNECTIONS",
            "ROUTER_REDIS_BREAKER_S",
            "ROUTER_TLS_CERT_FILE",
            "ROUTER_TLS_KEY_FILE",
            "ROUTER_TLS_CLIENT_CA_FILE",
            "ROUTER_THRESHOLD",
            "ROUTER_LOCAL_EMBEDDER",
            "ROUTER_COST_AWARE",
            "ROUTER_TIER_THRESHOLDS",
            "ROUTER_WRITE_AMORTIZE_TURNS",
            "ROUTER_DATA_DIR",
            "ROUTER_OUTBOX_RETRY_S",
            "ROUTER_JOURNAL_SYNC_S",
            "ROUTER_OUTBOX_MAX_BYTES",
            "ROUTER_READ_AHEAD_MAX_BYTES",
            "ROUTER_ANSWERS_REDIS_URL",
            "CACHEMESH_REDIS_PASSWORD_FILE",
        ),
        peers=MappingProxyType(
            {
                "SEMANTIC_CACHE_ADDR": ("semantic-cache",),
                "PREFIX_CACHE_ADDR": ("prefix-cache",),
                "MODEL_REPLICAS": ("model", "model-2"),
            }
        ),
    ),
    # The Anthropic and OpenAI HTTP APIs in front of the Gateway (a client of the router).
    ServiceDef(
        name="http-front",
        module="services.http_front",
        listen_var="HTTP_FRONT_LISTEN",
        default_port=8088,
        metrics_var="HTTP_FRONT_METRICS_LISTEN",
        default_metrics_port=9106,
        own_env_keys=(
            "HTTP_FRONT_GATEWAY_ADDR",
            "HTTP_FRONT_MAX_BODY_BYTES",
            "HTTP_FRONT_MAX_IN_FLIGHT_PER_KEY",
            "HTTP_FRONT_PING_S",
            "HTTP_FRONT_GATEWAY_TIMEOUT_S",
            "HTTP_FRONT_WRITE_TIMEOUT_S",
            "HTTP_FRONT_IDLE_TIMEOUT_S",
            "HTTP_FRONT_BODY_TIMEOUT_S",
            "HTTP_FRONT_BODY_BUDGET_BYTES",
            "HTTP_FRONT_MAX_CONNECTIONS",
            "HTTP_FRONT_TLS_CERT_FILE",
            "HTTP_FRONT_TLS_KEY_FILE",
            "HTTP_FRONT_TLS_CLIENT_CA_FILE",
            "HTTP_FRONT_GATEWAY_TLS_CA_FILE",
            "HTTP_FRONT_GATEWAY_TLS_CERT_FILE",
            "HTTP_FRONT_GATEWAY_TLS_KEY_FILE",
            "CACHEMESH_API_KEYS_FILE",
            "CACHEMESH_API_KEYS_POLL_S",
            "CACHEMESH_API_KEYS_SEED_FILE",
            "MODEL_REPLICAS",
        ),
        peers=MappingProxyType({"HTTP_FRONT_GATEWAY_ADDR": ("router",)}),
        protocol="http",
        internal=False,
    ),
)


# Read by the stack's own commands, the local engines and the clients (the CLI, the demo, the
# load test), never by a service: names a setting may have too.
TOOL_ENV_KEYS: tuple[str, ...] = (
    "CACHEMESH_UP_TIMEOUT_S",
    "CACHEMESH_CACHE_DIR",
    "CACHEMESH_LLAMA_REPLICAS",
    "CACHEMESH_LLAMA_THREADS",
    "CACHEMESH_LLAMA_CONTEXT",
    "CACHEMESH_TARGET",
    "CACHEMESH_HTTP_URL",
    "CACHEMESH_API_KEY",
    "CACHEMESH_KEY_A",
    "CACHEMESH_KEY_B",
    "CACHEMESH_TIMEOUT_S",
    "CACHEMESH_TLS",
    "CACHEMESH_CA_FILE",
    "CACHEMESH_CERT_FILE",
    "CACHEMESH_KEY_FILE",
    "CACHEMESH_INSECURE",  # --insecure for the API keys (ask, load); the demo's only way
    "CACHEMESH_DATA_DIR",
    "CACHEMESH_FREE_PORT_RANGE",  # the tools' free ports (tests: one range a worker)
    "CACHEMESH_DEMO_MODEL",
    "CACHEMESH_DEMO_STOPS_STACK",  # make demo: the stack it started is stopped after it
    "CACHEMESH_DEMO_NO_TOOLS",  # make demo-local: the agent sends no tools (local-small takes none)
    "ROUTER_TARGET",  # make calibrate-router's
)


def known_env_keys() -> frozenset[str]:
    """Every variable a service, a tool of the stack or a client reads."""
    return frozenset((*TOOL_ENV_KEYS, *(key for s in SERVICES for key in s.env_keys)))


def unread_settings(settings: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """Each name of ``settings`` with one of cachemesh's prefixes that nothing reads, sorted,
    with the known name closest to it (None when none is close); a Kubernetes service link
    (ROUTER_SERVICE_HOST, ...) is none (``services.common.setting_names``)."""
    return unread_names(settings, known_env_keys())


def service(name: str) -> ServiceDef:
    for candidate in SERVICES:
        if candidate.name == name:
            return candidate
    raise KeyError(f"no service {name!r} in the stack (known: {[s.name for s in SERVICES]})")


def stop_order() -> list[list[ServiceDef]]:
    """Waves of services to stop: a service stops before the peers it calls."""
    remaining = list(SERVICES)
    waves: list[list[ServiceDef]] = []
    while remaining:
        called = {peer for s in remaining for peer in s.peer_names}
        wave = [s for s in remaining if s.name not in called] or remaining
        waves.append(wave)
        remaining = [s for s in remaining if s not in wave]
    return waves
