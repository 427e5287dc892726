"""llama-server replicas as the stack's OpenAI-compatible engines (``up --local-engine``).

Each replica is the cached ``llama-server`` serving SmolLM2-135M-Instruct on a free loopback
port with one thread (``-t 1``: it shares two cores with the stack), one slot, batches of
256 tokens (a prefill whose client went away stops at the end of its batch), and its prompt
cache on (llama-server reuses a prompt's cached prefix and reports it as
``usage.prompt_tokens_details.cached_tokens``). Logs go to ``<run_dir>/logs/llama-server-N.log``
and pids to ``<run_dir>/pids/llama-server-N.pid`` (pid and start time, as the stack's own), so
``down`` stops them with the stack, and never a process that reused the pid of a stale file.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from services.common.kv_blocks import BLOCK_SIZE
from services.tools.engine.cache import EnginePaths
from services.tools.stack import processes
from services.tools.stack.environment import dial_address

UPSTREAM_ID = "SmolLM2-135M-Instruct"  # the alias each replica serves the model under
# the table's self-hosted rows the replicas stand behind, by tier (both are SmolLM2 here)
LOCAL_MODELS = {"small": "local-small", "large": "local-large"}
# What the router's TTFT policy assumes of a replica it has not measured yet: SmolLM2-135M's
# prefill on one thread here (a 1,200-token prompt in 6.7 s unloaded, 967 in 11.2 s with the
# machine busy), set on the local rows (CACHEMESH_PRIOR_PREFILL_TPS). The router's global prior
# (10,000 tokens/s, for hosted providers) would make every unmeasured replica look faster than a
# warm one and move a conversation off its prefix.
PRIOR_PREFILL_TPS_PER_THREAD = 150
CACHE_RAM_MIB = 256  # --cache-ram: the MiB of saved prompt states a replica may keep
# --batch-size and --ubatch-size: llama-server looks for a cancelled task (a client gone) only
# between batches, so a cut prefill runs on to the end of its batch, the replica's next request
# waiting for it. Measured here (one thread, a 2,355-token prompt, the next request sent 1.5 s
# into a cut prefill): at the default 2,048, 135 prefill tokens a CPU-second and the next request
# answered after 13.6 s; at 512, 127 and 3.4 s; at 256, 126 and 1.9 s
BATCH_TOKENS = 256
# SmolLM2-135M's KV cache a token, f16 K and V: 2 x 30 layers x 3 KV heads x 64 dims x 2 bytes
# (the GGUF's llama.block_count, attention.head_count_kv, embedding_length / head_count);
# llama-server saved a 674-token prompt's state in 14.774 MiB (22,985 bytes a token)
KV_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 2
_NAME = "llama-server"


class EngineError(RuntimeError):
    """A llama-server replica could not start (the message says why and where its log is)."""


@dataclass(frozen=True)
class EngineOptions:
    replicas: int = 2
    threads: int = 1
    context_tokens: int = 4096

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> EngineOptions:
        def number(name: str, default: int) -> int:
            raw = (environ.get(name) or "").strip()
            if not raw:
                return default
            if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
                raise EngineError(f"{name} must be a whole number >= 1, got {raw[:32]!r}")
            return int(raw)

        return cls(
            replicas=number("CACHEMESH_LLAMA_REPLICAS", 2),
            threads=number("CACHEMESH_LLAMA_THREADS", 1),
            context_tokens=number("CACHEMESH_LLAMA_CONTEXT", 4096),
        )


@dataclass(frozen=True)
class Replica:
    index: int
    port: int
    pid: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


class LlamaServers:
    def __init__(
        self,
        paths: EnginePaths,
        run_dir: Path,
        options: EngineOptions,
        *,
        out: TextIO | None = None,
    ) -> None:
        self._paths = paths
        self._run_dir = run_dir
        self.options = options
        self._out = out or sys.stdout
        self.replicas: list[Replica] = []
        self._children: list[subprocess.Popen[bytes]] = []

    def log_path(self, index: int) -> Path:
        return self._run_dir / "logs" / f"{_NAME}-{index}.log"

    def _pid_path(self, index: int) -> Path:
        return self._run_dir / "pids" / f"{_NAME}-{index}.pid"

    def command(self, port: int) -> list[str]:
        o = self.options
        return [
            str(self._paths.server),
            "--model", str(self._paths.model),
            "--alias", UPSTREAM_ID,
            "--host", "127.0.0.1",
            "--port", str(port),
            "--threads", str(o.threads),
            "--threads-batch", str(o.threads),
            "--ctx-size", str(o.context_tokens),
            "--batch-size", str(BATCH_TOKENS),
            "--ubatch-size", str(BATCH_TOKENS),
            "--parallel", "1",
            "--cache-ram", str(CACHE_RAM_MIB),
            "--no-webui",
        ]  # fmt: skip

    def start(self, ports: list[int], timeout_s: float = 60.0) -> list[Replica]:
        """Starts one replica a port and returns once each answers ``/health`` with 200."""
        if not self._paths.ready():
            raise EngineError(
                f"no llama-server build or model under {self._paths.root}: run `make engine`"
            )
        try:
            for index, port in enumerate(ports, start=1):
                log = self.log_path(index)
                log.parent.mkdir(parents=True, exist_ok=True)
                with log.open("wb") as sink:
                    popen = subprocess.Popen(
                        self.command(port),
                        stdin=subprocess.DEVNULL,
                        stdout=sink,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                self._children.append(popen)
                processes.write_pid(self._pid_path(index), popen.pid)
                self.replicas.append(Replica(index, port, popen.pid))
            for replica in self.replicas:
                self._wait_healthy(replica, timeout_s)
        except BaseException:
            self.stop()
            raise
        return list(self.replicas)

    def _wait_healthy(self, replica: Replica, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{replica.port}/health"
        while True:
            if not _alive(replica.pid):
                raise EngineError(
                    f"{_NAME} {replica.index} exited before it was healthy; see "
                    f"{self.log_path(replica.index)}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200 and json.load(response).get("status") == "ok":
                        return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise EngineError(
                    f"{_NAME} {replica.index} not healthy on {url} after {timeout_s:.0f}s; see "
                    f"{self.log_path(replica.index)}"
                )
            time.sleep(0.1)

    def stop(self, grace_s: float = 5.0) -> list[int]:
        """SIGTERM each replica this run dir records, SIGKILL after the grace; the pids."""
        pids = [r.pid for r in self.replicas] or self.recorded_pids()
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in pids:
            if _alive(pid):
                _signal(pid, signal.SIGKILL)
        for child in self._children:
            child.wait(timeout=5)
        self._children = []
        for path in (self._run_dir / "pids").glob(f"{_NAME}-*.pid"):
            path.unlink(missing_ok=True)
        self.replicas = []
        return pids

    def recorded_pids(self) -> list[int]:
        """The live replicas this run dir's pid files name (pid and start time, as the stack's
        own: ``processes.write_pid``), so a pid reused since (by anybody's process, a
        llama-server too) is never signalled. Only reads (``processes.recorded_pid``): ``stop``
        removes the files."""
        pids = []
        for path in sorted((self._run_dir / "pids").glob(f"{_NAME}-*.pid")):
            pid, legacy = processes.recorded_pid(path, _is_llama)
            if pid is not None:
                pids.append(pid)
            if legacy is not None:
                print(
                    f"{path} records pid {legacy} without its start time (an older runner's "
                    "file): that pid may be another program's now, so it is not stopped; if it "
                    f"is this stack's {_NAME}, stop it yourself (kill {legacy})",
                    file=self._out,
                    flush=True,
                )
        return pids


def kv_capacity_tokens(options: EngineOptions) -> int:
    """The prompt tokens one replica keeps: its one slot's context (``--parallel 1``) plus the
    prompt states ``--cache-ram`` holds (whole prompts, least recently used dropped first;
    measured: 17 of ~673 tokens, then the oldest went, as 256 MiB / 14.774 MiB says)."""
    return options.context_tokens + CACHE_RAM_MIB * 2**20 // KV_BYTES_PER_TOKEN


def local_engine_settings(
    settings: Mapping[str, str], replicas: list[Replica], options: EngineOptions
) -> dict[str, str]:
    """Stack settings putting the model processes in front of the llama-server replicas:
    model -> replica 1, model-2 -> replica 2 (or 1 again when only one runs), each serving
    local-small and local-large through the OpenAI adapter (MODEL_BACKEND=openai), with the
    ``auto`` tiers pointing at them. Both rows' context window is the replicas' context
    (``--ctx-size``; the table's 8,192 and 32,768 are an operator's example), so ``auto`` does
    not send a replica a prompt over it. The KV capacity prefix-cache's view and the router's
    eviction model assume of each replica is what it keeps (``kv_capacity_tokens``: 15,746
    tokens at the default context, not ``.env``'s 1,048,576 for the simulated engines)."""
    # imported here: the model table's module loads pydantic, ~175 ms of every stack command's
    # start-up (this module is imported by the stack CLI for `down` to stop the replicas)
    from services.common.model_overrides import PRIOR_VARIABLE, WINDOW_VARIABLE

    if not replicas:
        raise EngineError("no llama-server replica to put behind the model processes")
    first, second = replicas[0], replicas[1 % len(replicas)]
    model = dial_address(settings.get("MODEL_LISTEN") or "127.0.0.1:50054")
    model_2 = dial_address(settings.get("MODEL_2_LISTEN") or "127.0.0.1:50055")
    ids = ",".join(LOCAL_MODELS.values())
    prior = PRIOR_PREFILL_TPS_PER_THREAD * options.threads
    capacity = kv_capacity_tokens(options)
    return {
        PRIOR_VARIABLE: ",".join(f"{m}={prior}" for m in LOCAL_MODELS.values()),
        WINDOW_VARIABLE: ",".join(f"{m}={options.context_tokens}" for m in LOCAL_MODELS.values()),
        "CACHEMESH_AUTO_SMALL": LOCAL_MODELS["small"],
        "CACHEMESH_AUTO_LARGE": LOCAL_MODELS["large"],
        "PREFIX_CACHE_REPLICA_CAPACITY_BLOCKS": str(capacity // BLOCK_SIZE),
        "ROUTER_KV_CAPACITY_TOKENS": str(capacity),
        "MODEL_BACKEND": "openai",
        "MODEL_IDS": ids,
        "MODEL_2_IDS": ids,
        "MODEL_UPSTREAM_IDS": ",".join(f"{m}={UPSTREAM_ID}" for m in LOCAL_MODELS.values()),
        "OPENAI_BASE_URL": first.base_url,
        "MODEL_2_OPENAI_BASE_URL": second.base_url,
        "MODEL_REPLICAS": ",".join(
            f"{m}={address}" for m in LOCAL_MODELS.values() for address in (model, model_2)
        ),
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    fields = processes.proc_stat(pid)
    if fields is None:  # unreadable counts as alive
        return True
    return fields[0] != "Z" or bool(processes.other_threads(pid))  # its port closes with the last


def _is_llama(pid: int) -> bool:
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return False
    return argv0.endswith(_NAME.encode()) and _alive(pid)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(pid) == pid:  # its own session
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)
