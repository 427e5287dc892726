"""Which variables are named like cachemesh's settings, and the warning naming one that nothing
reads. Standard library only: the stack's CLI (``services.tools.stack``) and every service
(``services.common.unread``) say it with the same words.

Kubernetes gives every container of a namespace variables for each of its Services (the
"service links": ROUTER_SERVICE_HOST, MODEL_PORT_50061_TCP_ADDR, ...); a Service named
like one of ours makes them look like our settings: 35 false warnings, with wrong hints, for
five Services named router, model, prefix-cache, semantic-cache and http-front. A name of that
form holding a value of that form (an address, a port number, ``tcp://host:port``) is not
taken as a misspelling: ROUTER_METRICS_PORT=9100 still is.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Mapping

# The prefixes of cachemesh's own variables: one named so that nothing reads is a misspelling
# (ROUTER_BUDGET_USD_PER_DAYS=0 started a stack without the budget it meant).
OWN_PREFIXES: tuple[str, ...] = (
    "CACHEMESH_",
    "ROUTER_",
    "SEMANTIC_CACHE_",
    "PREFIX_CACHE_",
    "MODEL_",
    "HTTP_FRONT_",
    "PROVIDER_",
    "SIM_",
)

_PORT_NUMBER = re.compile(r"\d{1,5}")
_PORT_URL = re.compile(r"(tcp|udp|sctp)://\S+", re.IGNORECASE)
_PROTOCOL = re.compile(r"tcp|udp|sctp", re.IGNORECASE)
_ANY = re.compile(r"\S+")
# a service link's name (after the Service's own) and the value Kubernetes gives it
_SERVICE_LINKS: tuple[tuple[re.Pattern[str], re.Pattern[str]], ...] = (
    (re.compile(r".+_SERVICE_HOST"), _ANY),
    (re.compile(r".+_SERVICE_PORT(_[A-Z0-9_]+)?"), _PORT_NUMBER),  # a named port's too
    (re.compile(r".+_PORT"), _PORT_URL),
    (re.compile(r".+_PORT_\d{1,5}_(TCP|UDP|SCTP)"), _PORT_URL),
    (re.compile(r".+_PORT_\d{1,5}_(TCP|UDP|SCTP)_PROTO"), _PROTOCOL),
    (re.compile(r".+_PORT_\d{1,5}_(TCP|UDP|SCTP)_PORT"), _PORT_NUMBER),
    (re.compile(r".+_PORT_\d{1,5}_(TCP|UDP|SCTP)_ADDR"), _ANY),
)


def kubernetes_service_link(name: str, value: str) -> bool:
    """Whether ``name=value`` is one of the variables Kubernetes gives for a Service."""
    return any(
        named.fullmatch(name) is not None and shape.fullmatch(value.strip()) is not None
        for named, shape in _SERVICE_LINKS
    )


def unread_names(
    settings: Mapping[str, str], known: Collection[str]
) -> list[tuple[str, str | None]]:
    """Each name of ``settings`` with one of cachemesh's prefixes that is not in ``known`` (nor
    a Kubernetes service link), sorted, with the known name closest to it (None when none is
    close)."""
    unread = sorted(
        name
        for name, value in settings.items()
        if name.startswith(OWN_PREFIXES)
        and name not in known
        and not kubernetes_service_link(name, value)
    )
    return [(name, next(iter(difflib.get_close_matches(name, known, 1)), None)) for name in unread]


def unread_warning(name: str, closest: str | None, where: str = "") -> str:
    """The warning naming ``name``, a variable nothing reads (``where`` it was set, if said),
    and ``closest``, the setting likely meant: the stack's CLI prints it, each service logs
    it."""
    hint = f"; did you mean {closest}?" if closest is not None else ""
    set_in = f" ({where})" if where else ""
    return f"{name}{set_in} is not a setting of any cachemesh service or tool: ignored{hint}"
