"""An output file the tools write once their run is over, checked before the run: a bench
that ran minutes (``make bench-prefix``: 4 minutes) lost its results to a traceback when its
``--out`` could not be written."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def _make(path: Path, made: list[Path]) -> None:
    """Make the directory ``path`` with its missing parents, each one made put first in
    ``made`` (deepest first: the order to remove them in; those made before a failure too)."""
    missing = []
    for directory in (path, *path.parents):
        if directory.exists():
            break
        missing.append(directory)
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            continue  # made by someone else meanwhile: not ours to remove
        made.insert(0, directory)


def _unmake(made: list[Path]) -> None:
    """Remove the directories a probe made (deepest first), each only if still empty: a
    refused run leaves nothing behind; the writers make their parents when they write."""
    for directory in made:
        try:
            directory.rmdir()
        except OSError:
            return  # something was put there meanwhile: leave it and its parents


def check_writable(path: Path, flag: str = "--out") -> None:
    """A ValueError naming ``flag`` when ``path`` is a directory or cannot be written (its
    missing directories are made for the probe and removed after it; an existing file is
    left as it is)."""
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory: name a file")
    made: list[Path] = []
    try:
        _make(path.parent, made)
        existed = path.exists()
        path.open("a").close()
        if not existed:
            path.unlink()
    except OSError as exc:
        raise ValueError(f"{flag}: cannot write {path}: {exc.strerror}") from None
    finally:
        _unmake(made)


def check_writable_dir(path: Path, flag: str = "--out-dir") -> None:
    """A ValueError naming ``flag`` when ``path`` is not a directory files can be made in (if
    missing, it is made for the probe and removed after it)."""
    made: list[Path] = []
    try:
        _make(path, made)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ValueError(f"{flag}: cannot write into {path}: {exc.strerror}") from None
    finally:
        _unmake(made)


def refuse_unwritable(
    parser: argparse.ArgumentParser,
    path: Path | str | None,
    flag: str = "--out",
    *,
    directory: bool = False,
) -> None:
    """``check_writable`` (``directory``: ``check_writable_dir``) for a command line: its
    refusal is the parser's error (exit 2)."""
    if path is None:
        return
    try:
        (check_writable_dir if directory else check_writable)(Path(path), flag)
    except ValueError as exc:
        parser.error(str(exc))
