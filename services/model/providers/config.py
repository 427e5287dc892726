"""A provider replica's settings, read and checked once at start-up.

The API key comes from ``<P>_API_KEY`` or from the file named by ``<P>_API_KEY_FILE`` (a
mounted secret), never both; it is held in ``Secret`` whose repr hides it, and no message
here ever repeats it. The base URL may carry credentials too (``http://user:password@host/v1``,
an engine behind basic auth, or ``http://token@host/v1``): messages and logs show it through
``redacted_url``, and the HTTP stack's loggers never print it whole (``wiring``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

from services.common.env import ConfigError, Env, redacted_url
from services.common.models import ModelSpec

Backend = Literal["anthropic", "openai"]
DEFAULT_BASE_URLS: dict[Backend, str] = {
    "anthropic": "https://api.anthropic.com",
    "openai": "https://api.openai.com/v1",
}
_PREFIX: dict[Backend, str] = {"anthropic": "ANTHROPIC", "openai": "OPENAI"}


def provider_name(spec: ModelSpec, backend: str) -> str:
    """Who serves ``spec``'s row, as its errors and log lines name it: the row's provider in
    the model table. A ``self_hosted`` row (llama-server, vLLM, SGLang... by base URL) is
    served through the OpenAI-compatible adapter, whose name ``backend`` is: its refusal said
    "openai refused the request", and a person running llama.cpp read that OpenAI had refused
    them. The adapter's own settings (``OPENAI_BASE_URL``, ``OPENAI_API_KEY``) keep its name."""
    return "self-hosted engine" if spec.provider == "self_hosted" else backend


class Secret:
    """A credential: ``reveal()`` hands it to the SDK; ``str``/``repr`` never show it."""

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('[redacted]')"

    __str__ = __repr__


@dataclass(frozen=True)
class ProviderSettings:
    backend: Backend
    base_url: str
    api_key: Secret | None  # None: an OpenAI-compatible engine that takes no key
    max_retries: int  # retries of a 429 / 529 / 5xx / overloaded before the first token
    backoff_s: float  # the first retry's wait without retry-after; doubles, with jitter
    backoff_max_s: float
    auth_recheck_s: float  # after our key (401) or account is refused, refuse at once this long
    # table id -> the provider's model id (MODEL_UPSTREAM_IDS); ModelSettings checks the ids
    # and applies them to the served models
    upstream_ids: Mapping[str, str]

    @classmethod
    def from_env(cls, env: Env, backend: Backend) -> ProviderSettings:
        prefix = _PREFIX[backend]
        base_url, key = read_endpoint(env, backend)
        if key is None and (backend == "anthropic" or base_url == DEFAULT_BASE_URLS[backend]):
            shown = redacted_url(base_url)[:80]  # never its password
            raise ConfigError(
                f"{prefix}_API_KEY or {prefix}_API_KEY_FILE is required for {shown} "
                "(a file holding the key is safer: it stays out of the process environment)"
            )
        retries = read_retries(env)
        return cls(
            backend=backend,
            base_url=base_url,
            api_key=key,
            max_retries=retries.max_retries,
            backoff_s=retries.backoff_s,
            backoff_max_s=retries.backoff_max_s,
            auth_recheck_s=retries.auth_recheck_s,
            upstream_ids=read_upstream_ids(env),
        )

    @property
    def at_the_providers_own_url(self) -> bool:
        """The adapter calls its provider's own API (``DEFAULT_BASE_URLS``), not a gateway, a
        proxy or an engine behind ``*_BASE_URL``, whose error bodies may hold any text."""
        return self.base_url == DEFAULT_BASE_URLS[self.backend]

    @property
    def shown_url(self) -> str:
        """The base URL for logs and messages: no password, no query."""
        return redacted_url(self.base_url)

    def secrets(self) -> list[str]:
        """What no message may repeat: the key, and the base URL's credential: its password,
        or a user name without one (``http://token@host``: the token itself), as written and
        percent-decoded."""
        key = self.api_key.reveal() if self.api_key is not None else ""
        try:
            parts = urlsplit(self.base_url)
            credential = parts.password or parts.username or ""
        except ValueError:
            credential = ""
        found = [key, credential, unquote(credential)]
        return [s for n, s in enumerate(found) if s and s not in found[:n]]


# Every variable a provider replica reads (besides MODEL_MAX_CONCURRENT_CALLS, the model
# settings'): each backend's own, the engine's names of the models, the retries.
ENDPOINT_VARIABLES: dict[Backend, tuple[str, ...]] = {
    backend: (f"{prefix}_BASE_URL", f"{prefix}_API_KEY", f"{prefix}_API_KEY_FILE")
    for backend, prefix in _PREFIX.items()
}
UPSTREAM_IDS_VARIABLE = "MODEL_UPSTREAM_IDS"
RETRY_VARIABLES = (
    "PROVIDER_MAX_RETRIES",
    "PROVIDER_BACKOFF_S",
    "PROVIDER_BACKOFF_MAX_S",
    "PROVIDER_AUTH_RECHECK_S",
)


@dataclass(frozen=True)
class Retries:
    max_retries: int
    backoff_s: float
    backoff_max_s: float
    auth_recheck_s: float


def read_endpoint(env: Env, backend: Backend) -> tuple[str, Secret | None]:
    """``backend``'s base URL (http or https) and key (checked as ``read_api_key`` does), or
    its defaults; whether a key is required is the caller's rule. A replica of another backend
    reads them too, only to refuse a malformed one before the backend is switched to it."""
    prefix = _PREFIX[backend]
    base_url = env.str(f"{prefix}_BASE_URL", DEFAULT_BASE_URLS[backend]).rstrip("/")
    if not base_url.startswith(("http://", "https://")):
        shown = redacted_url(base_url)[:80]  # never its password
        raise ConfigError(f"{prefix}_BASE_URL must be an http:// or https:// URL, got {shown}")
    return base_url, read_api_key(env, prefix)


def read_retries(env: Env) -> Retries:
    """``PROVIDER_*``: the retries of a refused or overloaded call, and the auth re-check."""
    return Retries(
        max_retries=env.int("PROVIDER_MAX_RETRIES", 2, minimum=0, maximum=10),
        backoff_s=env.seconds("PROVIDER_BACKOFF_S", 0.5, minimum=0.0),
        backoff_max_s=env.seconds("PROVIDER_BACKOFF_MAX_S", 8.0, minimum=0.0),
        auth_recheck_s=env.seconds("PROVIDER_AUTH_RECHECK_S", 60.0, minimum=0.0),
    )


def read_upstream_ids(env: Env) -> dict[str, str]:
    return parse_upstream_ids(env.str(UPSTREAM_IDS_VARIABLE, ""))


def read_api_key(env: Env, prefix: str) -> Secret | None:
    """``<prefix>_API_KEY``, or the file ``<prefix>_API_KEY_FILE`` names (read as every
    secret file is: ``Env.secret``), one key without spaces; None when neither is set."""
    name = f"{prefix}_API_KEY"
    value = env.secret(name)
    if value is not None and any(c.isspace() for c in value):
        given = name if env.optional_str(name) is not None else f"{name}_FILE"
        raise ConfigError(f"{given}: must be one key, without spaces or line breaks (not shown)")
    return Secret(value) if value is not None else None


def parse_upstream_ids(value: str) -> dict[str, str]:
    """``local-small=SmolLM2-135M-Instruct,...``: the engine's names for the table's models."""
    ids: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        model, sep, upstream = item.partition("=")
        if not sep or not model.strip() or not upstream.strip():
            raise ConfigError(f"MODEL_UPSTREAM_IDS: expected model=upstream-id, got {item[:64]!r}")
        ids[model.strip()] = upstream.strip()
    return ids
