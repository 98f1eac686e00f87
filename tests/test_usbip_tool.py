"""Debian's real `usbip` tool against the client gateway (listing needs no kernel module)."""

from __future__ import annotations

import shutil

import pytest
import trio

from gateway.demo import start_stack
from gateway.usbip.importer import import_device

from .pkitools import PKI

pytestmark = pytest.mark.tools


def _usbip() -> str:
    path = shutil.which("usbip") or shutil.which("usbip", path="/usr/sbin:/sbin")
    if path is None:
        pytest.fail("Debian's usbip tool is missing: apt-get install usbip (.ci/run does)")
    return path


async def test_usbip_list_shows_the_simulated_devices(pki: PKI, nursery: trio.Nursery) -> None:
    stack = await start_stack(nursery, pki.server_tls(), pki.client_tls())
    # --tcp-port is a global option: it goes before the command.
    result = await trio.run_process(
        [_usbip(), "--tcp-port", str(stack.client_address.port), "list", "-r", "127.0.0.1"],
        capture_stdout=True,
        capture_stderr=True,
    )
    out = result.stdout.decode()
    assert '1-1: Netchip Technology, Inc. : Linux-USB "Gadget Zero" (0525:a4a0)' in out
    assert "1-2:" in out
    assert "Human Interface Device / Boot Interface Subclass / Keyboard (03/01/01)" in out
    # The request went through both gateways to the simulator, once.
    assert stack.sim.connections_accepted == 1


async def test_usbip_list_of_a_device_in_use_leaves_it_out(pki: PKI, nursery: trio.Nursery) -> None:
    stack = await start_stack(nursery, pki.server_tls(), pki.client_tls())
    address = stack.client_address
    device = await import_device(await trio.open_tcp_stream(address.host, address.port), "1-1")
    result = await trio.run_process(
        [_usbip(), "--tcp-port", str(address.port), "list", "-r", "127.0.0.1"],
        capture_stdout=True,
        capture_stderr=True,
    )
    out = result.stdout.decode()
    assert "1-1:" not in out
    assert "1-2:" in out
    await device.aclose()
