"""Builds a provider replica's API from its settings: the official SDK client (its own
retries off: the adapter retries within the request's deadline), the adapter, the driver."""

from __future__ import annotations

import logging

import anthropic
import openai

from services.common.tokens import Tokenizer
from services.model.providers.anthropic_wire import AnthropicAdapter
from services.model.providers.api import Adapter, HealthSetter, ProviderApi
from services.model.providers.config import ProviderSettings
from services.model.providers.openai_wire import OpenAIAdapter
from services.model.settings import ModelSettings

# an engine that takes no key still gets one from the SDK's point of view (it requires one)
NO_KEY = "no-key"
# the SDKs and their HTTP stack log at DEBUG what a person does not need (request options):
# kept at INFO or above whatever CACHEMESH_LOG_LEVEL says
_QUIET_LOGGERS = ("anthropic", "openai", "httpx", "httpx2", "httpcore", "httpcore2")


def build_adapter(provider: ProviderSettings) -> Adapter:
    key = provider.api_key.reveal() if provider.api_key is not None else NO_KEY
    if provider.backend == "anthropic":
        return AnthropicAdapter(
            anthropic.AsyncAnthropic(
                api_key=key, base_url=provider.base_url, max_retries=0, open_telemetry=False
            )
        )
    return OpenAIAdapter(openai.AsyncOpenAI(api_key=key, base_url=provider.base_url, max_retries=0))


def build_provider_api(
    settings: ModelSettings, tokenizer: Tokenizer, set_health: HealthSetter
) -> ProviderApi:
    provider = settings.provider
    if provider is None:
        raise ValueError(f"MODEL_BACKEND={settings.backend} has no provider settings")
    for name in _QUIET_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(max(logger.getEffectiveLevel(), logging.INFO))
    return ProviderApi(
        adapter=build_adapter(provider),
        models=settings.models,
        replica_id=settings.replica_id,
        settings=provider,
        tokenizer=tokenizer,
        set_health=set_health,
    )
