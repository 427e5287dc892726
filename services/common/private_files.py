"""Files that hold tenants' data (semantic-cache's write-ahead log and snapshot, every tenant's
prompts and answers in clear; the router's billing journal) are the service user's alone:
files 0600, directories 0700, whatever the umask, wherever the data directory is (a volume,
``/var/lib/cachemesh``, outside the stack's 0700 run directory).

The code creates them so (``private_directory``, ``open_private``); ``tighten`` takes group's
and others' permissions off the ones an older version (or an operator's copy) left wider, at
start-up, in one line: a path it cannot change (not this user's) is said, never raised, so the
start goes on.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from services.common.files import fsync_directory

log = logging.getLogger("cachemesh.files")

FILE_MODE = 0o600
DIRECTORY_MODE = 0o700
_OTHERS = 0o077  # group's and others' permissions
_SHOWN = 3  # the paths a line names (then how many more)


def private_directory(path: Path) -> None:
    """Creates ``path`` 0700 if it is missing (missing parents as the umask says: they are
    not this service's), each directory it makes fsynced in its parent before it returns: a
    new file's fsync (or its directory's) does not make that directory's own entry durable, so
    after a power cut a new data directory could be gone with the acknowledged writes in it."""
    missing = []
    for level in (path, *path.parents):
        if level.is_dir():
            break
        missing.append(level)
    path.mkdir(mode=DIRECTORY_MODE, parents=True, exist_ok=True)
    for made in reversed(missing):  # the outermost first
        try:
            fsync_directory(made.parent)
        except PermissionError as exc:  # the outermost's parent is not ours: it may be unreadable
            log.warning(
                "%s was made in %s, which this process cannot open to make that durable (%s): "
                "after a power cut it may be gone; make it beforehand, or let this process "
                "read its parent",
                made,
                made.parent,
                exc.strerror,
            )


def open_private(path: Path, flags: int) -> int:
    """``os.open`` of ``path`` with ``flags``, creating it 0600 (an existing file keeps its
    mode: ``tighten`` at start-up)."""
    return os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)


def with_entries(directory: Path) -> list[Path]:
    """``directory`` and what is in it (one level), or nothing when it is missing."""
    try:
        return [directory, *sorted(directory.iterdir())]
    except FileNotFoundError:
        return []


def tighten(paths: Iterable[Path], setting: str, log: logging.Logger) -> list[Path]:
    """Takes group's and others' permissions off each of ``paths`` that has any (its owner's
    are kept); a missing path, a symlink (anything but a file or a directory) and a directory
    with the sticky bit (a shared one, such as /tmp) are left as they are. One WARNING names
    ``setting`` and what was tightened, one more what could not be; returns the paths
    tightened."""
    tightened: list[Path] = []
    failed: list[str] = []
    for path in paths:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            failed.append(f"{path} ({exc.strerror})")
            continue
        mode = stat.S_IMODE(info.st_mode)
        kept = not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode))  # a symlink
        if kept or not mode & _OTHERS:
            continue
        if stat.S_ISDIR(info.st_mode) and mode & stat.S_ISVTX:
            failed.append(f"{path} (a shared directory: give the service one of its own)")
            continue
        try:
            os.chmod(path, mode & ~_OTHERS)
        except OSError as exc:
            failed.append(f"{path} ({exc.strerror})")
            continue
        tightened.append(path)
    if tightened:
        log.warning(
            "%s: %d files or directories holding tenants' data could be read by other users; "
            "their group and other permissions were removed: %s",
            setting,
            len(tightened),
            _listed([str(path) for path in tightened]),
        )
    if failed:
        log.warning(
            "%s: %d files or directories holding tenants' data can be read by other users and "
            "could not be made private (chmod them go-rwx): %s",
            setting,
            len(failed),
            _listed(failed),
        )
    return tightened


def _listed(items: list[str]) -> str:
    more = len(items) - _SHOWN
    return ", ".join(items[:_SHOWN]) + (f" and {more} more" if more > 0 else "")
