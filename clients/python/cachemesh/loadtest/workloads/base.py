"""What a workload is: an endless, seeded source of Gateway requests with their metadata."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from cachemesh.v1 import gateway_pb2 as pb

TENANT_A = "tenant-a"
TENANT_B = "tenant-b"


@dataclass(frozen=True)
class Item:
    """One request to send. ``question`` is set for labelled workloads (the asked text);
    ``session`` for a turn of a conversation (the agent workload's): the runner sends a
    session's items in the plan's order, each after the previous one's answer."""

    kind: str  # the workload that made it: agent | tools | faq | unrelated | synthetic
    tenant: str  # tenant-a | tenant-b (which demo key sends it)
    request: pb.CompleteRequest
    question: str = ""
    session: str = ""  # the conversation it is a turn of ("" for a request on its own)


class Workload(Protocol):
    name: str

    def params(self) -> dict[str, object]:
        """Every parameter that shapes the requests (recorded in the report)."""
        ...

    def next_item(self) -> Item:
        """The next request; workloads never run out (they cycle or draw anew)."""
        ...

    def labels(self) -> dict[frozenset[str], int]:
        """Labelled pairs of normalised questions (1 = same meaning, 0 = not); may be empty."""
        ...


class DataMissing(FileNotFoundError):
    """A data-backed workload cannot find its file under the data directory."""


def data_file(data_dir: Path, relative: str) -> Path:
    path = data_dir / relative
    if not path.is_file():
        raise DataMissing(
            f"{path} not found: pass --data-dir (the shared data folder, ../shared/data from the "
            "repository root), or use the synthetic workload, which needs no data"
        )
    return path


class DataInvalid(ValueError):
    """A workload's data file is not that workload's data (empty, malformed, a field missing):
    said before the run, naming the file (and the line where one is at fault)."""


def read_jsonl(path: Path) -> list[dict[str, object]]:
    """The file's JSON objects, one a line (blank lines skipped); ``DataInvalid`` naming the
    file and line of one that is not, and for a file that holds none."""
    rows: list[dict[str, object]] = []
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataInvalid(f"{path}:{number}: not a JSON line ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise DataInvalid(f"{path}:{number}: not a JSON object")
                rows.append(row)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    return nonempty(path, rows, "record")


def _not_utf8(path: Path) -> DataInvalid:
    return DataInvalid(f"{path}: not UTF-8 text (a compressed file?)")


T = TypeVar("T")


def read_csv_rows(path: Path, build: Callable[[csv.DictReader[str]], list[T]]) -> list[T]:
    """``build`` of the file's CSV rows (its header line's columns as keys); ``DataInvalid``
    naming the file for one not UTF-8, or whose rows ``build`` cannot read (a column missing,
    a short row)."""
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            return build(csv.DictReader(handle))
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except (KeyError, AttributeError, csv.Error) as exc:
        raise malformed(path, exc) from None


def nonempty(path: Path, rows: list[T], what: str) -> list[T]:
    """``rows``, or ``DataInvalid`` when there are none (a workload of nothing would divide by
    zero or wait forever for its first request)."""
    if not rows:
        raise DataInvalid(f"{path} holds no {what} this workload can send: check --data-dir")
    return rows


def malformed(path: Path, exc: Exception, where: str = "") -> DataInvalid:
    """What a row missing a field (or of another shape) is said as."""
    detail = f"no field {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
    return DataInvalid(f"{path}{where}: not this workload's data ({detail})")


def normalise(text: str) -> str:
    """The labels' key: whitespace collapsed, casefolded (the semantic cache's exact key keeps
    case and inner whitespace; its folded key is this one with ``str.lower``)."""
    return " ".join(text.split()).casefold()


def user(text: str, *, cache: bool = False) -> pb.Message:
    block = pb.ContentBlock(text=text)
    if cache:
        block.cache_control.SetInParent()
    return pb.Message(role=pb.ROLE_USER, content=[block])


def tool_from_schema(name: str, description: str, parameters: object) -> pb.Tool:
    return pb.Tool(
        name=name, description=description, input_schema_json=json.dumps(parameters, sort_keys=True)
    )
