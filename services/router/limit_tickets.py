"""What an admitted request carries to its end: its reservation and hold (``Ticket``, the
``Limiter``'s), what its pipeline told of its model calls (``ModelUse``), and the tokens an
answer counts against the token rate (``used_tokens``)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from cachemesh.v1 import gateway_pb2 as pb
from services.router.limit_policy import LimitPolicy
from services.router.limit_store import Hold


@dataclass
class Ticket:
    """An admitted request's reservation, settled when it ends."""

    tenant: str
    policy: LimitPolicy
    reserved_tokens: int
    # its reservation replaced by what was counted (an answer, or a call billed without one)
    replaced: bool = False
    # its cost counted although its own policy sets no limit (``Policies.counts_every_spend``)
    counts_spend: bool = False
    # what it holds of its tenant's budgets until it ends (None: no budget, or no bound)
    hold: Hold | None = None
    released: bool = False
    # its counts' first tries still running: its hold's release is sent after them, so that
    # no admit sees the hold gone before the cost it stood for is counted
    counting: list[asyncio.Task[None]] = field(default_factory=list, compare=False, repr=False)
    # a count of it failed and waits in the replay queue: its release queues behind it
    queued: bool = False

    def take_release(self) -> Hold | None:
        """Its hold, to release: the first time, then None."""
        if self.hold is None or self.released:
            return None
        self.released = True
        return self.hold

    @property
    def counted(self) -> bool:
        """Whether its end is counted: it has a limit, or its spend counts all the same."""
        return self.policy.active or self.counts_spend

    def replace_reservation(self) -> int:
        """The reserved tokens to give back now: all of them the first time, then none."""
        back = 0 if self.replaced else self.reserved_tokens
        self.replaced = True
        return back


@dataclass
class ModelUse:
    """What an admitted request's pipeline told of its own model calls as it ran, for the count
    of its end (``Limiter.finish``): ``sent``, the model calls of its sent to a replica (the
    pipeline's ``model_sent``); ``refused``, those of them their replica refused before their
    start (the pipeline's ``model_refused``: nothing produced, nothing billed); ``billed``,
    its answer once billed (the pipeline's ``answer_billed``: counted even when its end is
    never read). The Gateway's call and the estimator's replay of one both count their end
    through it."""

    sent: int = 0
    refused: int = 0
    billed: pb.CompleteResponse | None = None

    def model_sent(self) -> None:
        self.sent += 1

    def model_refused(self) -> None:
        self.refused += 1

    def answer_billed(self, answer: pb.CompleteResponse) -> None:
        if self.billed is None:
            self.billed = answer


def used_tokens(end: pb.CompleteResponse) -> int:
    """The tokens an answer counts against the token rate: what reached a model, cache reads
    excepted; a semantic-cache hit reached none."""
    if end.served_by == pb.LAYER_SEMANTIC_CACHE:
        return 0
    return model_tokens(end.usage)


def model_tokens(u: pb.Usage) -> int:
    """What reached a model: input, cache writes and output (cache reads are not counted)."""
    return u.input_tokens + u.cache_creation_input_tokens + u.output_tokens
