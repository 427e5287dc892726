"""A model's answer as it streams in: the Gateway's deltas and the content blocks they add up
to (consecutive text is one text block; a ``tool_use`` is a block of its own)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cachemesh.v1 import gateway_pb2 as pb
from cachemesh.v1 import model_pb2
from cachemesh.v1 import prefix_cache_pb2 as pc


@dataclass
class Answer:
    blocks: list[pb.ContentBlock] = field(default_factory=list)
    first: bool = False  # the last ``add`` was the answer's first content
    # what an interrupted provider stream reported for the part produced (None: nothing)
    partial_usage: pc.ProviderUsage | None = None
    # and the output tokens its model service counted (its text, its tool calls as they were
    # written, its thinking: what the router did not see whole)
    partial_output_tokens: int = 0
    # the model service's last running count of what the model wrote (a ``progress`` chunk's:
    # its thinking and a tool call's pieces in it; 0: none counted) and the text after it
    progress_tokens: int = 0
    text_since_progress: list[str] = field(default_factory=list)
    # the non-empty pieces the answer came in (its text chunks and its tool calls), and the
    # text chunks after the last running count: each at least one of the provider's tokens
    # (``streamed_output_tokens``)
    pieces: int = 0
    pieces_since_progress: int = 0
    _texts: list[list[str]] = field(default_factory=list)  # the pieces of each text block

    def progressed(self, progress: model_pb2.GenerateProgress) -> None:
        """A ``progress`` chunk: its count (an older model service sends none) is the model's
        output so far, the text received before it in it."""
        if progress.output_tokens:
            self.progress_tokens = progress.output_tokens
            self.text_since_progress.clear()
            self.pieces_since_progress = 0

    def add(self, chunk: model_pb2.GenerateChunk) -> pb.ContentBlock:
        """Records a ``text`` or ``block`` chunk; returns the Gateway delta for it."""
        self.first = not self.blocks
        if chunk.WhichOneof("part") == "text":
            if not self.blocks or self.blocks[-1].WhichOneof("kind") != "text":
                self.blocks.append(pb.ContentBlock(text=""))
                self._texts.append([])
            self._texts[-1].append(chunk.text)
            if chunk.text:
                self.pieces += 1
            if self.progress_tokens:
                self.text_since_progress.append(chunk.text)
                self.pieces_since_progress += bool(chunk.text)
            return pb.ContentBlock(text=chunk.text)
        self.blocks.append(chunk.block)
        self.pieces += chunk.block.WhichOneof("kind") == "tool_use"
        return chunk.block

    def content(self) -> list[pb.ContentBlock]:
        texts = iter(self._texts)
        out = []
        for block in self.blocks:
            if block.WhichOneof("kind") == "text":
                out.append(pb.ContentBlock(text="".join(next(texts))))
            else:
                out.append(block)
        return out or [pb.ContentBlock(text="")]

    def text(self) -> str:
        return "".join(piece for pieces in self._texts for piece in pieces)

    def tool_text(self) -> str:
        """The finished tool calls' names and input JSON: output tokens, like the text."""
        return "".join(
            block.tool_use.name + block.tool_use.input_json
            for block in self.blocks
            if block.WhichOneof("kind") == "tool_use"
        )
