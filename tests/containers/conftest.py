"""Fixtures for the container tests: podman with the tests' own containers.conf, and the
two images built once per test run (from a Debian base made offline and cached)."""

from __future__ import annotations

import time

import pytest

from tests.pkitools import PKI, make_pki

from .podman import Podman, build_images, make_podman

# (what, seconds) shown at the end of the run: how long images and pods took.
_TIMINGS: list[tuple[str, float]] = []


def timed(what: str, started: float) -> None:
    _TIMINGS.append((what, time.monotonic() - started))


@pytest.fixture(scope="session")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    return make_podman(tmp_path_factory.mktemp("podman"))


@pytest.fixture(scope="session")
def images(podman: Podman) -> tuple[str, str]:
    """(gateway image, usbipd image), built from deploy/container/ on the offline base."""
    started = time.monotonic()
    built = build_images(podman)
    timed("base image and both image builds", started)
    return built


@pytest.fixture(scope="session")
def gateway_image(images: tuple[str, str]) -> str:
    return images[0]


@pytest.fixture(scope="session")
def container_pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """Test certificates the containers' UID 10001 can read (bind-mounted from here)."""
    pki = make_pki(tmp_path_factory.mktemp("container-pki"))
    directory = pki.ca_pem.parent
    directory.chmod(0o755)
    for path in directory.iterdir():
        path.chmod(0o644)  # throwaway test keys; real deployments use 0640 and a group
    return pki


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _TIMINGS:
        return
    terminalreporter.section("container test timings (seconds)")
    for what, seconds in _TIMINGS:
        terminalreporter.write_line(f"{what:50s} {seconds:7.1f}")
