"""prefix-cache's approximate view of each model replica's KV cache (L3).

The replicas hold the truth; this view mirrors it from what prefix-cache sees: a WARM commit
names the replica that prefilled the prompt, so its blocks are inserted there (routing
decisions), and the replica's own report of the tokens it reused (``kv_cached_tokens``) is
compared with the prediction (replica reports): the difference is counted as the view's error
(after the prefill the replica holds every block of the prompt again, so the view inserts
them all either way). The hashes and the LRU policy
are the engine's own (``services.common.kv_blocks``), with the same capacity in blocks, so
when every request goes through one prefix-cache the view is exact.

The view lives in this process: with several prefix-cache replicas each keeps its own
(approximate, by design); the shared state in Redis is the provider prompt cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.common.kv_blocks import KvBlockCache, block_hashes


@dataclass
class ViewStats:
    reports: int = 0
    predicted_tokens: int = 0
    reported_tokens: int = 0
    abs_error_tokens: int = 0


class ReplicaViews:
    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be >= 1, got {capacity_blocks}")
        self._capacity = capacity_blocks
        self._views: dict[str, KvBlockCache] = {}
        self.stats = ViewStats()

    def _view(self, replica: str) -> KvBlockCache:
        view = self._views.get(replica)
        if view is None:
            view = self._views[replica] = KvBlockCache(self._capacity)
        return view

    @staticmethod
    def hashes(tenant: str, model: str, token_ids: Sequence[int]) -> list[bytes]:
        return block_hashes(tenant, model, token_ids)

    def match(self, replica: str, hashes: Sequence[bytes], prompt_tokens: int) -> int:
        """Tokens the replica is predicted to reuse (full blocks, never the last token)."""
        view = self._views.get(replica)
        return 0 if view is None else view.cached_tokens(hashes, prompt_tokens)

    def record(
        self,
        replica: str,
        hashes: Sequence[bytes],
        prompt_tokens: int,
        reported_tokens: int | None,
    ) -> int:
        """The replica prefilled this prompt: its blocks are now cached there. A report of the
        tokens it reused is scored against the prediction. Returns the predicted match."""
        view = self._view(replica)
        predicted = view.cached_tokens(hashes, prompt_tokens)
        if reported_tokens is not None:
            self.stats.reports += 1
            self.stats.predicted_tokens += predicted
            self.stats.reported_tokens += reported_tokens
            self.stats.abs_error_tokens += abs(predicted - reported_tokens)
        view.insert(hashes)
        return predicted
