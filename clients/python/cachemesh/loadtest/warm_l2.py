"""Did a run find the prefix cache (L2) warm? Its reads of prefixes no request of the run wrote.

A run's fresh namespace scopes the semantic cache (L1) only. Prefix-cache entries are scoped by
tenant and model (OpenAI's rows also by ``prompt_cache_key``, a parameter the provider itself
reads), and the engine's KV cache (L3) by the prompt alone: nothing in a request scopes them to
one run without changing the prompt, the key or the tenant, that is what is measured. So a run
on a stack an earlier run used reads that run's prefixes: it writes fewer, reports a larger
saving, and the offline estimator (which starts cold) estimates more than its bill.

A model call that read cached tokens is counted here when no request of the run (warm-up
included) that started before it, of its tenant and model, wrote a prefix its prompt begins
with, up to a block: for a row with breakpoints, the prefix at a breakpoint of a request that
wrote (``cache_creation_input_tokens``); for a row without (automatic caching), each block
boundary of a model call that read nothing (it wrote its whole prompt). A lower bound: a read
that shares any such prefix, or that started after a write it could not have read yet, is not
counted.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from cachemesh.loadtest.samples import Sample
from cachemesh.loadtest.workloads import Item
from cachemesh.v1 import gateway_pb2 as pb


class WarmReads(NamedTuple):
    requests: int  # model calls that read a prefix not written in the run
    read_tokens: int  # the cached tokens those calls read


def reads_not_written(
    samples: Sequence[Sample], warmup: Sequence[Item], plan: Sequence[Item]
) -> WarmReads:
    """The run's model calls (warm-up ones too) that read L2 prefixes the run had not written."""
    written: set[tuple[str, str, str]] = set()
    requests = tokens = 0
    sent = sorted((s for s in samples if s.ok and s.index >= 0), key=lambda s: s.started_s)
    for s in sent:
        if s.layer == "semantic_cache":  # no model call: nothing read or written
            continue
        item = (warmup if s.warmup else plan)[s.index]
        scope = (item.tenant, s.model)
        prefixes = list(_prefixes(item.request))
        if s.cache_read_tokens and not any((*scope, d) in written for d, _ in prefixes):
            requests += 1
            tokens += s.cache_read_tokens
        marked = [d for d, mark in prefixes if mark]
        if marked and s.cache_write_tokens:
            written.update((*scope, d) for d in marked)
        elif not marked and not s.cache_read_tokens:  # automatic caching: it wrote it all
            written.update((*scope, d) for d, _ in prefixes)
    return WarmReads(requests, tokens)


def _prefixes(request: pb.CompleteRequest) -> Iterator[tuple[str, bool]]:
    """The prompt's prefix at each block boundary (tools, system, then the messages' blocks,
    as the prefix cache orders them), as a digest, and whether a breakpoint ends it."""
    digest = hashlib.sha256(b"cachemesh.loadtest.prefix")
    blocks: list[tuple[bytes, pb.Tool | pb.ContentBlock]] = [(b"tool", t) for t in request.tools]
    blocks += [(b"system", b) for b in request.system]
    blocks += [(pb.Role.Name(m.role).encode(), b) for m in request.messages for b in m.content]
    for tag, block in blocks:
        marked = block.HasField("cache_control")
        bare = copy.deepcopy(block)
        bare.ClearField("cache_control")
        data = bare.SerializeToString(deterministic=True)
        digest.update(tag + len(data).to_bytes(8, "big") + data)
        yield digest.copy().hexdigest(), marked
