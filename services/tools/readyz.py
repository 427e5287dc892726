"""``python -m services.tools.readyz HOST:PORT [TIMEOUT_S]``: docker-compose.yml's health check.

Exits 0 and prints SERVING when ``GET /readyz`` at HOST:PORT (a service's plaintext metrics
port) answers 200; exits 1 printing NOT_SERVING on another status, UNREACHABLE when nothing
answers within TIMEOUT_S (2 s by default). It imports the standard library only: compose runs it
every 5 s in each container, and the stack CLI (``python -m services.tools.stack probe --http``,
which imports gRPC and the whole runner) cost 0.3 s of CPU and 59 MB a check. ``http.client``
reads no proxy variable, so a proxy Docker puts in the container never sees the check.
"""

from __future__ import annotations

import http.client
import sys

SERVING = "SERVING"
NOT_SERVING = "NOT_SERVING"
UNREACHABLE = "UNREACHABLE"
DEFAULT_TIMEOUT_S = 2.0


def probe_http(address: str, timeout_s: float = 1.0) -> str:
    """SERVING when ``GET /readyz`` at ``address`` answers 200, NOT_SERVING on another status,
    UNREACHABLE when it does not answer."""
    host, _, port = address.rpartition(":")
    connection = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout_s)
    try:
        connection.request("GET", "/readyz")
        status = connection.getresponse().status
    except OSError:
        return UNREACHABLE
    finally:
        connection.close()
    return SERVING if status == 200 else NOT_SERVING


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2 or not argv[0].rpartition(":")[2].isdigit():
        print("usage: python -m services.tools.readyz HOST:PORT [TIMEOUT_S]", file=sys.stderr)
        return 2
    try:
        timeout_s = float(argv[1]) if len(argv) == 2 else DEFAULT_TIMEOUT_S
    except ValueError:
        print(f"TIMEOUT_S must be a number of seconds, got {argv[1][:40]!r}", file=sys.stderr)
        return 2
    status = probe_http(argv[0], timeout_s)
    print(status)
    return 0 if status == SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
