"""KvHashMemo: a prompt extending one seen before hashes only its new blocks, and its hashes
are exactly block_hashes' for the whole prompt, whatever came before (generated conversations
that grow, branch, edit an earlier turn, change tenant or model, and outgrow the memo)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cachemesh.v1 import gateway_pb2 as pb
from services.common.kv_blocks import KvHashMemo, block_hashes
from services.common.prompt import canonical_blocks, prompt_token_ids
from services.common.tokens import load_cl100k

TOKENIZER = load_cl100k()
WORDS = ["alpha", "beta", "gamma", " ", "\n", "delta epsilon", "zeta.", "eta,", "theta!"]


def _text(seed: int, length: int) -> str:
    return "".join(WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(length))


# one step of a conversation: (what to do, a seed, a length)
_step = st.tuples(
    st.sampled_from(["grow", "grow", "grow", "branch", "edit", "tenant", "model", "tools"]),
    st.integers(0, 50),
    st.integers(0, 40),
)


@settings(max_examples=100, deadline=None)
@given(steps=st.lists(_step, min_size=1, max_size=25), budget=st.sampled_from([0, 40, 10_000]))
def test_the_memo_hashes_as_block_hashes_does(
    steps: list[tuple[str, int, int]], budget: int
) -> None:
    memo = KvHashMemo(budget)
    tenant, model = "tenant-a", "sim-large"
    tools = [pb.Tool(name="search", description=_text(1, 30))]
    system = [pb.ContentBlock(text=_text(2, 25))]
    messages: list[pb.Message] = []
    for action, seed, length in steps:
        if action == "grow":
            role = pb.ROLE_ASSISTANT if len(messages) % 2 else pb.ROLE_USER
            blocks = [pb.ContentBlock(text=_text(seed, length))]
            if seed % 3 == 0:
                result = pb.ToolResult(tool_use_id=f"t{seed}", content=_text(seed + 1, length))
                blocks.append(pb.ContentBlock(tool_result=result))
            messages.append(pb.Message(role=role, content=blocks))
        elif action == "branch" and messages:
            messages = messages[: seed % len(messages)]
        elif action == "edit" and messages:
            messages[seed % len(messages)].content[0].text += _text(seed, 1 + length % 3)
        elif action == "tenant":
            tenant = f"tenant-{seed % 3}"
        elif action == "model":
            model = ["sim-large", "sim-small"][seed % 2]
        elif action == "tools":
            tools[0].description = _text(seed, length)
        request = pb.CompleteRequest(tools=tools, system=system, messages=messages)
        blocks_ = canonical_blocks(request, TOKENIZER)
        ids = prompt_token_ids(blocks_)
        assert memo.hashes(tenant, model, blocks_, ids) == block_hashes(tenant, model, ids)
        assert memo.held_hashes <= budget


def _session(turns: int) -> list[pb.CompleteRequest]:
    system = [pb.ContentBlock(text=_text(3, 4000))]
    messages: list[pb.Message] = []
    requests = []
    for turn in range(turns):
        messages.append(
            pb.Message(role=pb.ROLE_ASSISTANT, content=[pb.ContentBlock(text=_text(turn, 60))])
        )
        messages.append(
            pb.Message(role=pb.ROLE_USER, content=[pb.ContentBlock(text=_text(turn + 1, 300))])
        )
        requests.append(pb.CompleteRequest(system=list(system), messages=list(messages)))
    return requests


def test_a_session_s_next_turn_hashes_only_its_new_blocks() -> None:
    """block_hashes re-hashed a whole agent prompt every turn (198k tokens: 12.4k sha256,
    ~7 ms, 15% of prefix-cache's CPU), though a turn adds ~440 tokens: the memo hashes only
    the new blocks, and gives the same hashes."""
    requests = [canonical_blocks(r, TOKENIZER) for r in _session(200)]
    prompts = [(blocks, prompt_token_ids(blocks)) for blocks in requests]
    memo = KvHashMemo(1_000_000)
    for blocks, ids in prompts[:-40]:
        memo.hashes("t", "m", blocks, ids)
    reused = memo.reused_hashes
    for blocks, ids in prompts[-40:]:
        assert memo.hashes("t", "m", blocks, ids) == block_hashes("t", "m", ids)
    # counted, not timed (speed is the bench's): under 5% of the last 40 turns' hashes computed
    new = sum(len(ids) // 16 for _, ids in prompts[-40:]) - (memo.reused_hashes - reused)
    assert new < 0.05 * sum(len(ids) // 16 for _, ids in prompts[-40:])
