"""The model replica's settings, read from the environment once at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from services.common.auth import internal_token_from_env
from services.common.env import ConfigError, Env
from services.common.metrics import MetricsSettings
from services.common.model_overrides import model_table_from_env
from services.common.models import ModelSpec, ModelTable
from services.common.server import ServerSettings
from services.common.tokens import CACHED_TOKENS, cache_tokens_from_env
from services.model.providers.config import (
    ENDPOINT_VARIABLES,
    RETRY_VARIABLES,
    UPSTREAM_IDS_VARIABLE,
    Backend,
    ProviderSettings,
    read_endpoint,
    read_retries,
    read_upstream_ids,
)
from services.model.speculative import Drafting, drafting_for

DEFAULT_LISTEN = "127.0.0.1:50054"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9104"  # model-2: MODEL_2_METRICS_LISTEN, renamed by the stack
DEFAULT_MODEL_IDS = "sim-small,sim-large"
DEFAULT_KV_CAPACITY_BLOCKS = 65536
# The slowest the simulator may run: each simulated second lasts at most 1000 (a 100-token
# answer at 1000 takes minutes). 1e300 was taken: every sleep (to inf past 1e308) never ended,
# the replica SERVING and never answering.
MAX_TIME_SCALE = 1000.0
# MODEL_MAX_CONCURRENT_CALLS: the calls a provider replica lets through to its engine at once
# (the rest wait in its tenant-fair queue); 0 = no gate
MAX_CONCURRENT_CALLS_VAR = "MODEL_MAX_CONCURRENT_CALLS"
MAX_CONCURRENT_CALLS = 10_000
# MODEL_BACKEND -> the table's providers it may serve
BACKENDS: dict[str, tuple[str, ...]] = {
    "simulated": ("simulated",),
    "anthropic": ("anthropic",),
    "openai": ("openai", "self_hosted"),
}


@dataclass(frozen=True)
class ModelSettings:
    server: ServerSettings
    metrics: MetricsSettings
    replica_id: str
    internal_token: str
    models: Mapping[str, ModelSpec]
    time_scale: float
    kv_capacity_blocks: int
    backend: str = "simulated"
    provider: ProviderSettings | None = None  # set for a provider backend
    # SIM_SPECULATIVE: the simulated models that decode with a draft
    drafting: Mapping[str, Drafting] = field(default_factory=dict)
    # a provider replica's gate (``max_concurrent_calls``); 0: none (the simulator has its own
    # one-prefill-at-a-time queue and reads nothing of it)
    max_concurrent_calls: int = 0
    # each vocabulary's encoding cache, in tokens' worth (CACHEMESH_TOKENIZER_CACHE_TOKENS)
    tokenizer_cache_tokens: int = CACHED_TOKENS
    # provider settings set (and valid) that this backend does not read: named in a warning
    # at start-up (a simulated replica's ANTHROPIC_API_KEY), never with their values
    unused: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ModelSettings:
        env = Env(environ)
        server = ServerSettings.from_env(env, "MODEL", DEFAULT_LISTEN)
        backend = env.str("MODEL_BACKEND", "simulated")
        if backend not in BACKENDS:
            raise ConfigError(
                f"MODEL_BACKEND must be one of {', '.join(BACKENDS)}, got {backend[:64]!r}"
            )
        provider: ProviderSettings | None = None
        if backend != "simulated":
            provider = ProviderSettings.from_env(env, _backend(backend))
        _check_unread(env, provider)
        table = model_table_from_env(env)
        models = _served_models(env, table, backend)
        read = provider.upstream_ids if provider is not None else read_upstream_ids(env)
        upstream_ids = _checked_upstream_ids(table, dict(read))
        gate = max_concurrent_calls(env, models)  # checked whatever the backend
        if provider is not None:
            models = _named_upstream(models, upstream_ids)
        return cls(
            server=server,
            metrics=MetricsSettings.from_env(env, "MODEL", DEFAULT_METRICS_LISTEN),
            replica_id=env.str("MODEL_REPLICA_ID", server.listen),
            internal_token=internal_token_from_env(env),
            models=models,
            backend=backend,
            provider=provider,
            time_scale=env.float("SIM_TIME_SCALE", 1.0, minimum=0.0, maximum=MAX_TIME_SCALE),
            kv_capacity_blocks=env.count(
                "MODEL_KV_CAPACITY_BLOCKS", DEFAULT_KV_CAPACITY_BLOCKS, minimum=0
            ),
            drafting=_drafting(env, table, models),
            max_concurrent_calls=gate if provider else 0,
            tokenizer_cache_tokens=cache_tokens_from_env(env),
            unused=_unused(env, provider),
        )


def _check_unread(env: Env, provider: ProviderSettings | None) -> None:
    """The provider settings this replica's backend does not read, checked as the backend that
    reads them would (no key is required): a malformed one is refused now, not when the
    backend is switched to it (ConfigError names the variable, never a key)."""
    for backend in ENDPOINT_VARIABLES:
        if provider is None or provider.backend != backend:
            read_endpoint(env, backend)
    if provider is None:
        read_retries(env)


def _unused(env: Env, provider: ProviderSettings | None) -> tuple[str, ...]:
    """The provider settings set that this backend does not read, in a fixed order."""
    if provider is None:
        endpoints = (name for own in ENDPOINT_VARIABLES.values() for name in own)
        names = (MAX_CONCURRENT_CALLS_VAR, UPSTREAM_IDS_VARIABLE, *endpoints, *RETRY_VARIABLES)
    else:
        names = tuple(
            name
            for backend, own in ENDPOINT_VARIABLES.items()
            if backend != provider.backend
            for name in own
        )
    return tuple(name for name in names if env.optional_str(name) is not None)


def max_concurrent_calls(env: Env, models: Mapping[str, ModelSpec]) -> int:
    """``MODEL_MAX_CONCURRENT_CALLS``, else the default: a self-hosted engine's slot count
    (its rows' ``replica_slots``, llama-server's ``--parallel``; the smallest, if the rows
    served differ), so that the calls wait in the replica's tenant-fair queue rather than in
    the engine's first-come-first-served one; else 0, no gate (a hosted provider, or an
    engine that batches every call, vLLM or SGLang: set it to what the engine runs at once)."""
    slots = [spec.replica_slots for spec in models.values() if spec.replica_slots is not None]
    default = min(slots) if slots else 0
    return env.count(MAX_CONCURRENT_CALLS_VAR, default, maximum=MAX_CONCURRENT_CALLS)


def _drafting(env: Env, table: ModelTable, models: Mapping[str, ModelSpec]) -> dict[str, Drafting]:
    """With SIM_SPECULATIVE on, each served model whose row names a draft decodes with it."""
    if not env.bool("SIM_SPECULATIVE", False):
        return {}
    drafting = {model_id: drafting_for(spec, table) for model_id, spec in models.items()}
    return {model_id: d for model_id, d in drafting.items() if d is not None}


def _backend(name: str) -> Backend:
    return "anthropic" if name == "anthropic" else "openai"


def _checked_upstream_ids(table: ModelTable, upstream_ids: dict[str, str]) -> dict[str, str]:
    """``MODEL_UPSTREAM_IDS``, each key a model of the table (a typo left the table's id sent,
    and the engine refused every request): one this replica does not serve is fine, model-2
    shares the variable."""
    for model_id in upstream_ids:
        if model_id not in table.models:
            known = ", ".join(table.models)
            raise ConfigError(
                f"MODEL_UPSTREAM_IDS: {model_id[:64]!r} is not in the model table (known: {known})"
            )
    return upstream_ids


def _named_upstream(
    models: Mapping[str, ModelSpec], upstream_ids: Mapping[str, str]
) -> dict[str, ModelSpec]:
    """The served models under the engine's names (``MODEL_UPSTREAM_IDS``), what the adapter
    sends and the start-up line prints."""
    return {
        model_id: spec.model_copy(update={"upstream_id": upstream_ids[model_id]})
        if model_id in upstream_ids
        else spec
        for model_id, spec in models.items()
    }


def _served_models(env: Env, table: ModelTable, backend: str) -> dict[str, ModelSpec]:
    ids = [part.strip() for part in env.str("MODEL_IDS", DEFAULT_MODEL_IDS).split(",")]
    if not all(ids):
        raise ConfigError(f"MODEL_IDS must be comma-separated model ids, got {','.join(ids)!r}")
    models: dict[str, ModelSpec] = {}
    for model_id in ids:
        spec = table.get(model_id)
        if spec is None:
            known = ", ".join(table.models)
            raise ConfigError(f"MODEL_IDS: {model_id!r} is not in the model table (known: {known})")
        if spec.provider not in BACKENDS[backend]:
            raise ConfigError(
                f"MODEL_IDS: {model_id!r} has provider {spec.provider!r}; MODEL_BACKEND="
                f"{backend} serves provider {' or '.join(repr(p) for p in BACKENDS[backend])} "
                "models"
            )
        models[model_id] = spec
    return models
