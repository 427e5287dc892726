"""Settings fit for a report: a value whose name has a word that says key, token, secret,
password or credential (``ANTHROPIC_API_KEY``, not ``CACHEMESH_TOKENIZER_CACHE_TOKENS``) is
masked (a limit ``..._PER_KEY`` or a duration ``..._S``, ``..._MS``, ``..._SECONDS``: unless
its value is a number), and so are the values of a ``*HEADERS`` variable (an OTLP exporter's
``x-honeycomb-team=...,authorization=...``), any ``authorization=``, ``*-key=``, ``*-token=``
or ``*-team=`` pair and ``Bearer`` token inside any value, and the user:password part of a URL
(``make bench``, ``cachemesh-load`` and the estimator record the stack's settings beside their
figures, all through :func:`mask`). A name with a personal access token's word (``GITHUB_PAT``,
``*_PAT``) or ``PASSWORD`` anywhere in it (``DBPASSWORD``) is masked too, and so is, in any
value, a token shaped as a provider's or GitHub's key (``sk-...``, ``sk-ant-...``, ``ghp_...``,
``github_pat_...`` with a key's random run in it: ``KEY_SHAPED``), whatever its setting's name;
not hyphenated words or a model's name after such a prefix (``sk-learn-benchmarks-2024-run1``,
masked before). Before, a ``GITHUB_PAT`` in a ``--stack-config`` file, or an OpenAI key under a
name saying nothing, was in the report."""

from __future__ import annotations

import re
from collections.abc import Iterable

MASK = "***"
# a word of a setting's name that says it holds a secret: ANTHROPIC_API_KEY, HF_TOKEN,
# REDIS_PASSWORD, ... (a whole word: CACHEMESH_TOKENIZER_CACHE_TOKENS or MAX_TOKENS holds none)
_SECRET_WORD = re.compile(
    r"^(?:API)?(?:KEYS?|TOKEN|SECRETS?|PASSWORD|PASSWD|PASS|PASSPHRASE|PWD|CREDENTIALS?|AUTH"
    r"|AUTHORIZATION|BEARER|PAT)$",
    re.IGNORECASE,
)
# a name holding PASSWORD anywhere, not as a word of its own (DBPASSWORD, PASSWORDFILE)
_PASSWORD_IN_NAME = re.compile(r"PASSWORD|PASSWD", re.IGNORECASE)
# a value shaped as a key, whatever its setting's name: OpenAI's (sk-, sk-proj-), Anthropic's
# (sk-ant-), GitHub's tokens (ghp_, gho_, ghu_, ghs_, ghr_; github_pat_), at least 20
# characters of the key after its prefix, and among them a key's random run (``_key_like``):
# not hyphenated words or a model's name ("sk-learn-benchmarks-2024-run1",
# "/models/sk-llama-3-8b-instruct-q4"), which were masked before
KEY_SHAPED = re.compile(
    r"\b(?:sk-|gh[pousr]_|github_pat_)[A-Za-z0-9_\-]{20,}",
)
# a key's random run: this long between its "-" / "_" (OpenAI's legacy keys run 48, GitHub's
# ghp_ 36, github_pat_ 22 and 59; sk-proj- and sk-ant- keys are ~150 and ~95 characters of
# base64url, broken by a "-" or "_" about one in 32: one of 95 has no run this long about 2 in
# 10,000 times). A word, a version or a quantization is shorter ("benchmarks", "instruct")
_KEY_RUN_CHARS = 16
_KEY_RUN = re.compile(rf"[A-Za-z0-9]{{{_KEY_RUN_CHARS},}}")
# OTEL_EXPORTER_OTLP_HEADERS, OTEL_EXPORTER_OTLP_TRACES_HEADERS, ...: "name=value,name=value"
_HEADERS_NAME = re.compile(r"HEADERS$", re.IGNORECASE)
# a credential pair inside any value, up to the next "," / ";" / "&" (a value may hold spaces:
# "authorization=Basic dXNl...")
_PAIR_SECRET = re.compile(
    r"(?P<name>\b(?:authorization|[\w.]*[-_](?:key|token|team|secret|password))\s*=\s*)[^,;&]*",
    re.IGNORECASE,
)
_BEARER = re.compile(r"(?P<name>\bbearer\s+)[^\s,;&]+", re.IGNORECASE)
# up to the value's last "@": a password may hold "@", "/" or "?" (redis-py reads it so)
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)\S*@")
_URL_QUERY_SECRET = re.compile(r"(?P<name>[?&](?:password|passwd|token|key)=)[^&\s]*", re.I)


def mask(name: str, value: str, secrets: Iterable[str] = ()) -> str:
    """``value`` of the setting ``name``, its secrets masked (``secrets``: known values). A
    name whose secret word is a figure's (``..._PER_KEY``, ``..._S``) shows its value only
    when that is a number (``STRIPE_SECRET_KEY_S=sk-live-...`` stays masked)."""
    if secret_name(name) or (_figure_name(name) and not _NUMBER.fullmatch(value.strip())):
        return MASK if value else ""
    value = KEY_SHAPED.sub(lambda m: MASK if _key_like(m[0]) else m[0], value)
    if _HEADERS_NAME.search(name):  # every header's value: any of them may carry a key
        return ",".join(_masked_header(h) for h in value.split(",")) if value else ""
    value = _URL_QUERY_SECRET.sub(rf"\g<name>{MASK}", value)  # first: it may hold an "@"
    value = _PAIR_SECRET.sub(rf"\g<name>{MASK}", value)
    value = _BEARER.sub(rf"\g<name>{MASK}", value)
    value = _URL_USERINFO.sub(rf"\g<scheme>{MASK}@", value)
    for secret in secrets:
        if secret:
            value = value.replace(secret, MASK)
    return value


# a name's last word that makes it a figure: a duration (CACHEMESH_API_KEYS_POLL_S)
_FIGURE_UNIT = re.compile(r"^(?:S|MS|SECONDS)$", re.IGNORECASE)
# what a figure's value is: a whole or decimal number, signed or not ("64", "0.25", "-1")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def _words(name: str) -> list[str]:
    return re.split(r"[^A-Za-z0-9]+", name)


def _secret_words(words: list[str]) -> list[bool]:
    """For each word, whether it names a secret, a unit of a figure (``PER KEY``) aside."""
    return [
        bool(_SECRET_WORD.match(word)) and not (i and words[i - 1].upper() == "PER")
        for i, word in enumerate(words)
    ]


def secret_name(name: str) -> bool:
    """Whether a word of ``name`` (split at ``_``, ``-``, ``.``) names a secret; not a unit
    of a figure (``..._PER_KEY``: a limit per key) nor a name of a duration (``..._POLL_S``,
    ``..._RECHECK_S``): those are the stack's figures, which a report is for (``mask`` shows
    their value only when it is a number: ``_figure_name``)."""
    words = _words(name)
    if _FIGURE_UNIT.match(words[-1]):
        return False
    return any(_secret_words(words)) or _PASSWORD_IN_NAME.search(name) is not None


def _figure_name(name: str) -> bool:
    """Whether ``name`` has a secret word that ``secret_name`` sets aside as a figure's: a
    ``..._PER_KEY`` limit or a duration (``..._S``, ``..._MS``, ``..._SECONDS``) whose name
    holds KEY or TOKEN; its value is shown only when it is a number."""
    words = _words(name)
    secret_word = any(_SECRET_WORD.match(word) for word in words)
    return (secret_word or _PASSWORD_IN_NAME.search(name) is not None) and not secret_name(name)


def _key_like(token: str) -> bool:
    """A ``KEY_SHAPED`` token that is a key: it holds a run of ``_KEY_RUN_CHARS`` or more
    letters and digits with two of lower case, capitals and digits mixed, as a random key
    does (the model service's error redactor asks a key-/api- token for a run of 20 with
    letters and digits mixed: ``services/model/providers/redact.py``'s ``_key_like``)."""
    return any(_random_looking(run) for run in _KEY_RUN.findall(token))


def _random_looking(run: str) -> bool:
    kinds = (
        any(c.islower() for c in run)
        + any(c.isupper() for c in run)
        + any(c.isdigit() for c in run)
    )
    return kinds >= 2


def _masked_header(header: str) -> str:
    """``name=***`` (the header's name kept: which backend, which scheme), or ``***``."""
    name, sep, _ = header.partition("=")
    return f"{name}={MASK}" if sep else MASK
