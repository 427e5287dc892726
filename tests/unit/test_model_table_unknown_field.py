"""A model table's field this build does not read is refused at start, saying what it may be.

A rolling upgrade or a rollback meets it: 63a40a5's loader refused this version's packaged
table with only "models.local-small.takes_prefill: Extra inputs are not permitted", which
reads as a broken file, not as a field of a newer version (README "Upgrading")."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.env import ConfigError
from services.common.models import load_model_table

PACKAGED = Path(__file__).resolve().parents[2] / "services" / "common" / "models.toml"
LOCAL_SMALL = "[models.local-small]\n"


def test_a_field_of_a_newer_table_is_refused_naming_it_and_what_it_may_be(
    tmp_path: Path,
) -> None:
    text = PACKAGED.read_text()
    assert text.count(LOCAL_SMALL) == 1
    path = tmp_path / "models.toml"
    path.write_text(text.replace(LOCAL_SMALL, f"{LOCAL_SMALL}speaks_in_verse = true\n"))
    with pytest.raises(ConfigError) as caught:
        load_model_table(path)
    message = str(caught.value)
    assert "models.local-small.speaks_in_verse: Extra inputs are not permitted" in message
    assert "not a field this version reads: a newer version's, or a misspelling" in message
    assert "\n" not in message  # the one line a service prints as it stops


def test_the_packaged_table_loads() -> None:
    assert load_model_table(PACKAGED).get("local-small") is not None
