"""DNS-SD announce and browse over mDNS, on the loopback interface only.

Linux delivers multicast sent on `lo` back to sockets joined there, so an announcer and
a browser both bound to 127.0.0.1 find each other without any packet leaving the host.
"""

from __future__ import annotations

import trio

from gateway.companions.discovery import (
    SERVICE_TYPE,
    Announcer,
    announced_addresses,
    browse,
    service_info,
)
from gateway.config import Address, DiscoverySettings

LOOPBACK = ("127.0.0.1",)
WAIT = 30.0  # bound on the whole exchange; mDNS probing alone takes about 1.5 s


async def test_announced_server_is_found_with_tls_and_no_devices() -> None:
    settings = DiscoverySettings(announce=True, name="lab-gw", interfaces=LOOPBACK)
    announcer = Announcer(settings, 43240, ["127.0.0.1"])
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(announcer.run)
            found = await browse(1.5, LOOPBACK)
            nursery.cancel_scope.cancel()
    ours = [f for f in found if f.name == "lab-gw"]
    assert len(ours) == 1, found
    assert ours[0].address == Address("127.0.0.1", 43240)
    assert ours[0].tls
    assert ours[0].host == "lab-gw.local."
    assert not announcer.registered
    txt = dict(announcer.info.properties)
    assert set(txt) == {b"tls", b"proto", b"version"}  # nothing about devices
    assert txt[b"tls"] == b"1"


async def test_withdrawn_server_is_not_found() -> None:
    settings = DiscoverySettings(announce=True, name="gone-gw", interfaces=LOOPBACK)
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(Announcer(settings, 43241, ["127.0.0.1"]).run)
            nursery.cancel_scope.cancel()
        found = await browse(1.0, LOOPBACK)
    assert [f for f in found if f.name == "gone-gw"] == []


def test_addresses_announced() -> None:
    wildcard = (Address("0.0.0.0", 3240),)
    assert announced_addresses(DiscoverySettings(interfaces=("10.1.2.3",)), wildcard) == [
        "10.1.2.3"
    ]
    assert announced_addresses(DiscoverySettings(), (Address("192.0.2.7", 3240),)) == ["192.0.2.7"]
    assert announced_addresses(DiscoverySettings(), wildcard)  # this host's own addresses
    info = service_info("gw", 3240, ["192.0.2.7"])
    assert info.type == SERVICE_TYPE == "_usbip-gw._tcp.local."
