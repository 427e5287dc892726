"""Which near neighbour, if any, a lookup may serve.

Candidates come best first; those not servable (expired, truncated, another embedder...) are
passed over (an answer's tier is not servability: the cache refuses a nearest candidate of a
tier the lookup does not accept after ``shortlist``, which keeps it as a competitor). Only the
nearest servable one may be served: it needs a cosine at the threshold and the verifier's
consent; when the verifier refuses it, the lookup is a miss (a refusal never promotes a
runner-up, which would be a worse match). It is not served either when the lookup is
ambiguous: another servable candidate that the verifier accepts, holding another answer,
within ``margin`` of its cosine (two different cached answers fit the question about equally
well). ``margin`` 0 turns that check off.

The work is split in two so the verifier (a cross-encoder: milliseconds) runs off the event
loop: ``shortlist`` picks what must be verified (the nearest servable candidate and the
runners-up within the margin holding another answer), the caller verifies them in one batch,
and ``decide`` applies the verdicts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from services.semantic_cache.records import Entry


@dataclass(frozen=True)
class Choice:
    vid: int | None  # the FAISS id to serve; None = a miss
    similarity: float = 0.0
    reason: str = ""  # why candidates above the threshold were not served


@dataclass(frozen=True)
class Candidate:
    vid: int
    similarity: float
    entry: Entry


def shortlist(
    candidates: Sequence[tuple[int, float]],
    entries: Callable[[int], Entry],
    servable: Callable[[Entry], bool],
    threshold: float,
    margin: float,
) -> list[Candidate]:
    """The nearest servable candidate at the threshold first, then those that could make the
    lookup ambiguous (within ``margin`` of it, another answer); empty = nothing to verify."""
    out: list[Candidate] = []
    for vid, similarity in candidates:
        if similarity < threshold:
            break
        entry = entries(vid)
        if not servable(entry):
            continue
        if not out:
            out.append(Candidate(vid, similarity, entry))
            if margin <= 0:
                break
            continue
        if similarity < out[0].similarity - margin:
            break
        if entry.answer.payload != out[0].entry.answer.payload:
            out.append(Candidate(vid, similarity, entry))
    return out


def decide(short: Sequence[Candidate], refusals: Sequence[str]) -> Choice:
    """The verdicts (one per shortlisted candidate, in order: why it is refused, "" =
    accepted) applied."""
    if not short:
        return Choice(None)
    if refusals[0]:
        return Choice(None, reason=refusals[0])
    if any(not refusal for refusal in refusals[1:]):
        return Choice(None, reason="ambiguous: two cached answers fit about equally well")
    return Choice(short[0].vid, short[0].similarity)
