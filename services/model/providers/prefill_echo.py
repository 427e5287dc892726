"""A prefill an engine repeats at the start of its answer, stripped (``ModelSpec.echoes_prefill``).

llama-server continues a last assistant message (the prefill) but streams it again first:
[user, assistant "The capital of France is"] -> "The capital of France is Paris." (its first
delta "The capital of France is Paris"), its ``completion_tokens`` 3, the continuation's
alone. A caller joining prefill and answer got the prefill twice. ``EchoedPrefill`` holds the
answer's first text back while it may still be that echo, drops the echo once the text has
gone past it, and passes everything on as it came when the answer does not start with it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EchoedPrefill:
    prefill: str  # the prefill's text as sent ("": nothing to strip)
    _held: str = field(default="", init=False)  # the answer so far, while it may be the echo
    _done: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self._done = not self.prefill

    def take(self, piece: str) -> str:
        """What of the answer's next text ``piece`` to pass on ("": held back, or the echo)."""
        if self._done:
            return piece
        self._held += piece
        if self._held.startswith(self.prefill):  # the echo whole: the rest is the answer
            self._done = True
            return self._held[len(self.prefill) :]
        if self.prefill.startswith(self._held):  # still maybe the echo
            return ""
        self._done = True  # no echo: the answer as it came
        return self._held

    def rest(self) -> str:
        """At the answer's end, what was held back (an answer that was only a beginning of the
        prefill is no echo of it: passed on as it came)."""
        held, self._held = ("" if self._done else self._held), ""
        self._done = True
        return held
