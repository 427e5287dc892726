"""The bench's request sets: exact hits, semantic hits, misses, and the mixed workload."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from cachemesh.loadtest.workloads import Item, WorkloadSpec, build, normalise
from cachemesh.loadtest.workloads.base import TENANT_A, data_file
from cachemesh.loadtest.workloads.faq import PAIRS, faq_request, load_pairs
from cachemesh.loadtest.workloads.tau import TauAgent
from cachemesh.v1 import gateway_pb2 as pb
from services.common.prompt import last_user_text
from services.semantic_cache.embedder import Embedder
from services.semantic_cache.verifier import Verifier

POOL = 50  # distinct questions stored in the warm-up of (a)
MAX_DRAWS_PER_MISS = 50  # agent turns drawn per one that ends in the user's text, at most


def first_questions(data_dir: Path, count: int) -> list[str]:
    return [a for a, _, _ in load_pairs(data_file(data_dir, PAIRS))[:count]]


def _cycle(items: list[Item], count: int) -> list[Item]:
    return list(itertools.islice(itertools.cycle(items), count))


def exact_hits(data_dir: Path, namespace: str, count: int) -> tuple[list[Item], list[Item]]:
    """(warm-up, plan): the warm-up stores POOL questions, the plan asks them again."""
    seen: dict[str, str] = {}
    for a, _, _ in load_pairs(data_file(data_dir, PAIRS)):
        seen.setdefault(normalise(a), a)
        if len(seen) == POOL:
            break
    items = [Item("exact", TENANT_A, faq_request(q, namespace), q) for q in seen.values()]
    return items, _cycle(items, count)


def paraphrase_pairs(
    data_dir: Path, embedder: Embedder, above: float, verifier: Verifier, count: int
) -> list[tuple[str, str]]:
    """Up to ``count`` labelled-duplicate pairs the cache serves, each side a question no other
    pair has: cosine similarity at least ``above`` and the verifier's consent at the cache's
    setting (``verifier.accepts(stored, asked)``).

    A pair the verifier refuses (the cross-encoder and the features read it as another question)
    is a miss: the model answers it (about 0.5 s at SIM_TIME_SCALE=1) and identical asks
    wait on its lease, so it would be the p99 of a case that measures hits. No question is
    asked twice: the cache keeps its recent vectors, so a repeated ask would skip the embedding
    a new paraphrase costs.
    """
    pairs = [
        (a, b)
        for a, b, label in load_pairs(data_file(data_dir, PAIRS))
        if label == 1 and normalise(a) != normalise(b)
    ]
    chosen: list[tuple[str, str]] = []
    seen: set[str] = set()
    for start in range(0, len(pairs), 256):
        chunk = pairs[start : start + 256]
        a = embedder.embed([p[0] for p in chunk])
        b = embedder.embed([p[1] for p in chunk])
        similarity = np.sum(a * b, axis=1)
        for pair, s in zip(chunk, similarity, strict=True):
            stored, asked = normalise(pair[0]), normalise(pair[1])
            if (
                s >= above
                and stored not in seen
                and asked not in seen
                and verifier.accepts(stored, asked, float(s))
            ):
                chosen.append(pair)
                seen.update((stored, asked))
        if len(chosen) >= count:
            return chosen[:count]
    return chosen


def semantic_hits(pairs: list[tuple[str, str]], namespace: str) -> tuple[list[Item], list[Item]]:
    """(warm-up, plan): the warm-up stores one side of each pair, the plan asks the other once."""
    warm = [Item("semantic", TENANT_A, faq_request(a, namespace), a) for a, _ in pairs]
    asks = [Item("semantic", TENANT_A, faq_request(b, namespace), b) for _, b in pairs]
    return warm, asks


def agent_seed(level: int, repeat: int) -> int:
    """The seed of (c)'s turns at ``level`` in flight, repeat ``repeat`` (from 0): each repeat
    draws turns of its own, the same for every stack compared (``runs._agent``, and
    ``hit_cpu --miss``'s rounds)."""
    return level + 100 * repeat


def agent_misses(data_dir: Path, namespace: str, count: int, seed: int) -> list[Item]:
    """(c): tau-bench airline agent requests (system prompt, 14 tools, the conversation so
    far), model ``auto`` so the router chooses the tier. Only turns that end in the user's text
    are kept: for those the router looks L1 up and stores the answer (a turn ending in tool
    results skips L1), so each request goes through every layer."""
    workload = TauAgent(data_dir, seed, namespace, model="auto")
    items: list[Item] = []
    for _ in range(count * MAX_DRAWS_PER_MISS):
        item = workload.next_item()
        if last_user_text(item.request) is not None:
            items.append(item)
            if len(items) == count:
                return own_namespaces(items, namespace)
    raise ValueError(f"{count} agent turns ending in the user's text not found in the data")


def agent_params(data_dir: Path) -> dict[str, object]:
    params = TauAgent(data_dir, 0, "", model="auto").params()
    del params["seed"]
    return {**params, "seed": "the level (in flight)", "turns": "those ending in the user's text",
            "namespace": "one per request"}  # fmt: skip


def misses(data_dir: Path, namespace: str, count: int, seed: int) -> list[Item]:
    """(c2): single-turn MMLU/GSM8K prompts (the ``unrelated`` workload), model ``auto``."""
    workload = build(WorkloadSpec("unrelated", seed, namespace, data_dir))
    return own_namespaces([workload.next_item() for _ in range(count)], namespace)


def own_namespaces(items: list[Item], namespace: str) -> list[Item]:
    """Each request in a cache namespace of its own: an L1 miss even when the data repeats a
    question (L2 and L3 ignore namespaces, so shared prefixes stay shared)."""
    out = []
    for i, item in enumerate(items):
        request = pb.CompleteRequest()
        request.CopyFrom(item.request)
        request.cache.namespace = f"{namespace}/{i}"
        out.append(Item(item.kind, item.tenant, request, item.question))
    return out


def mixed(
    data_dir: Path, namespace: str, count: int, seed: int
) -> tuple[list[Item], dict[str, object], dict[frozenset[str], int]]:
    workload = build(WorkloadSpec("mix", seed, namespace, data_dir))
    items = [workload.next_item() for _ in range(count)]
    return items, {"name": "mix", **workload.params()}, workload.labels()
