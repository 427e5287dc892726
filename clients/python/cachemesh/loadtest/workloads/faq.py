"""FAQ traffic from Quora Question Pairs: new questions, exact repeats and paraphrases.

Each draw is, with ``repeat_rate``, an earlier question asked again word for word; with
``paraphrase_rate``, the other side of a labelled pair whose first side was asked earlier (a
duplicate when the pair's label is 1, a near-miss negative when it is 0); otherwise the first
side of a new pair. Every labelled pair of the file is kept, so an L1 hit whose served answer
came from a labelled-negative question is counted as a wrong hit.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from cachemesh.loadtest.workloads.base import (
    TENANT_A,
    Item,
    data_file,
    nonempty,
    normalise,
    read_csv_rows,
    user,
)
from cachemesh.v1 import gateway_pb2 as pb

PAIRS = "paraphrase/qqp_dev.csv"
SYSTEM = "You are a helpful community answer bot. Answer the question in two or three sentences."
Pair = tuple[str, str, int]


def load_pairs(path: Path) -> list[Pair]:
    """The labelled pairs (columns text_a, text_b, label 0 or 1); ``DataInvalid`` for a file
    without those columns or any such pair."""

    def build(rows: csv.DictReader[str]) -> list[Pair]:
        return [
            (row["text_a"].strip(), row["text_b"].strip(), int(row["label"]))
            for row in rows
            if row["text_a"].strip() and row["text_b"].strip() and row["label"] in ("0", "1")
        ]

    pairs = read_csv_rows(path, build)
    return nonempty(path, pairs, "labelled pair (text_a, text_b, label 0/1)")


def faq_request(question: str, namespace: str, model: str = "auto") -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model=model,
        max_tokens=200,
        system=[pb.ContentBlock(text=SYSTEM)],
        messages=[user(question)],
        cache=pb.CacheOptions(namespace=namespace),
    )


class QuoraFaq:
    name = "faq"

    def __init__(
        self,
        data_dir: Path,
        seed: int,
        namespace: str,
        repeat_rate: float = 0.3,
        paraphrase_rate: float = 0.3,
    ) -> None:
        if not (repeat_rate >= 0 and paraphrase_rate >= 0 and repeat_rate + paraphrase_rate <= 1):
            raise ValueError("repeat_rate and paraphrase_rate must be >= 0 with a sum <= 1")
        self._all = load_pairs(data_file(data_dir, PAIRS))
        self._pairs = list(self._all)
        self._rng = random.Random(seed)
        self._rng.shuffle(self._pairs)
        self._seed, self._namespace = seed, namespace
        self._repeat, self._paraphrase = repeat_rate, paraphrase_rate
        self._asked: list[str] = []
        self._open: list[Pair] = []  # pairs whose first side was asked, second not yet
        self._next_pair = 0

    def params(self) -> dict[str, object]:
        return {
            "seed": self._seed,
            "source": PAIRS,
            "repeat_rate": self._repeat,
            "paraphrase_rate": self._paraphrase,
            "pairs": len(self._pairs),
        }

    def labels(self) -> dict[frozenset[str], int]:
        out: dict[frozenset[str], int] = {}
        for a, b, label in self._all:
            key = frozenset((normalise(a), normalise(b)))
            if len(key) == 2:  # a pair whose sides normalise equal says nothing
                out[key] = max(out.get(key, 0), label)
        return out

    def next_item(self) -> Item:
        roll = self._rng.random()
        if roll < self._repeat and self._asked:
            question = self._rng.choice(self._asked)
        elif roll < self._repeat + self._paraphrase and self._open:
            pair = self._open.pop(self._rng.randrange(len(self._open)))
            question = pair[1]
            self._asked.append(question)
        else:
            pair = self._pairs[self._next_pair % len(self._pairs)]
            self._next_pair += 1
            question = pair[0]
            self._asked.append(question)
            self._open.append(pair)
        return Item(self.name, TENANT_A, faq_request(question, self._namespace), question)
