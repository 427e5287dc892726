"""Shared by the semantic-cache tests: a deterministic fake embedder and request builders."""

from __future__ import annotations

import contextlib
import hashlib
import signal
from collections.abc import Iterator

import numpy as np

from cachemesh.v1 import gateway_pb2 as pb
from services.semantic_cache.embedder import Vectors, l2_normalise


class FakeEmbedder:
    """Bag of words hashed into ``dim`` buckets: shared words make texts similar."""

    def __init__(self, dim: int = 64, version: str = "fake@1") -> None:
        self.version = version
        self.dim = dim
        self.calls = 0

    def embed(self, texts: list[str]) -> Vectors:
        self.calls += 1
        rows = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in zip(rows, texts, strict=True):
            for word in text.casefold().split():
                bucket = int.from_bytes(hashlib.sha256(word.strip("?.,!").encode()).digest()[:4])
                row[bucket % self.dim] += 1.0
        return l2_normalise(rows)


def text(value: str, *, cache: bool = False) -> pb.ContentBlock:
    block = pb.ContentBlock(text=value)
    if cache:
        block.cache_control.SetInParent()
    return block


def user(value: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, content=[text(value)])


def assistant(value: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_ASSISTANT, content=[text(value)])


def make_request(
    question: str = "how do i reset my password",
    *,
    model: str = "sim-small",
    system: str = "You are a support bot.",
    history: tuple[pb.Message, ...] = (),
    temperature: float | None = None,
    namespace: str = "",
    mode: pb.SemanticMode.ValueType = pb.SEMANTIC_MODE_UNSPECIFIED,
    threshold: float | None = None,
    max_tokens: int = 1024,
    tools: tuple[pb.Tool, ...] = (),
    cache_system: bool = False,
) -> pb.CompleteRequest:
    request = pb.CompleteRequest(
        model=model,
        system=[text(system, cache=cache_system)],
        messages=[*history, user(question)],
        max_tokens=max_tokens,
        tools=list(tools),
        cache=pb.CacheOptions(semantic=mode, namespace=namespace),
    )
    if temperature is not None:
        request.temperature = temperature
    if threshold is not None:
        request.cache.threshold = threshold
    return request


class StillRunning(Exception):
    """``within``'s time ran out."""


@contextlib.contextmanager
def within(seconds: float) -> Iterator[None]:
    """Fails the test when its block has used ``seconds`` of this process's CPU and still runs
    (SIGPROF, main thread only): a text scan that is quadratic in its input never returns on the
    inputs given here (minutes of CPU), a linear one in a small fraction of the time. CPU, not
    wall-clock, time: other processes' load (the other test worker, CI's neighbours) does not
    count against it, so it fails only for a block that really works that long. A hang guard,
    not a measure of speed."""

    def expire(signum: int, frame: object) -> None:
        raise StillRunning(f"still running after {seconds} s of CPU: quadratic in its input?")

    previous = signal.signal(signal.SIGPROF, expire)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


class Placed:
    """An embedder of vectors placed at chosen cosines to the question (8-d): ``cosines`` maps
    a text to (its cosine to the question, its axis); texts on one axis are the same question,
    on two axes other questions, so the ranking (and the margins) are the test's."""

    version, dim = "placed@1", 8

    def __init__(self, cosines: dict[str, tuple[float, int]]) -> None:
        self._vectors = {text: self._at(c, axis) for text, (c, axis) in cosines.items()}

    @staticmethod
    def _at(cosine: float, axis: int) -> np.ndarray:
        vector = np.zeros(8, np.float32)
        vector[0], vector[axis] = cosine, (1 - cosine * cosine) ** 0.5
        return vector

    def embed(self, texts: list[str]) -> np.ndarray:
        return np.stack([self._vectors[text] for text in texts])
