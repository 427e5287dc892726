"""An OTLP 'collector' that takes connections and never answers (a hung receiver)."""

from __future__ import annotations

import contextlib
import socket
import threading


class BlackHole:
    """A 'collector' that accepts connections and never answers (a hung OTLP receiver)."""

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self.accepted = threading.Event()
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = self._socket.accept()
                self._held.append(connection)  # read nothing, answer nothing
                self.accepted.set()

    def close(self) -> None:
        self._socket.close()
        for connection in self._held:
            connection.close()
