"""The request field behind each canonical block (same order as ``canonical_blocks``)."""

from __future__ import annotations

from cachemesh.v1 import gateway_pb2 as pb
from services.common.prompt import block_text
from services.prefix_cache.rules import Site


def sites_of(request: pb.CompleteRequest) -> list[Site]:
    sites = [
        Site(f"request.tools[{i}]", not (t.name or t.description or t.input_schema_json))
        for i, t in enumerate(request.tools)
    ]
    sites.extend(
        Site(f"request.system[{i}]", block_text(b) == "") for i, b in enumerate(request.system)
    )
    for m, message in enumerate(request.messages):
        sites.extend(
            Site(f"request.messages[{m}].content[{k}]", block_text(b) == "")
            for k, b in enumerate(message.content)
        )
    return sites
