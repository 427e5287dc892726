"""What ``CACHEMESH_PRIOR_PREFILL_TPS`` (``with_prior_prefill``) and
``CACHEMESH_CONTEXT_WINDOWS`` (``with_context_windows``) accept: both read ``model=figure,...``,
but not alike. The prior's model id keeps the spaces before its "=" (a row "local-small " is
not in the table), its rate is any finite float > 0 (``float``: "1e3", "+150", "1_000",
"0.5"), and its row is validated again (a simulated row's prior is its own prefill rate:
refused); a window's id and figure are stripped, its figure is whole digits, and its row is
not validated again. One parser for both would change what one of them accepts, so they stay
two; this pins each one's inputs."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from services.common.env import ConfigError
from services.common.model_overrides import with_context_windows, with_prior_prefill
from services.common.models import ModelTable, load_model_table

TABLE = load_model_table()
INPUTS = (
    "local-small=150",
    " local-small=150 ",
    "local-small=150,local-large=200",
    "local-small=007",
    "local-small= 150",
    "local-small = 150",
    "local-small=150.5",
    "local-small=0.5",
    "local-small=1e3",
    "local-small=+150",
    "local-small=1_000",
    "local-small=0",
    "local-small=-5",
    "local-small=inf",
    "local-small=nan",
    "local-small=",
    "local-small",
    "=150",
    "local-small=150,",
    "nope=150",
    "sim-small=150",
    "local-small=\u00b2",  # a digit to str.isdigit, not to int(): a ValueError escaped
)
BOTH = {
    "local-small=150",
    " local-small=150 ",
    "local-small=150,local-large=200",
    "local-small=007",
}
PRIOR_ONLY = {
    "local-small=150.5",
    "local-small=0.5",
    "local-small=1e3",
    "local-small=+150",
    "local-small=1_000",
}
WINDOWS_ONLY = {"local-small = 150", "sim-small=150"}
BOTH_SPACED = {"local-small= 150"}


def _accepted(parse: Callable[[ModelTable, str], ModelTable]) -> set[str]:
    accepted = set()
    for value in INPUTS:
        try:
            parse(TABLE, value)
        except ConfigError:
            continue
        accepted.add(value)
    return accepted


@pytest.mark.parametrize(
    ("parse", "accepts"),
    [
        (with_prior_prefill, BOTH | BOTH_SPACED | PRIOR_ONLY),
        (with_context_windows, BOTH | BOTH_SPACED | WINDOWS_ONLY),
    ],
)
def test_each_reads_its_own_inputs(
    parse: Callable[[ModelTable, str], ModelTable], accepts: set[str]
) -> None:
    assert _accepted(parse) == accepts


def test_the_figures_they_set() -> None:
    prior = with_prior_prefill(TABLE, "local-small=1e3,local-large= 0.5").models
    assert prior["local-small"].prior_prefill_tokens_per_s == 1000.0
    assert prior["local-large"].prior_prefill_tokens_per_s == 0.5
    windows = with_context_windows(TABLE, "local-small = 007,local-large=4096").models
    assert windows["local-small"].context_window_tokens == 7
    assert windows["local-large"].context_window_tokens == 4096
