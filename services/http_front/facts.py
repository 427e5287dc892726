"""cachemesh's own facts in HTTP headers: the request's cache options in, the answer's layer,
similarity, cost and trace out. The bodies stay exactly each API's."""

from __future__ import annotations

import math
from collections.abc import Mapping

from cachemesh.v1 import gateway_pb2 as pb
from services.http_front.errors import invalid

SEMANTIC = "x-cachemesh-semantic"
NAMESPACE = "x-cachemesh-namespace"
THRESHOLD = "x-cachemesh-threshold"
IDEMPOTENCY = "idempotency-key"

_MODES = {
    "use": pb.SEMANTIC_MODE_USE,
    "refresh": pb.SEMANTIC_MODE_REFRESH,
    "no-store": pb.SEMANTIC_MODE_NO_STORE,
    "bypass": pb.SEMANTIC_MODE_BYPASS,
}
_LAYERS: dict[int, str] = {
    pb.LAYER_SEMANTIC_CACHE: "semantic-cache",
    pb.LAYER_PREFIX_CACHE: "prefix-cache",
    pb.LAYER_MODEL: "model",
}
MAX_ID_CHARS = 128


def cache_options(headers: Mapping[str, str], into: pb.CompleteRequest) -> None:
    """Applies the ``x-cachemesh-*`` request headers and ``Idempotency-Key`` to ``into``."""
    mode = headers.get(SEMANTIC)
    if mode is not None:
        chosen = _MODES.get(mode.strip().lower())
        if chosen is None:
            raise invalid(f"{SEMANTIC}: unknown mode {mode[:32]!r}; use one of {', '.join(_MODES)}")
        into.cache.semantic = chosen
    namespace = headers.get(NAMESPACE)
    if namespace is not None:
        into.cache.namespace = _text(NAMESPACE, namespace).strip()
    threshold = headers.get(THRESHOLD)
    if threshold is not None:
        try:
            value = float(threshold)
        except ValueError:
            raise invalid(
                f"{THRESHOLD}: expected a number in [0, 1], got {threshold[:32]!r}"
            ) from None
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise invalid(f"{THRESHOLD}: cosine similarity must be within [0, 1], got {value}")
        into.cache.threshold = value
    key = idempotency_key(headers)
    if key is not None:
        into.request_id = key


def idempotency_key(headers: Mapping[str, str]) -> str | None:
    """The caller's ``Idempotency-Key`` (stripped), None when it sent none; a 400 unless it
    is 1 to ``MAX_ID_CHARS`` printable ASCII characters: the id comes back in the response's
    ``request-id`` / ``x-request-id`` header, which carries ASCII alone (a UTF-8 'réq-1' went
    out as its bytes, which the SDKs' HTTP clients read as latin-1: 'rÃ©q-1')."""
    key = headers.get(IDEMPOTENCY)
    if key is None:
        return None
    if not _text(IDEMPOTENCY, key).strip() or len(key) > MAX_ID_CHARS:
        raise invalid(f"{IDEMPOTENCY}: 1 to {MAX_ID_CHARS} characters")
    if not (key.isascii() and key.isprintable()):
        raise invalid(
            f"{IDEMPOTENCY}: printable ASCII characters only (the id comes back in the "
            "response's request-id header, which carries no other); e.g. a UUID"
        )
    return key.strip()


def _text(name: str, value: str) -> str:
    """A header's value, refused unless it is UTF-8 text (the server keeps other bytes as
    surrogate escapes, which no protobuf string can hold)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(f"{name}: not UTF-8 text; send the value as UTF-8") from None
    return value


def layer_name(layer: int) -> str:
    return _LAYERS.get(layer, "unspecified")


def start_headers(start: pb.CompleteResponse, traceparent: str) -> dict[str, str]:
    """What is known when the answer begins: its layer, model, similarity, trace, and whether
    it is a replay of an earlier call's answer."""
    headers = {
        # none on a stream's head sent before its start (``handlers._started``): its layer is
        # not known yet ("unspecified" was sent, as if it were a layer)
        "x-cachemesh-served-by": _LAYERS.get(start.served_by, ""),
        "x-cachemesh-model": start.model,
        "x-cachemesh-tier": start.tier,
        "x-cachemesh-request-id": start.request_id,
        "x-cachemesh-trace-id": start.trace_id,
    }
    if start.served_by == pb.LAYER_SEMANTIC_CACHE:
        headers["x-cachemesh-similarity"] = f"{start.semantic.similarity:.4f}"
        headers["x-cachemesh-exact"] = "true" if start.semantic.exact else "false"
    if start.replayed:  # the first call's answer, facts and cost: billed once, on that call
        headers["x-cachemesh-replayed"] = "true"
    if traceparent:
        headers["traceparent"] = traceparent
    return {k: v for k, v in headers.items() if v}


def end_headers(end: pb.CompleteResponse, traceparent: str) -> dict[str, str]:
    """All of ``start_headers`` and the money: cost, baseline and saving in nano-dollars."""
    headers = start_headers(end, traceparent)
    headers.update(cost_facts(end))
    return headers


def cost_facts(end: pb.CompleteResponse) -> dict[str, str]:
    return {
        "x-cachemesh-cost-nanos": str(end.cost.cost_nanos),
        "x-cachemesh-baseline-nanos": str(end.cost.baseline_nanos),
        "x-cachemesh-saved-nanos": str(end.cost.saved_nanos),
        "x-cachemesh-cost-estimated": "true" if end.cost.estimated else "false",
    }


def stream_facts(end: pb.CompleteResponse) -> dict[str, object]:
    """The end of a streamed answer carries its cost in the last event (headers are sent)."""
    return {
        "served_by": layer_name(end.served_by),
        "cost_nanos": end.cost.cost_nanos,
        "baseline_nanos": end.cost.baseline_nanos,
        "saved_nanos": end.cost.saved_nanos,
        "estimated": end.cost.estimated,
        "trace_id": end.trace_id,
        "replayed": end.replayed,
    }
