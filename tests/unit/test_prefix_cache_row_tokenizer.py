"""Each model row's prompt is counted with the vocabulary the row names: o200k_base for
OpenAI's gpt-4o, gpt-4.1 and gpt-5 rows, cl100k_base for the rest. An OpenAI prompt counted
with cl100k_base was billed on the wrong count when no usage reconciled it (a call cut before
its usage chunk), and its 128-token cache-hit boundaries fell on the wrong tokens."""

from __future__ import annotations

import pytest

from cachemesh.v1 import gateway_pb2 as pb
from services.common.clock import ManualClock
from services.common.models import load_model_table
from services.common.prompt import canonical_blocks
from services.common.tokens import O200K, Tokenizers, load_tokenizers
from services.prefix_cache.commit_records import CommitRecords
from services.prefix_cache.core import PrefixCacheCore, Prompt, TokenizerSlot
from services.prefix_cache.ledger import InMemoryLedger
from services.prefix_cache.plan_memo import PlanMemo
from services.prefix_cache.replica_view import ReplicaViews
from services.prefix_cache.totals import TotalsLedger
from services.prefix_cache.warm import InMemoryWarmStore

TABLE = load_model_table()
# a support policy in Japanese, where the two vocabularies differ most (the review's repro)
SYSTEM = "あなたはカスタマーサポートの担当者です。返品は購入から三十日以内に受け付けます。" * 60


def _core(tokenizers: Tokenizers) -> PrefixCacheCore:
    clock = ManualClock()
    plans: PlanMemo[Prompt] = PlanMemo(clock, ttl_ms=600_000, max_blocks=1_000_000)
    return PrefixCacheCore(
        table=TABLE,
        tokenizer=TokenizerSlot(tokenizers),
        cache=InMemoryWarmStore(),
        views=ReplicaViews(65536),
        ledger=InMemoryLedger(CommitRecords(86_400_000), TotalsLedger()),
        clock=clock,
        lookback=20,
        plans=plans,
    )


def _ask(model: str, question: str = "返品の期限は\uff1f") -> pb.CompleteRequest:
    return pb.CompleteRequest(
        model=model,
        system=[pb.ContentBlock(text=SYSTEM)],
        messages=[pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=question)])],
        max_tokens=50,
    )


@pytest.fixture(scope="module")
def tokenizers() -> Tokenizers:
    return load_tokenizers(TABLE.models.values())


async def test_a_gpt_4o_prompt_cut_before_its_usage_is_billed_on_its_o200k_count(
    tokenizers: Tokenizers,
) -> None:
    """The review's repro: 1,689 tokens (o200k_base), billed on 2,411 (cl100k_base), +43%."""
    core = _core(tokenizers)
    await core.warm("t", "r1", "gpt-4o", _ask("gpt-4o"), "")
    final = await core.final("t", "r1", "gpt-4o", 0, 0, "")
    assert final.split.prompt_tokens == 1689
    assert final.charge.cost_nanos == 1689 * TABLE.models["gpt-4o"].input_nanos
    # a Claude row of the same prompt is still counted with cl100k_base (Claude's tokenizer
    # is not public), as before
    await core.warm("t", "r2", "claude-sonnet-4-5", _ask("claude-sonnet-4-5"), "")
    claude = await core.final("t", "r2", "claude-sonnet-4-5", 0, 0, "")
    assert claude.split.prompt_tokens == 2411


async def test_a_gpt_4o_hit_falls_on_128_token_boundaries_of_its_own_tokens(
    tokenizers: Tokenizers,
) -> None:
    """1,689 o200k tokens: a repeat reads 1,024 + 5 x 128 = 1,664 of them (cl100k_base put the
    boundary at 2,304 of its 2,411)."""
    core = _core(tokenizers)
    await core.warm("t", "r1", "gpt-4o", _ask("gpt-4o"), "")
    again = await core.plan("t", "gpt-4o", _ask("gpt-4o", "送料は\uff1f"), [])
    assert again.split.read_tokens == 1664
    o200k = tokenizers.for_spec(TABLE.models["gpt-4o"])
    assert o200k.name == O200K
    texts = [b.text for b in canonical_blocks(_ask("gpt-4o", "送料は\uff1f"), o200k)]
    assert again.split.prompt_tokens == sum(o200k.count(text) for text in texts)
