"""The no-secrets sweep (tests/integration/test_no_secrets.py) reads every Redis value as
stored; the answer ledger keeps each recorded answer zlib-compressed, so a secret inside one
was invisible to it (0 of 7 fragments of a planted key found). Its reader now reads a
recorded answer as the router does."""

from __future__ import annotations

import uuid

from cachemesh.v1 import gateway_pb2 as pb
from services.router.answer_ledger import RedisAnswerLedger, ledger_key
from tests.integration.test_no_secrets import _fragments, _value
from tests.redis_server import client_of, sync_client_of

PLANTED = "sk-planted-in-a-recorded-answer-0123456789"


async def test_the_sweep_reads_inside_a_recorded_answer(redis_url: str) -> None:
    tenant, request_id = f"t-{uuid.uuid4().hex}", "r-1"
    ledger = RedisAnswerLedger(client_of(redis_url), ttl_s=60)
    try:
        await ledger.record(tenant, request_id, "f" * 64, pb.CompleteResponse(model=PLANTED))
    finally:
        await ledger.close()
    client = sync_client_of(redis_url)
    try:
        read = repr(_value(client, ledger_key(tenant, request_id)))
        claimed = ledger_key(tenant, "r-2")
        client.set(claimed, b"?" + b"f" * 64 + b"claim")  # a claim: read as stored
        assert "claim" in repr(_value(client, claimed))
    finally:
        client.close()
    assert PLANTED in read and all(f in read for f in _fragments(PLANTED)[:3])
