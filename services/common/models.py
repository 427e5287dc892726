"""The model table (``models.toml``): ids, tiers, prices in nano-dollars, caching rules."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.common.config import ConfigError, Env

AUTO = "auto"
Tier = Literal["small", "large"]


class ModelSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    tier: Tier
    provider: Literal["simulated"]
    rules: Literal["anthropic"]
    priced_like: str
    source: str = Field(min_length=1)
    input_nanos: int = Field(ge=0)
    output_nanos: int = Field(ge=0)
    cache_write_5m_nanos: int = Field(ge=0)
    cache_write_1h_nanos: int = Field(ge=0)
    cache_read_nanos: int = Field(ge=0)
    min_cacheable_tokens: int = Field(ge=0)
    context_window_tokens: int = Field(gt=0)
    max_output_tokens: int = Field(gt=0)
    prefill_tokens_per_s: float = Field(gt=0)
    decode_tokens_per_s: float = Field(gt=0)

    def baseline_nanos(self, prompt_tokens: int, output_tokens: int) -> int:
        """The same tokens at this model's base input and output prices, no cache of any kind."""
        return prompt_tokens * self.input_nanos + output_tokens * self.output_nanos


class ModelTable(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    models: dict[str, ModelSpec]
    auto: dict[Tier, str]

    @model_validator(mode="before")
    @classmethod
    def _ids_from_keys(cls, data: object) -> object:
        if isinstance(data, dict) and isinstance(data.get("models"), dict):
            data = dict(data)
            data["models"] = {
                key: {**row, "id": key} if isinstance(row, dict) else row
                for key, row in data["models"].items()
            }
        return data

    @model_validator(mode="after")
    def _auto_targets_exist(self) -> ModelTable:
        for tier, model_id in self.auto.items():
            spec = self.models.get(model_id)
            if spec is None or spec.tier != tier:
                raise ValueError(f"auto.{tier} = {model_id!r} is not a {tier}-tier model")
        return self

    def get(self, model_id: str) -> ModelSpec | None:
        return self.models.get(model_id)

    def for_tier(self, tier: Tier) -> ModelSpec:
        return self.models[self.auto[tier]]


def load_model_table(path: Path | None = None) -> ModelTable:
    try:
        if path is None:
            text = resources.files("services.common").joinpath("models.toml").read_text()
            where = "services/common/models.toml"
        else:
            text = path.read_text()
            where = str(path)
        return ModelTable.model_validate(tomllib.loads(text))
    except (OSError, tomllib.TOMLDecodeError, ValidationError) as exc:
        raise ConfigError(f"model table {where if path is None else path}: {exc}") from exc


def model_table_from_env(env: Env) -> ModelTable:
    """``CACHEMESH_MODELS_FILE`` names another table; unset = the packaged one."""
    override = env.optional_str("CACHEMESH_MODELS_FILE")
    return load_model_table(Path(override) if override else None)
