"""``GET /v1/models`` and ``GET /v1/models/{model}``: the Gateway's models, in the shape of the
API the caller speaks (Anthropic's when it sends ``anthropic-version``, else OpenAI's)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.http_front.errors import Api, ApiError


def listing(api: Api, models: Sequence[str], wanted: str | None) -> dict[str, Any]:
    """The list of ``models``, or its row of ``wanted`` (a 404 when it is not one of them)."""
    if wanted is not None:
        if wanted not in models:
            raise ApiError(
                "not_found", f"model: {wanted[:64]!r} not found; use one of {', '.join(models)}"
            )
        models = (wanted,)
    if api == "anthropic":
        rows = [
            {"type": "model", "id": m, "display_name": m, "created_at": "1970-01-01T00:00:00Z"}
            for m in models
        ]
        if wanted is not None:
            return rows[0]
        return {
            "data": rows,
            "has_more": False,
            "first_id": rows[0]["id"],
            "last_id": rows[-1]["id"],
        }
    items = [{"id": m, "object": "model", "created": 0, "owned_by": "cachemesh"} for m in models]
    if wanted is not None:
        return items[0]
    return {"object": "list", "data": items}
