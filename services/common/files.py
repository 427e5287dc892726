"""Small file helpers shared by services and tools."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path


def sha256_of(path: Path) -> str:
    """The file's sha256, hex, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def os_error_text(exc: OSError) -> str:
    """An OSError's errno name and text ("ENOSPC: No space left on device"), without its file:
    what a caller is told of a disk's refusal (the path stays in the service's log)."""
    if exc.errno is None:
        return f"{type(exc).__name__}: {exc}"
    return f"{errno.errorcode.get(exc.errno, str(exc.errno))}: {exc.strerror or exc}"


def fsync_directory(directory: Path) -> None:
    """Makes a rename or a new file in ``directory`` durable (the entry itself is data)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
