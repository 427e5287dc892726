"""A process whose main thread has exited while another still runs shows Z (a zombie) in
``/proc/<pid>/stat``, yet holds its files and sockets until its last thread has gone: a
llama-server killed with SIGKILL showed Z with 1-8 threads left, and a new server on its port
refused with "couldn't bind HTTP server socket" (test_llama_restart, on a loaded machine).
The stack's ``is_alive`` and the engine runner's ``_alive`` called it gone at the first Z."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

from services.tools.engine.servers import _alive
from services.tools.stack.processes import is_alive, proc_stat

# the main thread leaves by pthread_exit, holding the GIL: the other, a listening socket its
# own, stays blocked and alive
MAIN_THREAD_EXITS = """
import ctypes, socket, sys, threading, time
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
print(server.getsockname()[1], flush=True)
ctypes.CDLL(None).pthread_exit(None)
"""


def _binds(port: int) -> bool:
    probe = socket.socket()
    try:
        probe.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def test_a_process_whose_main_thread_exited_is_alive_until_its_last_thread_has() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", MAIN_THREAD_EXITS], stdout=subprocess.PIPE
    ) as child:
        try:
            assert child.stdout is not None
            port = int(child.stdout.readline())
            for _ in range(2000):  # the main thread's exit: within its next steps
                fields = proc_stat(child.pid)
                if fields is not None and fields[0] == "Z":
                    break
            else:
                raise AssertionError("the main thread did not exit")
            assert not _binds(port)  # its socket still open
            assert is_alive(child.pid, "python")
            # the command line is still checked: a marker it does not hold is another's
            assert not is_alive(child.pid, "redis-server")
            assert _alive(child.pid)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)  # every thread gone
        assert _binds(port)
        assert not is_alive(child.pid, "python") and not _alive(child.pid)
