"""The built-in workload (no data needed): the demo's agent, FAQ bot and stray questions."""

from __future__ import annotations

import random

from cachemesh.demo import workload as demo
from cachemesh.loadtest.workloads.base import TENANT_A, TENANT_B, Item, user
from cachemesh.v1 import gateway_pb2 as pb


class Synthetic:
    name = "synthetic"

    def __init__(self, seed: int, namespace: str, faq: float = 0.6, miss: float = 0.2) -> None:
        self._rng = random.Random(seed)
        self._namespace = namespace
        self._faq = faq
        self._miss = miss
        self._seed = seed
        self._i = 0

    def params(self) -> dict[str, object]:
        return {"seed": self._seed, "faq_rate": self._faq, "miss_rate": self._miss}

    def labels(self) -> dict[frozenset[str], int]:
        return {}

    def next_item(self) -> Item:
        i, roll = self._i, self._rng.random()
        self._i += 1
        cache = pb.CacheOptions(namespace=self._namespace)
        if roll < self._faq:
            tenant, question = self._rng.choice(demo.FAQ)
            request = pb.CompleteRequest(
                model="auto",
                max_tokens=200,
                system=[pb.ContentBlock(text=demo.FAQ_SYSTEM)],
                messages=[user(question)],
                cache=cache,
            )
            return Item("synthetic", TENANT_B if tenant == "b" else TENANT_A, request)
        if roll < self._faq + self._miss:
            # a namespace of its own: a guaranteed L1 miss, so the model path is measured too
            request = pb.CompleteRequest(
                model="auto",
                max_tokens=300,
                messages=[user(self._rng.choice(demo.UNRELATED))],
                cache=pb.CacheOptions(namespace=f"{self._namespace}/miss-{i}"),
            )
            return Item("synthetic", TENANT_A, request)
        turns = demo.AGENT_TURNS[: 1 + i % len(demo.AGENT_TURNS)]
        history: list[pb.Message] = []
        for text in turns[:-1]:
            history += [
                user(text),
                pb.Message(role=pb.ROLE_ASSISTANT, content=[pb.ContentBlock(text="OK.")]),
            ]
        request = pb.CompleteRequest(
            model=demo.AGENT_MODEL,
            max_tokens=200,
            tools=demo.TOOLS,
            system=demo.agent_system(),
            messages=[*history, user(turns[-1], cache=True)],
            cache=cache,
        )
        return Item("synthetic", TENANT_A, request)
