"""Builds a provider replica's API from its settings: the official SDK client (its own
retries off: the adapter retries within the request's deadline), the adapter, the driver."""

from __future__ import annotations

import logging

from services.common.tokens import Tokenizer, Tokenizers
from services.model.metrics import ModelMetrics
from services.model.providers.api import Adapter, HealthSetter, ProviderApi
from services.model.providers.config import ProviderSettings
from services.model.providers.redact import UrlFilter
from services.model.settings import ModelSettings

# an engine that takes no key still gets one from the SDK's point of view (it requires one)
NO_KEY = "no-key"
# the SDKs and their HTTP stack log at DEBUG what a person does not need (request options):
# kept at INFO or above whatever CACHEMESH_LOG_LEVEL says
_QUIET_LOGGERS = ("anthropic", "openai", "httpx", "httpx2", "httpcore", "httpcore2")
# httpx2 logs every request at INFO with its whole URL ("HTTP Request: POST
# http://user:password@host/v1/chat/completions ..."): kept at WARNING (the router's access
# log tells the requests), and a URL any of these loggers writes never shows its credentials
_URL_LOGGERS = ("httpx", "httpx2")


def build_adapter(provider: ProviderSettings) -> Adapter:
    """The backend's adapter, its SDK imported here: a replica imports its own backend's SDK
    only (the other's import costs CPU and memory for nothing, ``failures._SDKS``)."""
    key = provider.api_key.reveal() if provider.api_key is not None else NO_KEY
    if provider.backend == "anthropic":
        import anthropic

        from services.model.providers.anthropic_wire import AnthropicAdapter

        return AnthropicAdapter(
            anthropic.AsyncAnthropic(
                api_key=key, base_url=provider.base_url, max_retries=0, open_telemetry=False
            )
        )
    import openai

    from services.model.providers.openai_wire import OpenAIAdapter

    return OpenAIAdapter(openai.AsyncOpenAI(api_key=key, base_url=provider.base_url, max_retries=0))


def build_provider_api(
    settings: ModelSettings,
    tokenizer: Tokenizers | Tokenizer,
    set_health: HealthSetter,
    metrics: ModelMetrics | None = None,
) -> ProviderApi:
    provider = settings.provider
    if provider is None:
        raise ValueError(f"MODEL_BACKEND={settings.backend} has no provider settings")
    adapter = build_adapter(provider)  # its SDK's first import sets the SDK's loggers
    quiet_library_logs()  # after it: ANTHROPIC_LOG=debug set them to DEBUG (prompts logged)
    return ProviderApi(
        adapter=adapter,
        models=settings.models,
        replica_id=settings.replica_id,
        settings=provider,
        tokenizer=tokenizer,
        set_health=set_health,
        max_concurrent_calls=settings.max_concurrent_calls,
        watcher=metrics,
        waits=metrics.queue_wait if metrics is not None else None,
    )


def quiet_library_logs() -> None:
    """The SDKs' and HTTP stack's loggers: no DEBUG, no request URL at INFO, and no URL with
    its credentials at any level (once per logger, however many replicas a process builds)."""
    for name in _QUIET_LOGGERS:
        logger = logging.getLogger(name)
        floor = logging.WARNING if name in _URL_LOGGERS else logging.INFO
        logger.setLevel(max(logger.getEffectiveLevel(), floor))
        if not any(isinstance(f, UrlFilter) for f in logger.filters):
            logger.addFilter(UrlFilter())
