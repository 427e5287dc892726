"""The operator's changes to the model table: ``CACHEMESH_MODELS_FILE`` names another table,
and ``CACHEMESH_PRICES``, ``CACHEMESH_AUTO_*``, ``CACHEMESH_MAX_OUTPUT_TOKENS``,
``CACHEMESH_PRIOR_PREFILL_TPS`` and ``CACHEMESH_CONTEXT_WINDOWS`` change its rows and
``auto``'s tiers (``model_table_from_env``: every service that reads a model table reads it so)."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from services.common.env import (
    MAX_TOKENS,
    MAX_TOKENS_PER_S,
    ConfigError,
    Env,
    digits_at_most,
    figure,
)
from services.common.models import (
    LARGEST,
    MAX_PRICE_NANOS,
    SMALLEST,
    ModelSpec,
    ModelTable,
    Tier,
    load_model_table,
    one_line,
)
from services.common.output_caps import with_output_caps


def model_table_from_env(env: Env) -> ModelTable:
    """``CACHEMESH_MODELS_FILE`` names another table; unset = the packaged one.
    ``CACHEMESH_PRICES`` then sets prices of rows (see ``with_prices``), and
    ``CACHEMESH_MAX_OUTPUT_TOKENS`` caps ``max_tokens`` (``services.common.output_caps``),
    ``CACHEMESH_PRIOR_PREFILL_TPS`` and ``CACHEMESH_CONTEXT_WINDOWS`` set rows' prior prefill
    rates and context windows, and ``CACHEMESH_AUTO_*`` sets ``auto``'s tiers."""
    override = env.optional_str("CACHEMESH_MODELS_FILE")
    try:
        table = load_model_table(Path(override) if override else None)
    except ConfigError as exc:
        if not override:
            raise  # the packaged table: not the operator's setting
        raise ConfigError(f"CACHEMESH_MODELS_FILE: {exc}") from None
    prices = env.optional_str("CACHEMESH_PRICES")
    if prices:
        table = with_prices(table, prices)
    table = with_auto_tiers(table, env)
    caps = env.optional_str("CACHEMESH_MAX_OUTPUT_TOKENS")
    if caps:
        table = with_output_caps(table, caps)
    priors = env.optional_str(PRIOR_VARIABLE)
    if priors:
        table = with_prior_prefill(table, priors)
    windows = env.optional_str(WINDOW_VARIABLE)
    if windows:
        table = with_context_windows(table, windows)
    return table


PRIOR_VARIABLE = "CACHEMESH_PRIOR_PREFILL_TPS"


def _once(variable: str, model_id: str, seen: set[str]) -> None:
    """A model named twice in one of these variables is refused (as CACHEMESH_MAX_OUTPUT_TOKENS
    does): the last one won, or, for prices, the second applied to the first's result and
    they compounded (a cache read billed 0 instead of 300)."""
    if model_id in seen:
        raise ConfigError(f"{variable}: {model_id[:64]!r} is named twice")
    seen.add(model_id)


def with_prior_prefill(table: ModelTable, value: str) -> ModelTable:
    """``model=tokens_per_s,...``: each row's ``prior_prefill_tokens_per_s`` (the operator
    knows how fast their engine prefills before the router has measured it)."""
    models = dict(table.models)
    seen: set[str] = set()
    for item in value.split(","):
        model_id, sep, given = item.strip().partition("=")
        try:
            rate = float(given) if sep else 0.0
        except ValueError:
            rate = 0.0
        if not 0 < rate <= MAX_TOKENS_PER_S:  # a NaN is not
            raise ConfigError(
                f"{PRIOR_VARIABLE}: expected model=tokens_per_s with a rate > 0 and at most "
                f"{figure(MAX_TOKENS_PER_S)} (e.g. local-small=150), got {item.strip()[:64]!r}"
            )
        spec = models.get(model_id)
        if spec is None:
            raise ConfigError(f"{PRIOR_VARIABLE}: {model_id[:64]!r} is not in the model table")
        _once(PRIOR_VARIABLE, model_id, seen)
        try:
            models[model_id] = ModelSpec.model_validate(
                {
                    **spec.model_dump(exclude_unset=True),
                    "prior_prefill_tokens_per_s": rate,
                    "id": model_id,
                }
            )
        except ValidationError as exc:
            raise ConfigError(f"{PRIOR_VARIABLE}: {model_id}: {one_line(exc)}") from exc
    return ModelTable(models=models, auto=table.auto)


WINDOW_VARIABLE = "CACHEMESH_CONTEXT_WINDOWS"


def with_context_windows(table: ModelTable, value: str) -> ModelTable:
    """``model=tokens,...``: each row's ``context_window_tokens`` (a self-hosted engine's is
    the context it was started with, which ``auto`` must not exceed)."""
    models = dict(table.models)
    seen: set[str] = set()
    for item in value.split(","):
        model_id, sep, figure = (part.strip() for part in item.partition("="))
        if not sep or not (figure.isascii() and figure.isdigit()) or not figure.strip("0"):
            raise ConfigError(
                f"{WINDOW_VARIABLE}: expected model=tokens with tokens >= 1 "
                f"(e.g. local-small=4096), got {item.strip()[:64]!r}"
            )
        tokens = digits_at_most(
            f"{WINDOW_VARIABLE} ({model_id[:64]})", figure, MAX_TOKENS, "tokens"
        )
        spec = models.get(model_id)
        if spec is None:
            raise ConfigError(f"{WINDOW_VARIABLE}: {model_id[:64]!r} is not in the model table")
        _once(WINDOW_VARIABLE, model_id, seen)
        models[model_id] = spec.model_copy(update={"context_window_tokens": tokens})
    return ModelTable(models=models, auto=table.auto)


_AUTO_VARIABLES = "CACHEMESH_AUTO_TIERS / CACHEMESH_AUTO_SMALL / CACHEMESH_AUTO_LARGE"


def with_auto_tiers(table: ModelTable, env: Env) -> ModelTable:
    """``CACHEMESH_AUTO_TIERS`` (``tier=model,...``, e.g. ``medium=sim-medium``) sets or adds
    ``auto``'s tiers (a tier other than small and large must be a row's ``tier``);
    ``CACHEMESH_AUTO_SMALL`` / ``CACHEMESH_AUTO_LARGE`` set the two ends."""
    auto: dict[Tier, str] = dict(table.auto)
    tiers = env.optional_str("CACHEMESH_AUTO_TIERS")
    for item in (tiers or "").split(","):
        if not item.strip():
            continue
        tier, sep, model_id = item.strip().partition("=")
        if not sep or not tier or not model_id:
            raise ConfigError(
                "CACHEMESH_AUTO_TIERS: expected tier=model,... (e.g. medium=sim-medium), got "
                f"{item.strip()[:64]!r}"
            )
        auto[tier.strip()] = model_id.strip()
    for tier, variable in ((SMALLEST, "CACHEMESH_AUTO_SMALL"), (LARGEST, "CACHEMESH_AUTO_LARGE")):
        end = env.optional_str(variable)
        if end:
            auto[tier] = end
    if auto == table.auto:
        return table
    try:
        return ModelTable(models=table.models, auto=auto)
    except ValidationError as exc:
        raise ConfigError(f"{_AUTO_VARIABLES}: {one_line(exc)}") from exc


_PRICE_FIELDS = ("input_nanos", "output_nanos", "cache_read_nanos")


# Prices the providers set as multiples of the input price (Anthropic's writes: 1.25x for 5
# minutes, 2x for an hour; a read when not given: the row's own discount).
_INPUT_MULTIPLES = ("cache_write_5m_nanos", "cache_write_1h_nanos", "cache_read_nanos")


def _priced_from_input(spec: ModelSpec, update: dict[str, int]) -> dict[str, int]:
    """The row's prices tied to its input price, kept at the row's own ratio to the new input
    price: a new input price with the old write prices billed a cache write below the
    uncached price. The prices the variable gives are kept as given."""
    new_input = update["input_nanos"]
    if spec.input_nanos == 0 or new_input == spec.input_nanos:
        return {}
    scaled: dict[str, int] = {}
    for name in _INPUT_MULTIPLES:
        old = getattr(spec, name)
        if name not in update and name in spec.model_fields_set and old:
            scaled[name] = (old * new_input + spec.input_nanos // 2) // spec.input_nanos
    return scaled


def _long_context_priced(spec: ModelSpec, update: dict[str, int]) -> dict[str, object]:
    """The row's long-context rates kept at their ratio to the prices ``update`` sets (GPT-5.4
    over 272K is 2x input and 1.5x output at any price: Batch, flex, a contract); a rate
    whose row price was 0 is kept as the table gives it."""
    if spec.long_context is None:
        return {}
    rates = spec.long_context.model_dump(exclude_unset=True)
    for name, new in update.items():
        old = getattr(spec, name)
        if name in rates and old and new != old:
            rates[name] = (rates[name] * new + old // 2) // old
    return {"long_context": rates}


def with_prices(table: ModelTable, value: str) -> ModelTable:
    """``model=input/output[/cache_read],...`` in nano-dollars a token: the operator's own
    prices (a self-hosted engine has no published price, a contract has its own). The cache
    write prices, and the read when not given, keep their ratio to the input price, and a
    row's long-context rates their ratio to the price each stands for. Every service reads
    the same variable, so the router, prefix-cache and the replicas bill alike."""
    models = dict(table.models)
    seen: set[str] = set()
    for item in value.split(","):
        model_id, sep, figures = item.strip().partition("=")
        parts = [p.strip() for p in figures.split("/")]
        # isascii too: "²" is a digit to isdigit() but not to int() (a traceback)
        if (
            not sep
            or not 2 <= len(parts) <= 3
            or not all(p.isascii() and p.isdigit() for p in parts)
        ):
            raise ConfigError(
                "CACHEMESH_PRICES: expected model=input/output[/cache_read] in whole nano-dollars "
                f"a token (e.g. local-small=100/100/0), got {item.strip()[:64]!r}"
            )
        spec = models.get(model_id)
        if spec is None:
            raise ConfigError(f"CACHEMESH_PRICES: {model_id[:64]!r} is not in the model table")
        _once("CACHEMESH_PRICES", model_id, seen)
        update = {
            name: digits_at_most(
                f"CACHEMESH_PRICES ({model_id[:64]} {name})",
                p,
                MAX_PRICE_NANOS,
                "nano-dollars a token",
            )
            for name, p in zip(_PRICE_FIELDS, parts, strict=False)
        }
        update |= _priced_from_input(spec, update)
        row = {**spec.model_dump(exclude_unset=True), **update}
        row |= _long_context_priced(spec, update)
        try:
            models[model_id] = ModelSpec.model_validate({**row, "id": model_id})
        except ValidationError as exc:
            raise ConfigError(f"CACHEMESH_PRICES: {model_id}: {one_line(exc)}") from exc
    return ModelTable(models=models, auto=table.auto)
