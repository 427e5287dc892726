"""A weighted mix of workloads: each draw picks a workload by weight and takes its next item."""

from __future__ import annotations

import random
from collections.abc import Mapping

from cachemesh.loadtest.workloads.base import Item, Workload


def parse_weights(text: str) -> dict[str, float]:
    """``agent=0.2,faq=0.5`` → {"agent": 0.2, "faq": 0.5}; weights need not sum to 1."""
    weights: dict[str, float] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"--mix: {part!r} is not name=weight") from None
        if weight < 0 or not name.strip():
            raise ValueError(f"--mix: {part!r} needs a name and a weight >= 0")
        weights[name.strip()] = weight
    if not sum(weights.values()) > 0:
        raise ValueError("--mix: the weights must add up to more than 0")
    return weights


class Mix:
    name = "mix"

    def __init__(self, parts: Mapping[str, Workload], weights: Mapping[str, float], seed: int):
        self._parts = dict(parts)
        self._names = [n for n in weights if weights[n] > 0]
        self._weights = [weights[n] for n in self._names]
        self._rng = random.Random(seed)
        self._seed = seed

    def params(self) -> dict[str, object]:
        return {
            "seed": self._seed,
            "weights": dict(zip(self._names, self._weights, strict=True)),
            "parts": {name: self._parts[name].params() for name in self._names},
        }

    def labels(self) -> dict[frozenset[str], int]:
        out: dict[frozenset[str], int] = {}
        for name in self._names:
            out.update(self._parts[name].labels())
        return out

    def next_item(self) -> Item:
        name = self._rng.choices(self._names, self._weights)[0]
        return self._parts[name].next_item()
