"""The request field behind each canonical block (same order as ``canonical_blocks``).

A site is read only at a breakpoint (``check_breakpoints``: at most a few a request) and named
only when a rule is broken, so ``sites_of`` builds none up front: a 2,500-block agent prompt
cost ~6.7 ms of f-strings on every Plan, 11% of prefix-cache's CPU, for names never shown.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from typing import overload

from cachemesh.v1 import gateway_pb2 as pb
from services.common.prompt import block_text
from services.prefix_cache.rules import Site


class RequestSites(Sequence[Site]):
    """The site of each canonical block of ``request``, each built when it is read."""

    def __init__(self, request: pb.CompleteRequest) -> None:
        self._request = request
        self._tools = len(request.tools)
        self._system = self._tools + len(request.system)
        # the index of each message's first block, counted from the first message's
        starts: list[int] = []
        total = 0
        for message in request.messages:
            starts.append(total)
            total += len(message.content)
        self._starts = starts
        self._len = self._system + total

    def __len__(self) -> int:
        return self._len

    @overload
    def __getitem__(self, index: int) -> Site: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Site]: ...

    def __getitem__(self, index: int | slice) -> Site | Sequence[Site]:
        if isinstance(index, slice):
            return [self._site(i) for i in range(*index.indices(self._len))]
        if index < 0:
            index += self._len
        if not 0 <= index < self._len:
            raise IndexError(f"site {index} of {self._len}")
        return self._site(index)

    def _site(self, index: int) -> Site:
        request = self._request
        if index < self._tools:
            tool = request.tools[index]
            empty = not (tool.name or tool.description or tool.input_schema_json)
            return Site(f"request.tools[{index}]", empty)
        if index < self._system:
            i = index - self._tools
            return Site(f"request.system[{i}]", block_text(request.system[i]) == "")
        at = index - self._system
        # the last message starting at or before ``at`` (a message with no blocks starts where
        # the next one does, so the rightmost such start is the one holding the block)
        m = bisect_right(self._starts, at) - 1
        k = at - self._starts[m]
        block = request.messages[m].content[k]
        return Site(f"request.messages[{m}].content[{k}]", block_text(block) == "")


def sites_of(request: pb.CompleteRequest) -> Sequence[Site]:
    return RequestSites(request)
