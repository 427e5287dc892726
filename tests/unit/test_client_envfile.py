"""``cachemesh.envfile`` reads only what docker compose reads the same way (checked against
docker-compose 1.29.2's ``config``; ``$`` and escapes against compose's env-file syntax
documentation and python-dotenv's expansion, which compose v1 uses) and refuses the rest,
naming the file and line."""

from __future__ import annotations

import pytest

from cachemesh.envfile import EnvFileError, parse_env_text, set_values


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ("A=1 # one", "a space and # in an unquoted value start a comment"),  # compose: 1
        ("A=1\t# one", "a space and # in an unquoted value start a comment"),  # compose: 1
        ("A=cm_secret  #note", "a space and # in an unquoted value start a comment"),
        ('B="x" # quoted', "text after the value's closing \""),  # compose: x
        ("B='x' # quoted", "text after the value's closing '"),
        ('B="x"y', "text after the value's closing \""),
        ('B="cm_secret', 'opening " is not closed'),
    ],
)
def test_a_value_compose_reads_otherwise_is_refused_naming_file_and_line(
    line: str, said: str
) -> None:
    with pytest.raises(EnvFileError) as caught:
        parse_env_text(f"# settings\nOK=1\n{line}\n", ".env")
    message = str(caught.value)
    assert message.startswith(".env:3: ") and said in message
    assert "line of its own" in message or "not closed" in message
    assert line not in message and "cm_secret" not in message  # it may hold a secret


def test_what_compose_reads_the_same_way_is_read() -> None:
    text = 'A=#x\nB=a#b\nC="a # b"\nD=\'it # is\'\nE=""\nexport F=1\nG="x"\n'
    assert parse_env_text(text) == {
        "A": "#x",
        "B": "a#b",
        "C": "a # b",
        "D": "it # is",
        "E": "",
        "F": "1",
        "G": "x",
    }


def test_a_value_that_would_not_read_back_is_not_written() -> None:
    with pytest.raises(EnvFileError, match="A: the value would not read back"):
        set_values("A=1\n", [("A", "0.5 # calibrated")])
    assert set_values("A=1\n", [("A", "0.5#x")]) == "A=0.5#x\n"


@pytest.mark.parametrize(
    ("line", "said"),
    [
        # compose interpolates $NAME and ${NAME} (python-dotenv, compose v1: in single quotes
        # too); a $ not followed by a name is kept by some versions, $$ is a $ in others
        ("A=$HOME/cm_secret", "a $ in a value"),
        ("A=${HOME}", "a $ in a value"),
        ('A="cm_se$cret"', "a $ in a value"),
        ("A='cm_se$cret'", "a $ in a value"),
        ("A=cm_secret$", "a $ in a value"),
        ("A=cm_$$secret", "a $ in a value"),
        # compose reads escapes in quotes: \n \r \t \\ \" in double quotes, \' \\ in single
        ('B="cm_secret\\nline"', "a backslash in a quoted value"),
        ('B="C:\\\\cm_secret"', "a backslash in a quoted value"),
        ('B="say \\"cm_secret\\""', "a backslash in a quoted value"),
        ("B='it\\'s cm_secret'", "a backslash in a quoted value"),
        ("B='cm_secret\\t'", "a backslash in a quoted value"),
    ],
)
def test_a_value_compose_would_expand_is_refused_naming_file_and_line(line: str, said: str) -> None:
    """``make up`` read these literally where docker compose replaces a variable or an escape:
    the same .env gave the two stacks different settings, silently."""
    with pytest.raises(EnvFileError) as caught:
        parse_env_text(f"# settings\nOK=1\n{line}\n", ".env")
    message = str(caught.value)
    assert message.startswith(".env:3: ") and said in message
    assert "cm_secret" not in message and "HOME" not in message  # it may hold a secret


def test_a_backslash_in_an_unquoted_value_is_read_as_compose_reads_it() -> None:
    assert parse_env_text("A=C:\\models\\n\nB=a\\tb\n") == {"A": "C:\\models\\n", "B": "a\\tb"}


def test_a_value_compose_would_expand_is_not_written() -> None:
    for value in ("$HOME", "a\\b"):
        with pytest.raises(EnvFileError, match="A: the value would not read back"):
            set_values("A=1\n", [("A", f'"{value}"')])
    with pytest.raises(EnvFileError, match="A: the value would not read back"):
        set_values("A=1\n", [("A", "$HOME")])
