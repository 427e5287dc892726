"""BFCL v4 live_multiple: real users' queries sent with the tool lists they came with."""

from __future__ import annotations

import random
from pathlib import Path

from cachemesh.loadtest.workloads.base import (
    TENANT_A,
    Item,
    data_file,
    malformed,
    nonempty,
    read_jsonl,
    tool_from_schema,
)
from cachemesh.v1 import gateway_pb2 as pb

QUERIES = "agent/bfcl/BFCL_v4_live_multiple.jsonl"


def bfcl_request(
    row: dict[str, object], model: str, max_tokens: int, namespace: str
) -> pb.CompleteRequest:
    turn: list[dict[str, str]] = row["question"][0]  # type: ignore[index]
    functions: list[dict[str, object]] = row["function"]  # type: ignore[assignment]
    tools = [
        tool_from_schema(str(f["name"]), str(f.get("description", "")), f.get("parameters", {}))
        for f in functions
    ]
    tools[-1].cache_control.SetInParent()
    system = [pb.ContentBlock(text=m["content"]) for m in turn if m["role"] == "system"]
    messages = [
        pb.Message(
            role=pb.ROLE_USER if m["role"] == "user" else pb.ROLE_ASSISTANT,
            content=[pb.ContentBlock(text=m["content"])],
        )
        for m in turn
        if m["role"] != "system" and m["content"].strip()
    ]
    return pb.CompleteRequest(
        model=model,
        max_tokens=max_tokens,
        tools=tools,
        system=system,
        messages=messages,
        cache=pb.CacheOptions(namespace=namespace),
    )


class BfclTools:
    name = "tools"

    def __init__(
        self, data_dir: Path, seed: int, namespace: str, model: str = "auto", max_tokens: int = 256
    ) -> None:
        path = data_file(data_dir, QUERIES)
        rows = read_jsonl(path)
        try:
            asked = [r for r in rows if any(m["role"] == "user" for m in r["question"][0])]  # type: ignore[index]
        except (KeyError, TypeError, IndexError) as exc:
            raise malformed(path, exc) from None
        self._rows = nonempty(path, asked, "query with a user message")
        random.Random(seed).shuffle(self._rows)
        self._seed, self._namespace, self._model, self._max_tokens = (
            seed,
            namespace,
            model,
            max_tokens,
        )
        self._i = 0

    def params(self) -> dict[str, object]:
        return {
            "seed": self._seed, "source": QUERIES, "queries": len(self._rows),
            "model": self._model, "max_tokens": self._max_tokens,
        }  # fmt: skip

    def labels(self) -> dict[frozenset[str], int]:
        return {}

    def next_item(self) -> Item:
        row = self._rows[self._i % len(self._rows)]
        self._i += 1
        return Item(
            self.name, TENANT_A, bfcl_request(row, self._model, self._max_tokens, self._namespace)
        )
