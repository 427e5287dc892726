"""The operator's own cap on ``max_tokens`` per model (CACHEMESH_MAX_OUTPUT_TOKENS).

``model=tokens,...`` (``*`` = every model not named) lowers a row's ``max_output_tokens`` below
the provider's limit in models.toml: every service reads the same variable, so the Gateway
refuses a larger ``max_tokens`` naming the cap (INVALID_ARGUMENT), the HTTP front uses the cap
as OpenAI's default, and the replicas agree. A cap above the model's own limit is refused at
start-up (it would promise what the provider refuses).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.common.env import MAX_TOKENS, ConfigError, digits_at_most

if TYPE_CHECKING:  # model_overrides.py applies the caps: no import back at run time
    from services.common.models import ModelTable

VARIABLE = "CACHEMESH_MAX_OUTPUT_TOKENS"


def parse_caps(value: str, table: ModelTable) -> dict[str, int]:
    """Model id (or ``*``) -> cap, checked against the table."""
    caps: dict[str, int] = {}
    for item in value.split(","):
        model, sep, tokens = item.strip().partition("=")
        model, tokens = model.strip(), tokens.strip()
        if (
            not sep
            or not model
            or not (tokens.isascii() and tokens.isdigit())
            or not tokens.strip("0")
        ):
            raise ConfigError(
                f"{VARIABLE}: expected model=tokens (tokens >= 1, '*' for every model, e.g. "
                f"*=8192,sim-large=4096), got {item.strip()[:64]!r}"
            )
        if model != "*" and table.get(model) is None:
            raise ConfigError(f"{VARIABLE}: {model[:64]!r} is not in the model table")
        if model in caps:
            raise ConfigError(f"{VARIABLE}: {model[:64]!r} is named twice")
        caps[model] = digits_at_most(f"{VARIABLE} ({model[:64]})", tokens, MAX_TOKENS, "tokens")
    for model, cap in caps.items():
        if model == "*":
            continue
        spec = table.get(model)
        assert spec is not None
        if cap > spec.max_output_tokens:
            raise ConfigError(
                f"{VARIABLE}: {model}={cap} is above the model's own limit "
                f"({spec.max_output_tokens}, models.toml)"
            )
    return caps


def with_output_caps(table: ModelTable, value: str) -> ModelTable:
    caps = parse_caps(value, table)
    default = caps.get("*")
    models = {}
    for model_id, spec in table.models.items():
        cap = caps.get(model_id, default)
        if cap is not None and cap < spec.max_output_tokens:
            spec = spec.model_copy(update={"max_output_tokens": cap})
        models[model_id] = spec
    return type(table)(models=models, auto=table.auto)
