"""The bench's OTLP receiver in a process of its own (``services.tools.stack.otlp_sink``).

In the load generator's process, decoding the services' span exports would take that
process's CPU and GIL and count against the traced runs; a collector is its own process too.
It only counts spans per service, and tells the counts when it stops.
"""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

from services.tools.stack.otlp_sink import OtlpSink


def _serve(ports: mp.Queue[int], stop: Any, counts: mp.Queue[dict[str, int]]) -> None:
    sink = OtlpSink(keep_spans=False)
    sink.start()
    ports.put(sink.port)
    stop.wait()
    sink.stop()
    counts.put(sink.counts())


class SinkProcess:
    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self._stop = ctx.Event()
        self._ports: mp.Queue[int] = ctx.Queue()
        self._counts: mp.Queue[dict[str, int]] = ctx.Queue()
        self._process = ctx.Process(
            target=_serve, args=(self._ports, self._stop, self._counts), daemon=True
        )
        self.endpoint = ""

    def start(self) -> str:
        """Starts the receiver; returns its OTLP endpoint (``http://127.0.0.1:<port>``)."""
        self._process.start()
        self.endpoint = f"http://127.0.0.1:{self._ports.get(timeout=60)}"
        return self.endpoint

    def stop(self) -> dict[str, int]:
        """Stops the receiver; returns the spans it received, per service."""
        self._stop.set()
        try:
            return self._counts.get(timeout=30)
        finally:
            self._process.join(timeout=5)
            if self._process.is_alive():
                self._process.kill()
