"""Numbers read from outside (a client's header, a provider's error body) in digits Python's
``str.isdigit`` accepts but ``int`` refuses ("²"): read as not a number, never an exception."""

from __future__ import annotations

from services.model.providers.failures import _status_in
from services.router.servicer import RETRY_HEADERS, _marks_retry


def test_a_retry_count_in_superscript_digits_marks_no_retry() -> None:
    attempts, _ = RETRY_HEADERS
    assert _marks_retry(attempts, "²") is False
    assert _marks_retry(attempts, "2") is True


def test_a_provider_error_code_in_superscript_digits_names_no_status() -> None:
    assert _status_in({"error": {"type": "BadRequestError", "code": "⁴⁰⁰"}}) == 0
    assert _status_in({"error": {"type": "BadRequestError", "code": "400"}}) == 400
