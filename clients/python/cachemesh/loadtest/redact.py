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
``github_pat_...``: ``KEY_SHAPED``), whatever its setting's name. Before, a ``GITHUB_PAT`` in a
``--stack-config`` file, or an OpenAI key under a name saying nothing, was in the report."""

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
# (sk-ant-), GitHub's tokens (ghp_, gho_, ghu_, ghs_, ghr_; github_pat_), at least 16
# characters of the key after its prefix (not a word such as "sk-learn")
KEY_SHAPED = re.compile(
    r"\b(?:sk-|gh[pousr]_|github_pat_)[A-Za-z0-9_\-]{16,}",
)
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
    value = KEY_SHAPED.sub(MASK, value)
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


def _masked_header(header: str) -> str:
    """``name=***`` (the header's name kept: which backend, which scheme), or ``***``."""
    name, sep, _ = header.partition("=")
    return f"{name}={MASK}" if sep else MASK
