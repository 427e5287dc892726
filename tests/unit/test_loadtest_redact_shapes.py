"""A report's settings mask a secret by its name's pattern and by its value's shape: a
``--stack-config`` file's ``GITHUB_PAT=ghp_...`` (any ``*_PAT``), a name holding PASSWORD
anywhere (``DBPASSWORD``), and a value shaped as a provider's or GitHub's key (``sk-...``,
``sk-ant-...``, ``ghp_...``) under any name. Before, 7 of the 8 secrets here were in the
report whole (``MY_SECRET``'s alone was masked), and the key in ``NOTE``'s words too."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachemesh.loadtest.cli import stack_config
from cachemesh.loadtest.redact import MASK, mask

GHP = "ghp_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
OPENAI = "sk-proj-AbCdEfGhIjKlMnOpQrStUvWx"
ANTHROPIC = "sk-ant-api03-AbCdEfGhIjKlMnOpQrStUvWx"
SECRETS = {
    "GITHUB_PAT": GHP,
    "DEPLOY_PAT": "abc123secretvalue",
    "MY_SECRET": "hunter2",
    "DBPASSWORD": "hunter3",
    "PASSWORDFILE_CONTENT": "hunter4",
    "SOME_VALUE": OPENAI,
    "ANOTHER": ANTHROPIC,
    "GH_CI_VALUE": "github_pat_11ABCDEFG0123456789_abcdefghijklmnop",
}


def test_a_stack_config_files_secrets_are_masked_by_name_and_by_shape(tmp_path: Path) -> None:
    lines = [f"{name}={value}" for name, value in SECRETS.items()]
    lines += [f"NOTE=see {GHP} here", "MAX_TOKENS=64", "ROUTER_SEMANTIC_TIMEOUT_S=0.25"]
    path = tmp_path / "stack.env"
    path.write_text("\n".join(lines) + "\n")
    shown = stack_config(path)
    leaked = [name for name, value in SECRETS.items() if value in shown[name]]
    assert leaked == [], leaked
    assert shown["NOTE"] == f"see {MASK} here"  # the value's other words kept
    assert shown["MAX_TOKENS"] == "64" and shown["ROUTER_SEMANTIC_TIMEOUT_S"] == "0.25"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PYTHONPATH", "/opt/app"),  # PATH is no PAT
        ("ROUTER_REPLICA_POLICY", "task-router"),  # no key's prefix at a word's start
        ("SEMANTIC_MODEL", "sk-learn"),  # too short after its prefix for a key
        # hyphenated words and a model's path after a key's prefix: no key's random run
        ("RUN_NAME", "sk-learn-benchmarks-2024-run1"),
        ("MODEL_PATH", "/models/sk-llama-3-8b-instruct-q4"),
        ("NOTE", "ghp_pages-deploy-for-docs-2024"),
        ("CACHEMESH_REDIS_PASSWORD_RELOAD_S", "5"),  # a figure: its number shown
    ],
)
def test_a_setting_that_is_no_secret_is_shown(name: str, value: str) -> None:
    assert mask(name, value) == value


def test_a_figure_named_with_password_is_masked_unless_a_number() -> None:
    assert mask("DBPASSWORD_S", "hunter2") == MASK and mask("DBPASSWORD_S", "5") == "5"


@pytest.mark.parametrize(
    "key",
    [
        "sk-" + "T3BlbkFJ" * 6,  # OpenAI's legacy shape: 48 characters, no "-"
        "sk-proj-Ab3_dE-fGh1JkLmNoPqRsTuV-wXyZ0123456789_abcDEF",  # base64url, broken runs
        "sk-ant-api03-x9Y8w7V6u5T4s3R2q1P0-oNmLkJiHgFeDcBa_AA",
        "ghp_0123456789abcdefABCDEF0123456789abcd",
        "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQ",
    ],
)
def test_a_key_under_a_plain_name_is_masked_in_its_value(key: str) -> None:
    assert mask("NOTE", f"run with {key} today") == f"run with {MASK} today"
