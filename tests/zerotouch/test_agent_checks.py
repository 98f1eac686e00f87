"""The agent's own checks: vhci-hcd must be loaded before it attaches anything, and its
retries are spread (jitter), so clients that lost a server together do not return together."""

from __future__ import annotations

import logging
import random
import socket
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from gateway.companions.agent import Agent
from gateway.config import Address, AgentSettings
from gateway.edges.client_gateway import ClientGateway
from gateway.sim.catalog import make_devices

from ..pkitools import PKI, client_config


def _free_port() -> int:
    """A port nothing listens on (the server gateway that is not there)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _agent(pki: PKI, settings: AgentSettings, **kw: object) -> Agent:
    gateway = ClientGateway(client_config(pki, Address("127.0.0.1", _free_port()), agent=settings))
    return Agent(settings, gateway, Address("127.0.0.1", 3240), **kw)  # type: ignore[arg-type]


async def test_the_backoff_is_jittered_within_half_and_all_of_each_step(
    pki: PKI, tmp_path: Path
) -> None:
    settings = AgentSettings(
        enabled=True, interval=0.2, backoff_max=1.0, vhci=tmp_path, state_dir=tmp_path
    )
    ceilings = [0.2, 0.4, 0.8, 1.0, 1.0, 1.0]

    async def waits(seed: int) -> list[float]:
        agent = _agent(pki, settings, jitter=random.Random(seed).random)
        with trio.fail_after(30):
            return [await agent.round() for _ in ceilings]  # the server is not there

    first, second = await waits(7), await waits(8)
    same_draws = random.Random(7)
    assert first == pytest.approx([c / 2 + c / 2 * same_draws.random() for c in ceilings])
    for wait, ceiling in zip(first + second, ceilings + ceilings, strict=True):
        assert ceiling / 2 <= wait <= ceiling
    assert first != second  # two clients, two schedules


async def test_nothing_is_attached_until_vhci_hcd_is_loaded(
    pki: PKI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "gateway.companions.agent")
    platform = tmp_path / "platform"
    platform.mkdir()
    calls: list[list[str]] = []

    async def runner(argv: Sequence[str]) -> tuple[int, str]:
        calls.append(list(argv))
        return 0, ""

    settings = AgentSettings(enabled=True, vhci=platform, state_dir=tmp_path)
    agent = _agent(pki, settings, runner=runner)
    devices = tuple(d.exported() for d in make_devices(["loopback"]))
    await agent.reconcile(devices)
    await agent.reconcile(devices)
    assert calls == []
    missing = [r for r in caplog.records if "vhci-hcd is not loaded" in r.getMessage()]
    assert len(missing) == 1  # said once, not every round
    assert "modprobe vhci-hcd" in missing[0].getMessage()
    assert agent.status()["vhci_loaded"] is False

    (platform / "vhci_hcd.0").mkdir()  # what `modprobe vhci-hcd` makes appear
    await agent.reconcile(devices)
    assert [c[3:] for c in calls] == [["attach", "-r", "127.0.0.1", "-b", "1-2"]]
    assert any(r.getMessage() == "agent: vhci-hcd loaded" for r in caplog.records)
    assert agent.status()["vhci_loaded"] is True
