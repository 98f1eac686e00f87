"""Fixtures for the real-kernel (QEMU guest) tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .image import GuestImage, PrerequisiteError, build_guest, build_testusb

# (test id, measurement name, seconds or value) collected by the `timings` fixture.
_TIMINGS: list[tuple[str, str, str]] = []


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    try:
        return build_guest()
    except PrerequisiteError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def testusb_binary() -> Path:
    try:
        return build_testusb()
    except PrerequisiteError as exc:
        pytest.fail(str(exc), pytrace=False)


class Timings:
    def __init__(self, test_id: str) -> None:
        self.test_id = test_id

    def __call__(self, name: str, value: float | str | None) -> None:
        shown = f"{value:.1f}" if isinstance(value, float) else str(value)
        _TIMINGS.append((self.test_id, name, shown))


@pytest.fixture
def timings(request: pytest.FixtureRequest) -> Timings:
    return Timings(request.node.name)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _TIMINGS:
        return
    terminalreporter.section("real-kernel measurements (seconds unless noted)")
    for test_id, name, value in _TIMINGS:
        terminalreporter.write_line(f"{test_id:45s} {name:32s} {value}")
    out = os.environ.get("USBIP_GW_RK_REPORT")
    if out:
        Path(out).write_text(json.dumps(_TIMINGS, indent=1))
