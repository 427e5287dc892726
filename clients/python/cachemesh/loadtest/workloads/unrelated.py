"""Unrelated prompts (L1 misses): MMLU and GSM8K questions from RouteLLM's set, each once."""

from __future__ import annotations

import random
from pathlib import Path

from cachemesh.loadtest.workloads.base import (
    TENANT_A,
    Item,
    data_file,
    nonempty,
    read_csv_rows,
    user,
)
from cachemesh.v1 import gateway_pb2 as pb

PROMPTS = "routing/routellm_mmlu_gsm8k_dev.csv"


class Unrelated:
    name = "unrelated"

    def __init__(self, data_dir: Path, seed: int, namespace: str, max_tokens: int = 300) -> None:
        path = data_file(data_dir, PROMPTS)
        prompts = read_csv_rows(
            path, lambda rows: [row["prompt"] for row in rows if row["prompt"].strip()]
        )
        self._prompts = nonempty(path, prompts, "prompt")
        random.Random(seed).shuffle(self._prompts)
        self._seed, self._namespace, self._max_tokens = seed, namespace, max_tokens
        self._i = 0

    def params(self) -> dict[str, object]:
        return {"seed": self._seed, "source": PROMPTS, "prompts": len(self._prompts)}

    def labels(self) -> dict[frozenset[str], int]:
        return {}

    def next_item(self) -> Item:
        cycle, index = divmod(self._i, len(self._prompts))
        self._i += 1
        # a second pass over the prompts gets its own namespace so it still misses
        namespace = self._namespace if cycle == 0 else f"{self._namespace}/pass-{cycle}"
        request = pb.CompleteRequest(
            model="auto",
            max_tokens=self._max_tokens,
            messages=[user(self._prompts[index])],
            cache=pb.CacheOptions(namespace=namespace),
        )
        return Item(self.name, TENANT_A, request)
