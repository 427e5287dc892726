"""An output file the tools write once their run is over, checked before the run: a bench
that ran minutes (``make bench-prefix``: 4 minutes) lost its results to a traceback when its
``--out`` could not be written."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def check_writable(path: Path, flag: str = "--out") -> None:
    """A ValueError naming ``flag`` when ``path`` is a directory or cannot be written (its
    directory is made if missing, as the write will; an existing file is left as it is)."""
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a directory: name a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.exists()
        path.open("a").close()
        if not existed:
            path.unlink()
    except OSError as exc:
        raise ValueError(f"{flag}: cannot write {path}: {exc.strerror}") from None


def check_writable_dir(path: Path, flag: str = "--out-dir") -> None:
    """A ValueError naming ``flag`` when ``path`` is not a directory files can be made in (it
    is made if missing, as the write will)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ValueError(f"{flag}: cannot write into {path}: {exc.strerror}") from None


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
