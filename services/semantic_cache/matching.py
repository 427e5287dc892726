"""Which near neighbour, if any, a lookup may serve.

Candidates come best first; those not servable (expired, truncated, another embedder...) are
passed over. Only the nearest servable one may be served: it needs a cosine at the threshold
and the verifier's consent; when the verifier refuses it, the lookup is a miss (a refusal
never promotes a runner-up, which would be a worse match). It is not served either when the
lookup is ambiguous: another servable candidate that the verifier accepts, holding another
answer, within ``margin`` of its cosine (two different cached answers fit the question about
equally well). ``margin`` 0 turns that check off.
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
    nearest: tuple[int, float, Entry] | None = None
    for vid, similarity in candidates:
        if similarity < threshold:
            break
        entry = entries(vid)
        if not servable(entry):
            continue
        accepted = verifier is None or verifier.accepts(entry.query, query, similarity)
        if nearest is None:
            if not accepted:
                return Choice(None, reason="the verifier refused the nearest candidate")
            nearest = (vid, similarity, entry)
            if margin <= 0:
                break
            continue
        if similarity < nearest[1] - margin:
            break
        if accepted and entry.answer.payload != nearest[2].answer.payload:
            return Choice(None, reason="ambiguous: two cached answers fit about equally well")
    if nearest is None:
        return Choice(None)
    return Choice(nearest[0], nearest[1])
