"""Hooks for every test: reports that pytest-xdist's workers can send to the controller.

``make test`` runs the tests in worker processes (``-n``). A worker sends each test's report,
its captured output and log text included, to the controller as UTF-8; a test whose captured
log holds a lone surrogate (the OTLP encoder's tests log attribute keys that are not valid
UTF-8, as the exporter logs them) made the send raise, and the worker died with it. The text
is escaped (``\\udfff``) before it is sent; what the test itself saw is unchanged.
"""

from __future__ import annotations

from collections.abc import Generator

import pytest


def _sendable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    report.sections = [(title, _sendable(text)) for title, text in report.sections]
    return report
