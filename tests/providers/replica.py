"""A provider replica (``ProviderApi``) built in process as the model service's ``serve()``
builds it (``services.model.providers.wiring``): its settings, its adapter from those settings
(the real SDK client), the table's rows, their own vocabularies. A test names only what it
varies: the engine (an adapter of its own), the retries, the key, the clock, the health."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

from services.common.env import Env
from services.common.logs import configure_logging
from services.common.models import ModelSpec, load_model_table
from services.common.tokens import Tokenizer, Tokenizers, load_tokenizers
from services.model.fair_queue import QueueWatcher
from services.model.providers.api import Adapter, HealthSetter, ProviderApi, QueueWaits, Sleep
from services.model.providers.config import Backend, ProviderSettings, Secret
from services.model.providers.wiring import _QUIET_LOGGERS, build_adapter


def provider_settings(
    backend: Backend,
    base_url: str,
    api_key: str | None = None,
    *,
    max_retries: int = 0,
    backoff_s: float = 0.0,
    backoff_max_s: float = 0.0,
    auth_recheck_s: float = 60.0,
    upstream_ids: Mapping[str, str] | None = None,
) -> ProviderSettings:
    """A replica's settings; ``api_key`` None: an engine that takes no key."""
    return ProviderSettings(
        backend=backend,
        base_url=base_url,
        api_key=None if api_key is None else Secret(api_key),
        max_retries=max_retries,
        backoff_s=backoff_s,
        backoff_max_s=backoff_max_s,
        auth_recheck_s=auth_recheck_s,
        upstream_ids={} if upstream_ids is None else upstream_ids,
    )


async def no_health(serving: bool) -> None:
    """A replica's health setter that records nothing."""
    return None


def provider_replica(
    settings: ProviderSettings,
    models: Iterable[str | ModelSpec],
    *,
    adapter: Adapter | None = None,
    tokenizer: Tokenizers | Tokenizer | None = None,
    replica_id: str = "r1",
    set_health: HealthSetter = no_health,
    clock: Callable[[], float] = time.monotonic,
    sleep: Sleep = asyncio.sleep,
    max_concurrent_calls: int = 0,
    watcher: QueueWatcher | None = None,
    waits: QueueWaits | None = None,
) -> ProviderApi:
    """A replica serving ``models`` (a table id: its row; a spec: itself) through ``adapter``
    (None: the SDK's, built from ``settings`` as ``serve()`` builds it), counting with
    ``tokenizer`` (None: the rows' own vocabularies)."""
    table = load_model_table()
    specs = [table.models[m] if isinstance(m, str) else m for m in models]
    return ProviderApi(
        adapter=build_adapter(settings) if adapter is None else adapter,
        models={spec.id: spec for spec in specs},
        replica_id=replica_id,
        settings=settings,
        tokenizer=load_tokenizers(specs) if tokenizer is None else tokenizer,
        set_health=set_health,
        clock=clock,
        sleep=sleep,
        max_concurrent_calls=max_concurrent_calls,
        watcher=watcher,
        waits=waits,
    )


def service_log(env: Env) -> Iterator[io.StringIO]:
    """A log fixture's body: the service's log lines (json) as ``configure_logging`` sets them
    for ``env``; the root handler, its level and the levels and filters of the libraries'
    loggers as they were afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    libraries = {name: logging.getLogger(name) for name in _QUIET_LOGGERS}
    before = {name: (lg.level, list(lg.filters)) for name, lg in libraries.items()}
    out = io.StringIO()
    configure_logging(env, out)
    yield out
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lg in libraries.items():
        lg.setLevel(before[name][0])
        lg.filters[:] = before[name][1]
