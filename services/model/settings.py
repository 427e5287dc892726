"""The model replica's settings, read from the environment once at start-up."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.common.env import ConfigError, Env
from services.common.models import ModelSpec, model_table_from_env
from services.common.server import ServerSettings

DEFAULT_LISTEN = "127.0.0.1:50054"
DEFAULT_MODEL_IDS = "sim-small,sim-large"
DEFAULT_KV_CAPACITY_BLOCKS = 65536


@dataclass(frozen=True)
class ModelSettings:
    server: ServerSettings
    replica_id: str
    internal_token: str
    models: Mapping[str, ModelSpec]
    time_scale: float
    kv_capacity_blocks: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ModelSettings:
        env = Env(environ)
        server = ServerSettings.from_env(env, "MODEL", DEFAULT_LISTEN)
        return cls(
            server=server,
            replica_id=env.str("MODEL_REPLICA_ID", server.listen),
            internal_token=env.str("CACHEMESH_INTERNAL_TOKEN"),
            models=_served_models(env),
            time_scale=env.float("SIM_TIME_SCALE", 1.0, minimum=0.0),
            kv_capacity_blocks=env.int(
                "MODEL_KV_CAPACITY_BLOCKS", DEFAULT_KV_CAPACITY_BLOCKS, minimum=0
            ),
        )


def _served_models(env: Env) -> dict[str, ModelSpec]:
    table = model_table_from_env(env)
    ids = [part.strip() for part in env.str("MODEL_IDS", DEFAULT_MODEL_IDS).split(",")]
    if not all(ids):
        raise ConfigError(f"MODEL_IDS must be comma-separated model ids, got {','.join(ids)!r}")
    models: dict[str, ModelSpec] = {}
    for model_id in ids:
        spec = table.get(model_id)
        if spec is None:
            known = ", ".join(table.models)
            raise ConfigError(f"MODEL_IDS: {model_id!r} is not in the model table (known: {known})")
        if spec.provider != "simulated":
            raise ConfigError(
                f"MODEL_IDS: {model_id!r} has provider {spec.provider!r}; "
                "this replica only simulates provider 'simulated' models"
            )
        models[model_id] = spec
    return models
