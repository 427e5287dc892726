"""Which near neighbour, if any, a lookup may serve.

Candidates come best first. One is acceptable when its cosine reaches the threshold, it is
servable (unexpired, complete, same embedder...) and the verifier does not refuse it. The
best acceptable one is served, unless the lookup is ambiguous: a second acceptable candidate
holding another answer within ``margin`` of its cosine (two different cached answers fit the
question about equally well, so neither is served). ``margin`` 0 turns that check off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from services.semantic_cache.records import Entry
from services.semantic_cache.verifier import Verifier


@dataclass(frozen=True)
class Choice:
    vid: int | None  # the FAISS id to serve; None = a miss
    similarity: float = 0.0
    reason: str = ""  # why candidates above the threshold were not served


def choose(
    candidates: Sequence[tuple[int, float]],
    entries: Callable[[int], Entry],
    servable: Callable[[Entry], bool],
    query: str,
    threshold: float,
    verifier: Verifier | None,
    margin: float,
) -> Choice:
    accepted: list[tuple[int, float, Entry]] = []
    refused = 0
    for vid, similarity in candidates:
        if similarity < threshold or (accepted and similarity < accepted[0][1] - margin):
            break
        entry = entries(vid)
        if not servable(entry):
            continue
        if verifier is not None and not verifier.accepts(entry.query, query, similarity):
            refused += 1
            continue
        accepted.append((vid, similarity, entry))
        if margin <= 0:
            break
    if not accepted:
        reason = f"the verifier refused {refused} candidate(s)" if refused else ""
        return Choice(None, reason=reason)
    vid, similarity, entry = accepted[0]
    rivals = [
        other
        for _, s, other in accepted[1:]
        if s >= similarity - margin and other.answer.payload != entry.answer.payload
    ]
    if rivals:
        return Choice(None, reason="ambiguous: two cached answers fit about equally well")
    return Choice(vid, similarity)
