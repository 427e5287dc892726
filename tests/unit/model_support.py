"""Test doubles shared by the model engine's unit tests."""

from __future__ import annotations


class RecordingSleep:
    """The sleep seam: records each requested duration and returns at once."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
