"""The router's own embedder (``ROUTER_LOCAL_EMBEDDER``, loaded on first need: the semantic
cache down) that cannot load: an ``auto`` request is scored on the question's shape, not failed,
and the load is not tried again for each request. Before, every ``auto`` request of a
semantic-cache outage failed INTERNAL (HTTP 500) with the load's ``EmbedderLoadError``, each
one hashing the model file again under the embedder's lock. Its files are checked at
start-up (``test_router_model_startup``)."""

from __future__ import annotations

from pathlib import Path

from opentelemetry import trace

from cachemesh import build_request
from services.common.errors import Code
from services.router.dependencies import CallFailed, Dependencies
from services.router.pipeline import Pipeline
from services.router.routing.model import RouterCard, load_router_model
from services.router.routing.router import NONE, LocalEmbedder
from services.semantic_cache.embedder import Embedder, load_minilm_embedder
from tests.unit.test_router_pipeline import REPLICAS, TABLE, TOKENIZER, Rig, _settings


async def test_an_embedder_that_cannot_load_scores_on_shape_and_is_not_loaded_again() -> None:
    loads: list[int] = []

    def broken() -> Embedder:
        loads.append(1)
        return load_minilm_embedder(model_path=Path("/nonexistent/model.onnx"))

    rig = Rig()
    rig.semantic.reply = CallFailed(Code.UNAVAILABLE, "semantic-cache is down")
    deps = Dependencies(rig.semantic, rig.prefix, rig.models, REPLICAS)
    router = (load_router_model(), RouterCard.load().default_threshold, LocalEmbedder(broken))
    pipeline = Pipeline(
        deps, TABLE, TOKENIZER, trace.NoOpTracer(), _settings(), router, clock=rig.clock
    )
    shape_only = load_router_model().score("How do I reset my password?", None)
    for n in range(3):
        request = build_request("How do I reset my password?", model="auto", request_id=f"r{n}")
        end = [chunk async for chunk in pipeline.run("tenant-a", request)][-1].end
        assert end.model in ("sim-small", "sim-large")
        assert end.routing.embedding_source == NONE
        assert abs(end.routing.score - shape_only) < 1e-9
    await pipeline.drain()
    assert len(loads) == 1
