"""An internal service's refusal repeats a caller's value cut short (``errors.shown``).

prefix-cache and the model service echoed a caller's whole model name or request id: a 1 MB
model name came back as RESOURCE_EXHAUSTED "received metadata size exceeds hard limit" (the
message overflowed the reply's metadata) instead of the INVALID_ARGUMENT that says what is
wrong, and went whole into the log."""

from __future__ import annotations

import pytest

from services.common.clock import ManualClock
from services.common.errors import SHOWN_CHARS, Code, RequestError, shown
from services.common.tokens import Tokenizer, load_cl100k
from services.prefix_cache.commit_records import CommitRecords
from services.prefix_cache.core import (
    BadRequest,
    NoWarmCommit,
    PrefixCacheCore,
    TableLacksModel,
    TokenizerSlot,
)
from services.prefix_cache.ledger import InMemoryLedger
from services.prefix_cache.replica_view import ReplicaViews
from services.prefix_cache.totals import TotalsLedger
from services.prefix_cache.warm import InMemoryWarmStore
from tests.unit.model_support import RecordingSleep
from tests.unit.test_model_engine import _engine, _request
from tests.unit.test_prefix_cache_core import TABLE, ask

HUGE = "m" * 1_000_000
MOST = 1_000  # a message's own words (a list of the known models) and the cut value


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_cl100k()


def test_shown_quotes_escapes_and_cuts() -> None:
    assert shown("sim-large") == "'sim-large'"
    assert shown("a\x00\u202eb") == "'a\\x00\\u202eb'"
    assert shown(HUGE) == f"'{'m' * SHOWN_CHARS}'... (1,000,000 characters)"


async def test_prefix_cache_cuts_a_callers_model_and_request_id(tokenizer: Tokenizer) -> None:
    core = PrefixCacheCore(
        table=TABLE,
        tokenizer=TokenizerSlot(tokenizer),
        cache=InMemoryWarmStore(),
        views=ReplicaViews(65536),
        ledger=InMemoryLedger(CommitRecords(3_600_000), TotalsLedger()),
        clock=ManualClock(),
        lookback=20,
    )
    # a model this replica's table lacks is FAILED_PRECONDITION (a table mismatch between
    # replicas), no longer the caller's BadRequest: the message is cut the same
    with pytest.raises(TableLacksModel) as unknown:
        await core.plan("a", HUGE, ask("Q?"), [])
    with pytest.raises(NoWarmCommit) as unwarmed:
        await core.final("a", HUGE, "sim-large", 1, 0, "")
    await core.warm("a", "r1", "sim-large", ask("Q?"), "")
    with pytest.raises(BadRequest) as differs:
        await core.final("a", "r1", HUGE, 1, 0, "")
    with pytest.raises(TableLacksModel) as baseline:
        await core.final("a", "r1", "sim-large", 1, 0, HUGE)
    for caught in (unknown, unwarmed, differs, baseline):
        message = str(caught.value)
        assert len(message) < MOST and "1,000,000 characters" in message, message[:300]


def test_the_model_engine_cuts_a_callers_model(tokenizer: Tokenizer) -> None:
    with pytest.raises(RequestError) as caught:
        _engine(tokenizer, RecordingSleep()).prepare("t", HUGE, _request("Hi?"))
    assert caught.value.code == Code.INVALID_ARGUMENT
    assert len(caught.value.message) < MOST, caught.value.message[:300]
