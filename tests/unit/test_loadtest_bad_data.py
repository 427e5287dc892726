"""A workload's data file that is empty, malformed or of another shape is refused before the
run, naming the file (and the line or conversation at fault): not a ZeroDivisionError
traceback, a JSON error naming no file, or a plan drawn forever."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cachemesh.loadtest.workloads import DataInvalid, WorkloadSpec, build
from cachemesh.loadtest.workloads import tau as tau_workload
from cachemesh.loadtest.workloads.bfcl import QUERIES
from cachemesh.loadtest.workloads.faq import PAIRS
from cachemesh.loadtest.workloads.unrelated import PROMPTS

TOOLS = [{"type": "function", "function": {"name": "think", "parameters": {"type": "object"}}}]


def _agent_data(tmp_path: Path, trajectories: str, tools: object = TOOLS) -> Path:
    folder = tmp_path / tau_workload.TRAJECTORIES
    folder.parent.mkdir(parents=True)
    folder.write_text(trajectories, encoding="utf-8")
    (tmp_path / tau_workload.TOOLS).write_text(json.dumps(tools), encoding="utf-8")
    return tmp_path


def _first(name: str, data: Path) -> None:
    build(WorkloadSpec(name, 7, "ns", data)).next_item()


@pytest.mark.parametrize(
    ("trajectories", "said"),
    [
        ("", r"airline_gpt-4o_trajectories\.jsonl holds no record"),
        ('{"messages": []}\n\n{"messages": [\n', r"trajectories\.jsonl:3: not a JSON line"),
        ("[1, 2]\n", r"trajectories\.jsonl:1: not a JSON object"),
        ('{"turns": []}\n', r"trajectories\.jsonl, conversation 1: .*no field 'messages'"),
        # no assistant turn after a user's: no request in the whole file (drawn forever before)
        (
            json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user"}]}) + "\n",
            r"trajectories\.jsonl: no conversation has an assistant turn",
        ),
    ],
)
def test_bad_trajectories_are_refused_naming_the_file(
    tmp_path: Path, trajectories: str, said: str
) -> None:
    with pytest.raises(DataInvalid, match=said):
        _first("agent", _agent_data(tmp_path, trajectories))


def test_an_empty_tool_list_is_refused_naming_the_file(tmp_path: Path) -> None:
    conversation = {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ]
    }
    data = _agent_data(tmp_path, json.dumps(conversation) + "\n", tools=[])
    with pytest.raises(DataInvalid, match=r"airline_tools\.json holds no tool"):
        _first("agent", data)


@pytest.mark.parametrize(
    ("name", "relative", "text", "said"),
    [
        ("tools", QUERIES, "", "holds no record"),
        ("tools", QUERIES, '{"id": 1}\n', "no field 'question'"),
        ("faq", PAIRS, "a,b\n1,2\n", "no field 'text_a'"),
        ("faq", PAIRS, "text_a,text_b,label\nx,y,maybe\n", "holds no labelled pair"),
        ("unrelated", PROMPTS, "prompt\n", "holds no prompt"),
        ("unrelated", PROMPTS, "question\nwhy?\n", "no field 'prompt'"),
    ],
)
def test_other_workloads_bad_files_are_refused_naming_the_file(
    tmp_path: Path, name: str, relative: str, text: str, said: str
) -> None:
    path = tmp_path / relative
    path.parent.mkdir(parents=True)
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataInvalid, match=said) as refused:
        _first(name, tmp_path)
    assert str(path) in str(refused.value)


def test_a_file_that_is_not_utf8_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / PROMPTS
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x1f\x8b\x08\x00\xff\xfe")
    with pytest.raises(DataInvalid, match="not UTF-8"):
        _first("unrelated", tmp_path)
