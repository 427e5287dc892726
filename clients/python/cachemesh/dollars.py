"""US dollars as a person writes them, read to whole nano-dollars: the one rule of the router's
budget settings (``ROUTER_BUDGET_USD_PER_DAY``, ``ROUTER_BUDGET_USD_PER_MONTH``) and of
``cachemesh admin limits set --day-budget / --month-budget`` (the router imports it from here:
this package cannot import the services).

Plain decimal: an optional sign, ASCII digits and one optional point (``25``, ``+25``, ``0.50``,
``.5``, ``1000.``). ``Decimal`` alone also reads ``1e3`` ($1,000, where a person may have meant
nano-dollars or a typo), ``1_000``, other scripts' digits and spaces around the number, none of
which a budget is written as: each is refused. ``+25`` is 25, as ``Decimal`` read it.
"""

from __future__ import annotations

import re
from decimal import Decimal

NANOS_PER_DOLLAR = 1_000_000_000
# what a refusal says a budget is written as
PLAIN_DOLLARS = "plain decimal digits (e.g. 25, 0.50 or 1000; not 1e3 or 1_000)"
_PLAIN = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\Z")


def plain_dollars(text: str) -> Decimal | None:
    """``text`` as an amount of US dollars; None when it is not written in plain decimal."""
    return Decimal(text) if _PLAIN.match(text) else None


def whole_nanos(amount: Decimal) -> int | None:
    """``amount`` US dollars in nano-dollars; None when it is finer than a nano-dollar."""
    nanos = amount * NANOS_PER_DOLLAR
    return int(nanos) if nanos == nanos.to_integral_value() else None
