"""What a bench report may say about a stack: cachemesh's own settings, secrets masked.

A stack's merged settings hold the caller's whole environment (API keys, tokens, anything
exported in that shell). The report keeps only the variables the services read (the stack's
service table) and those ``.env`` names, and masks any value whose name says key, token,
secret, password or credential, the user:password part of a URL, and any value containing one
of the ``secrets`` given (the stack's own keys).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from cachemesh.loadtest.redact import MASK, mask
from services.tools.stack.service_table import SERVICES

__all__ = ["MASK", "mask", "own_settings", "setting_names"]


def setting_names(dotenv_names: Iterable[str]) -> frozenset[str]:
    """The variables that are cachemesh's settings: every one a service reads, and ``.env``'s."""
    return frozenset(key for s in SERVICES for key in s.env_keys) | frozenset(dotenv_names)


def own_settings(
    settings: Mapping[str, str], names: frozenset[str], secrets: Iterable[str] = ()
) -> dict[str, str]:
    """``settings`` restricted to ``names``, sorted, with secrets masked."""
    known = [s for s in secrets if s]
    return {name: mask(name, settings[name], known) for name in sorted(names & settings.keys())}
