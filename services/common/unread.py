"""A setting named like cachemesh's that nothing reads: a misspelling, named at start-up.

``ROUTER_BUDGET_USD_PER_DAYS=0`` (for ``ROUTER_BUDGET_USD_PER_DAY``) started the router without
the budget and without a word. Every process gets the whole ``.env`` (``make up``, compose's
``env_file``), so each warns of every such name, with the setting closest to it: the known
names are the stack's table's (``services.tools.stack.service_table``, standard library only;
the rule and the words, shared with the stack's CLI: ``services.common.setting_names``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from services.common.setting_names import unread_warning
from services.tools.stack.service_table import unread_settings

log = logging.getLogger("cachemesh.settings")


def warn_unread_settings(environ: Mapping[str, str], service: str) -> list[str]:
    """One WARNING for each variable of ``environ`` named like a cachemesh setting that no
    service, tool or client reads; the names warned of."""
    unread = unread_settings(environ)
    for name, closest in unread:
        log.warning("%s: %s", service, unread_warning(name, closest))
    return [name for name, _ in unread]
