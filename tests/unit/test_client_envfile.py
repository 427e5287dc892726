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


@pytest.mark.parametrize(
    ("text", "values", "written"),
    [
        # a key's line as the reader reads its name (export, spaces): replaced where it
        # stands; set_values matched only `KEY=` at a line's start and added a second line
        # before the user's, which the reader then took (2 of these 4 read back the old value)
        ("A=1\nexport B=2\n", [("A", "x"), ("B", "3")], "A=x\nexport B=3\n"),
        ("C=1\n  A=1\n", [("C", "2"), ("A", "5")], "C=2\nA=5\n"),
        ("A = 1\nB=2\n", [("A", "5")], "A=5\nB=2\n"),
        ("export T=0.88\n# note\n", [("T", "0.9")], "export T=0.9\n# note\n"),
        ("A=1\nexport A=2\n", [("A", "9")], "export A=9\n"),  # any export line keeps it one
        # a second line of a key dropped (it replaced both, and kept two lines setting it)
        ("A=1\nB=2\nA=1\n", [("A", "5")], "A=5\nB=2\n"),
    ],
)
def test_a_keys_every_line_is_found_as_the_reader_reads_it(
    text: str, values: list[tuple[str, str]], written: str
) -> None:
    assert set_values(text, values) == written
    assert parse_env_text(set_values(text, values)) == parse_env_text(text) | dict(values)


def test_shell_exports_at_the_end_unset_keys_and_other_lines_as_written() -> None:
    """demo-keys.env's writing (services.tools.keys): ``export`` lines quoted for a shell,
    missing keys at the end, a key set to None unset, the user's lines kept as written, even
    one the reader refuses and the last one without its newline."""
    text = "# mine\nexport PATH=\"$PATH:/x\"\nexport K='old'\nT=1\nK=again\nMY=1"
    written = set_values(text, [("K", "a b"), ("T", None), ("N", "/p")], export=True, append=True)
    assert written == "# mine\nexport PATH=\"$PATH:/x\"\nexport K='a b'\nMY=1\nexport N=/p\n"
    assert set_values(text, [("T", None), ("U", None)]).endswith("K=again\nMY=1")
    assert set_values("", [("A", "1")], append=True) == "A=1\n"
    with pytest.raises(EnvFileError, match=r"^K: the value would not read back") as caught:
        set_values(text, [("K", "cm_it's")], export=True)
    assert "cm_it" not in str(caught.value)


def test_a_users_export_line_stays_an_export() -> None:
    """.env's writing (plain lines): a key the user exports keeps its ``export`` (quoted for a
    shell), so a shell that sources the file still exports it; the reader reads the new value."""
    written = set_values("  export A=1\nB=2\n", [("A", "x y"), ("B", "3")])
    assert written == "export A='x y'\nB=3\n"
    assert parse_env_text(written) == {"A": "x y", "B": "3"}
    with pytest.raises(EnvFileError, match=r"^A: .* as an export line, which a shell needs quoted"):
        set_values("export A=1\n", [("A", "it's")])  # the message says why, not "quotes"
