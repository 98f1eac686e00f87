"""The simulated USB/IP server, driven by the codec's client over memory streams."""

from __future__ import annotations

import argparse
import os
import struct
from dataclasses import dataclass

import pytest
import trio
import trio.testing

from gateway.protocol import (
    Connection,
    ConnectionClosed,
    Direction,
    Event,
    IsoPacket,
    OpReplyDevlist,
    OpReplyImport,
    OpRequestDevlist,
    OpRequestImport,
    OpStatus,
    RemoteProtocolError,
    RetSubmit,
    RetUnlink,
    Role,
    Setup,
    Speed,
    parse_configuration,
)
from gateway.protocol.events import CmdSubmit, CmdUnlink
from gateway.sim import (
    HidKeyboard,
    Loopback,
    SimServer,
    SourceSink,
    Urb,
    add_sim_parser,
    make_devices,
    serve_sim,
)
from gateway.sim.gadget_zero import Pattern
from gateway.transport.reads import next_event

EPIPE, ECONNRESET, EREMOTEIO = 32, 104, 121
URB_SHORT_NOT_OK = 0x0001


class Client:
    """A USB/IP importer built on the codec, speaking over one stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = Connection(Role.CLIENT)
        self.devid = 0
        self._seqnum = 100

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.conn.send(event))

    async def receive(self) -> Event:
        return await next_event(self.stream, self.conn)

    async def devlist(self) -> OpReplyDevlist:
        await self.send(OpRequestDevlist())
        reply = await self.receive()
        assert isinstance(reply, OpReplyDevlist)
        return reply

    async def import_(self, busid: str) -> OpReplyImport:
        await self.send(OpRequestImport(busid))
        reply = await self.receive()
        assert isinstance(reply, OpReplyImport)
        if reply.device is not None:
            self.devid = reply.device.devid
        return reply

    def next_seqnum(self) -> int:
        self._seqnum += 3  # vhci's seqnums are not contiguous per connection
        return self._seqnum

    async def submit(
        self,
        ep: int,
        direction: Direction,
        length: int = 0,
        data: bytes = b"",
        *,
        setup: bytes = bytes(8),
        flags: int = 0,
        iso: tuple[IsoPacket, ...] = (),
    ) -> int:
        seqnum = self.next_seqnum()
        await self.send(
            CmdSubmit(
                seqnum=seqnum,
                devid=self.devid,
                direction=direction,
                ep=ep,
                transfer_buffer_length=len(data) if direction == Direction.OUT else length,
                transfer_flags=flags,
                number_of_packets=len(iso),
                setup=setup,
                data=data,
                iso_packets=iso,
            )
        )
        return seqnum

    async def reply(self, seqnum: int) -> RetSubmit:
        event = await self.receive()
        assert isinstance(event, RetSubmit), event
        assert event.seqnum == seqnum
        return event

    async def transfer(
        self, ep: int, direction: Direction, length: int = 0, data: bytes = b"", **kw: object
    ) -> RetSubmit:
        seqnum = await self.submit(ep, direction, length, data, **kw)  # type: ignore[arg-type]
        return await self.reply(seqnum)

    async def control(
        self,
        request_type: int,
        request: int,
        value: int = 0,
        index: int = 0,
        length: int = 0,
        *,
        data: bytes = b"",
        flags: int = 0,
    ) -> RetSubmit:
        setup = Setup(request_type, request, value, index, length or len(data)).encode()
        direction = Direction.IN if request_type & 0x80 else Direction.OUT
        return await self.transfer(0, direction, length, data, setup=setup, flags=flags)

    async def get_descriptor(self, kind: int, index: int, length: int, lang: int = 0) -> RetSubmit:
        return await self.control(0x80, 0x06, kind << 8 | index, lang, length)

    async def enumerate(self) -> None:
        """What usbcore does first (GET_DESCRIPTOR(configuration), SET_CONFIGURATION):
        the codec frames URBs to other endpoints only once it has seen the layout."""
        header = await self.get_descriptor(2, 0, 9)
        assert header.status == 0
        whole = await self.get_descriptor(2, 0, int.from_bytes(header.data[2:4], "little"))
        assert whole.status == 0
        assert (await self.control(0x00, 0x09, whole.data[5])).status == 0

    async def unlink(self, target: int) -> RetUnlink:
        seqnum = self.next_seqnum()
        await self.send(CmdUnlink(seqnum, target, self.devid))
        event = await self.receive()
        assert isinstance(event, RetUnlink), event
        assert event.seqnum == seqnum
        return event


@dataclass
class Sim:
    """A SimServer and a way to open connections to it."""

    server: SimServer
    nursery: trio.Nursery

    def connect(self) -> Client:
        client_end, server_end = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.server.handle_stream, server_end)
        return Client(client_end)

    async def imported(self, busid: str, *, enumerate: bool = True) -> Client:
        client = self.connect()
        reply = await client.import_(busid)
        assert reply.status == OpStatus.OK
        if enumerate:
            await client.enumerate()
        return client


@pytest.fixture
def server() -> SimServer:
    return SimServer(make_devices(pattern=Pattern.MOD63))


@pytest.fixture
def sim(server: SimServer, nursery: trio.Nursery) -> Sim:
    return Sim(server, nursery)


# ------------------------------------------------------------------ op phase


async def test_devlist_lists_every_device_with_interfaces(sim: Sim) -> None:
    client = sim.connect()
    reply = await client.devlist()
    by_busid = {d.info.busid: d for d in reply.devices}
    assert sorted(by_busid) == ["1-1", "1-2", "1-3"]
    ss = by_busid["1-1"].info
    assert (ss.id_vendor, ss.id_product) == (0x0525, 0xA4A0)
    assert ss.path == "/sys/devices/platform/usbip-gateway-sim/usb1/1-1"
    assert (ss.busnum, ss.devnum, ss.speed) == (1, 2, Speed.HIGH)
    assert ss.configuration_value == 1
    assert ss.num_interfaces == 1
    kb = by_busid["1-3"]
    assert (kb.info.id_vendor, kb.info.id_product, kb.info.speed) == (0x1209, 0x0001, Speed.FULL)
    assert [
        (i.interface_class, i.interface_subclass, i.interface_protocol) for i in kb.interfaces
    ] == [(3, 1, 1)]
    assert isinstance(await client.receive(), ConnectionClosed)  # the server hangs up


async def test_import_unknown_busy_and_release(sim: Sim, server: SimServer) -> None:
    unknown = sim.connect()
    assert (await unknown.import_("9-9")).status == OpStatus.NODEV

    first = await sim.imported("1-2")
    assert first.conn.state.imported is not None
    assert first.conn.state.imported.busid == "1-2"
    assert server.in_use("1-2")

    busy = sim.connect()
    assert (await busy.import_("1-2")).status == OpStatus.DEV_BUSY
    listing = await sim.connect().devlist()
    assert sorted(d.info.busid for d in listing.devices) == ["1-1", "1-3"]

    await first.stream.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert not server.in_use("1-2")
    again = sim.connect()
    assert (await again.import_("1-2")).status == OpStatus.OK
    assert server.imports == 2
    assert server.connections_accepted == 5


async def test_garbage_closes_only_that_connection(sim: Sim, server: SimServer) -> None:
    bad = sim.connect()
    await bad.stream.send_all(b"\x01\x10\x80\x05" + bytes(4))  # version 0x0110
    assert await bad.stream.receive_some(100) == b""
    assert server.protocol_errors == 1

    urb_phase = await sim.imported("1-1")
    await urb_phase.stream.send_all(b"\x00\x00\x00\x09" + bytes(44))  # no such command
    assert await urb_phase.stream.receive_some(100) == b""
    await trio.testing.wait_all_tasks_blocked()
    assert server.protocol_errors == 2
    assert not server.in_use("1-1")
    assert len((await sim.connect().devlist()).devices) == 3


# ------------------------------------------------------------------ enumeration


async def test_enumeration_like_linux(sim: Sim) -> None:
    client = await sim.imported("1-1", enumerate=False)
    head = await client.get_descriptor(1, 0, 8)
    assert head.status == 0
    assert head.data[:2] == b"\x12\x01"
    assert len(head.data) == 8
    assert head.data[7] == 64  # bMaxPacketSize0

    device = (await client.get_descriptor(1, 0, 18)).data
    assert len(device) == 18
    bcd_usb, cls, _, _, _, vid, pid, _, i_man, i_prod, i_ser, n_conf = struct.unpack(
        "<HBBBBHHHBBBB", device[2:]
    )
    assert (bcd_usb, cls, vid, pid, n_conf) == (0x0200, 0xFF, 0x0525, 0xA4A0, 1)

    config_head = (await client.get_descriptor(2, 0, 9)).data
    assert len(config_head) == 9
    total = int.from_bytes(config_head[2:4], "little")
    config = (await client.get_descriptor(2, 0, total)).data
    assert len(config) == total
    parsed = parse_configuration(config)
    assert parsed is not None
    assert parsed.value == 1
    alts = parsed.alts
    assert [(a.interface, a.alternate) for a in alts] == [(0, 0), (0, 1)]
    assert {e.address for e in alts[0].endpoints} == {0x81, 0x01}
    assert all(e.max_packet_size == 512 for e in alts[0].endpoints)

    langs = (await client.get_descriptor(3, 0, 255)).data
    assert langs == b"\x04\x03\x09\x04"
    strings = []
    for index in (i_man, i_prod, i_ser):
        raw = (await client.get_descriptor(3, index, 255, lang=0x0409)).data
        assert raw[0] == len(raw)
        assert raw[1] == 3
        strings.append(raw[2:].decode("utf-16-le"))
    assert strings == ["usbip-gateway", "Gadget Zero source/sink (simulated)", "SIM-SS-0001"]
    assert (await client.get_descriptor(3, 9, 255, lang=0x0409)).status == -EPIPE

    assert (await client.control(0x00, 0x09, 1)).status == 0  # SET_CONFIGURATION
    get_config = await client.control(0x80, 0x08, length=1)
    assert get_config.data == b"\x01"
    status = await client.control(0x80, 0x00, length=2)  # GET_STATUS device
    assert status.data == b"\x01\x00"  # self-powered
    assert (await client.control(0x81, 0x00, 0, 0, 2)).data == b"\x00\x00"
    assert (await client.control(0x81, 0x00, 0, 5, 2)).status == -EPIPE  # no interface 5


async def test_speed_dependent_descriptors(sim: Sim) -> None:
    hs = await sim.imported("1-1")
    qualifier = (await hs.get_descriptor(6, 0, 10)).data
    assert len(qualifier) == 10
    assert qualifier[:2] == b"\x0a\x06"
    assert qualifier[8] == 1  # bNumConfigurations
    other = (await hs.get_descriptor(7, 0, 255)).data
    assert other[1] == 7
    parsed = parse_configuration(bytes((other[0], 2)) + other[2:])
    assert parsed is not None
    assert {e.max_packet_size for e in parsed.alts[0].endpoints} == {64}
    assert (await hs.get_descriptor(0x0F, 0, 5)).status == -EPIPE  # BOS
    assert (await hs.get_descriptor(4, 0, 9)).status == -EPIPE  # interface on its own
    assert (await hs.get_descriptor(5, 0, 7)).status == -EPIPE  # endpoint on its own
    assert (await hs.get_descriptor(2, 1, 9)).status == -EPIPE  # no second configuration

    fs = await sim.imported("1-3")
    assert (await fs.get_descriptor(6, 0, 10)).status == -EPIPE
    assert (await fs.get_descriptor(7, 0, 255)).status == -EPIPE


async def test_unknown_requests_stall(sim: Sim) -> None:
    client = await sim.imported("1-1")
    assert (await client.control(0x00, 0x09, 7)).status == -EPIPE  # no configuration 7
    assert (await client.control(0x01, 0x0B, 5, 0)).status == -EPIPE  # no alternate 5
    assert (await client.control(0xC0, 0x42, length=4)).status == -EPIPE
    assert (await client.control(0xA1, 0x01, length=4)).status == -EPIPE
    assert (await client.control(0x80, 0x0C, length=2)).status == -EPIPE  # SYNCH_FRAME


async def test_short_not_ok_control_read(sim: Sim) -> None:
    client = await sim.imported("1-1")
    # usbtest's control queue: a short read with URB_SHORT_NOT_OK must fail -EREMOTEIO.
    short = await client.control(0x80, 0x06, 0x0200, 0, 1024, flags=URB_SHORT_NOT_OK)
    assert short.status == -EREMOTEIO
    assert 0 < short.actual_length < 1024
    plain = await client.control(0x80, 0x06, 0x0100, 0, 64)
    assert (plain.status, plain.actual_length) == (0, 18)


async def test_interface_alternates(sim: Sim) -> None:
    client = await sim.imported("1-1")
    assert (await client.control(0x81, 0x0A, 0, 0, 1)).data == b"\x00"
    assert (await client.control(0x01, 0x0B, 1, 0)).status == 0
    assert (await client.control(0x81, 0x0A, 0, 0, 1)).data == b"\x01"
    assert (await client.control(0x81, 0x0A, 0, 3, 1)).status == -EPIPE
    # SET_CONFIGURATION returns every interface to alternate 0.
    assert (await client.control(0x00, 0x09, 1)).status == 0
    assert (await client.control(0x81, 0x0A, 0, 0, 1)).data == b"\x00"


# ------------------------------------------------------------------ source / sink


def absent_endpoint(client: Client, ep: int, direction: Direction, packets: int = 0) -> bool:
    """Whether the client's codec would refuse a URB to `ep` as absent from the device."""
    reason, _ = client.conn.state.submit_header_error(ep, direction, packets, 0, 512)
    return reason is not None and "does not exist" in reason


def mod63(length: int, packet: int = 512) -> bytes:
    return bytes((i % packet) % 63 for i in range(length))


async def test_source_sends_the_pattern(sim: Sim) -> None:
    client = await sim.imported("1-1")
    for length in (1, 512, 1000, 65536):
        ret = await client.transfer(1, Direction.IN, length)
        assert ret.status == 0
        assert ret.data == mod63(length)


async def test_source_zeros_pattern(nursery: trio.Nursery) -> None:
    client = await Sim(SimServer([SourceSink(pattern=Pattern.ZEROS)]), nursery).imported("1-1")
    assert (await client.transfer(1, Direction.IN, 4096)).data == bytes(4096)
    assert (await client.transfer(1, Direction.OUT, data=bytes(4096))).actual_length == 4096


async def test_sink_checks_the_pattern(sim: Sim) -> None:
    client = await sim.imported("1-1")
    good = await client.transfer(1, Direction.OUT, data=mod63(3000))
    assert (good.status, good.actual_length) == (0, 3000)
    bad = await client.transfer(1, Direction.OUT, data=b"\x07" * 100)
    assert bad.status == -EPIPE
    # Like f_sourcesink, a bad pattern halts the OUT endpoint until the halt is cleared.
    assert (await client.control(0x82, 0x00, 0, 0x01, 2)).data == b"\x01\x00"
    assert (await client.transfer(1, Direction.OUT, data=mod63(512))).status == -EPIPE
    assert (await client.control(0x02, 0x01, 0, 0x01)).status == 0
    assert (await client.transfer(1, Direction.OUT, data=mod63(512))).status == 0


async def test_halt_and_clear_halt(sim: Sim, server: SimServer) -> None:
    client = await sim.imported("1-1")
    assert (await client.control(0x82, 0x00, 0, 0x81, 2)).data == b"\x00\x00"
    assert (await client.control(0x02, 0x03, 0, 0x81)).status == 0  # SET_FEATURE(HALT)
    assert (await client.control(0x82, 0x00, 0, 0x81, 2)).data == b"\x01\x00"
    for _ in range(2):  # usbtest checks it stays halted
        assert (await client.transfer(1, Direction.IN, 512)).status == -EPIPE
    assert (await client.transfer(1, Direction.OUT, data=mod63(512))).status == 0  # other ep
    assert (await client.control(0x02, 0x01, 0, 0x81)).status == 0  # CLEAR_FEATURE(HALT)
    assert (await client.control(0x82, 0x00, 0, 0x81, 2)).data == b"\x00\x00"
    assert (await client.transfer(1, Direction.IN, 512)).data == mod63(512)
    # ep0: status works, clearing is harmless; unknown endpoints stall.
    assert (await client.control(0x82, 0x00, 0, 0x00, 2)).data == b"\x00\x00"
    assert (await client.control(0x02, 0x01, 0, 0x00)).status == 0
    assert (await client.control(0x82, 0x00, 0, 0x85, 2)).status == -EPIPE
    # A URB to an endpoint the device lacks never crosses the wire (the codec frames by
    # the device's endpoints, as usbip-host does); the device itself stalls it.
    assert absent_endpoint(client, 5, Direction.IN)
    stalled = await server.devices["1-1"].submit(Urb(1, 5, Direction.IN, 512))
    assert stalled.status == -EPIPE


async def test_vendor_control_write_then_read(sim: Sim) -> None:
    client = await sim.imported("1-1")
    for length in (1, 64, 513, 4096):
        payload = bytes((7 + j) & 0xFF for j in range(length))
        write = await client.control(0x40, 0x5B, data=payload)
        assert (write.status, write.actual_length) == (0, length)
        read = await client.control(0xC0, 0x5C, length=length)
        assert read.data == payload
    assert (await client.control(0x40, 0x5B, 1, 0, data=b"x")).status == -EPIPE  # wValue
    assert (await client.control(0xC0, 0x5C, length=4097)).status == -EPIPE  # too long


async def test_isochronous_alternate(sim: Sim, server: SimServer) -> None:
    client = await sim.imported("1-1")
    # Isochronous endpoints exist only in alternate 1: in alternate 0 the codec refuses
    # a URB for them (as usbip-host would find no endpoint), and the device stalls one.
    iso = (IsoPacket(0, 1024), IsoPacket(1024, 1024), IsoPacket(2048, 500))
    assert absent_endpoint(client, 2, Direction.IN, len(iso))
    early = Urb(1, 2, Direction.IN, 2548, number_of_packets=len(iso), iso_packets=iso)
    assert (await server.devices["1-1"].submit(early)).status == -EPIPE
    assert (await client.control(0x01, 0x0B, 1, 0)).status == 0
    assert client.conn.state.submit_header_error(2, Direction.IN, len(iso), 0, 3072) == (None, True)

    ret = await client.transfer(2, Direction.IN, 3072, iso=iso)
    assert ret.status == 0
    assert ret.actual_length == 2548
    assert [p.actual_length for p in ret.iso_packets] == [1024, 1024, 500]
    assert [p.offset for p in ret.iso_packets] == [0, 1024, 2048]
    expected = mod63(1024, 1024) * 2 + mod63(500, 1024)
    assert ret.data == expected  # packed, no gaps

    out = await client.transfer(2, Direction.OUT, data=bytes(2548), iso=iso)
    assert (out.status, out.actual_length, out.number_of_packets) == (0, 2548, 3)
    assert [p.actual_length for p in out.iso_packets] == [1024, 1024, 500]
    assert out.data == b""
    # Bulk endpoints remain in alternate 1.
    assert (await client.transfer(1, Direction.IN, 64)).data == mod63(64)


async def test_queued_reads_complete_in_order(sim: Sim) -> None:
    client = await sim.imported("1-1")
    seqnums = [await client.submit(1, Direction.IN, 65536) for _ in range(8)]
    for seqnum in seqnums:
        ret = await client.reply(seqnum)
        assert ret.actual_length == 65536


# ------------------------------------------------------------------ loopback and unlink


async def test_loopback_round_trips(sim: Sim) -> None:
    client = await sim.imported("1-2")
    first, second = os.urandom(1000), os.urandom(5000)
    assert (await client.transfer(1, Direction.OUT, data=first)).actual_length == 1000
    assert (await client.transfer(1, Direction.OUT, data=second)).actual_length == 5000
    assert (await client.transfer(1, Direction.IN, 4096)).data == first
    assert (await client.transfer(1, Direction.IN, 4096)).data == second[:4096]
    assert (await client.transfer(1, Direction.IN, 4096)).data == second[4096:]


async def test_loopback_in_waits_for_data(sim: Sim) -> None:
    client = await sim.imported("1-2")
    waiting = await client.submit(1, Direction.IN, 512)
    await trio.testing.wait_all_tasks_blocked()
    # The pending IN holds up neither ep0 nor the OUT endpoint.
    assert (await client.control(0x80, 0x08, length=1)).data == b"\x01"
    write = await client.submit(1, Direction.OUT, data=b"hello")
    replies = {}
    for _ in range(2):
        event = await client.receive()
        assert isinstance(event, RetSubmit)
        replies[event.seqnum] = event
    assert replies[write].status == 0
    assert replies[waiting].data == b"hello"


async def test_unlink_pending_in(sim: Sim) -> None:
    client = await sim.imported("1-2")
    pending = await client.submit(1, Direction.IN, 512)
    await trio.testing.wait_all_tasks_blocked()
    unlinked = await client.unlink(pending)
    assert unlinked.status == -ECONNRESET
    # No RET_SUBMIT follows for it: the codec would reject one, and the data written
    # next goes to the next IN, not to the unlinked one.
    assert (await client.transfer(1, Direction.OUT, data=b"after")).status == 0
    assert (await client.transfer(1, Direction.IN, 512)).data == b"after"


async def test_unlink_queued_behind_pending(sim: Sim) -> None:
    client = await sim.imported("1-2")
    first = await client.submit(1, Direction.IN, 512)
    second = await client.submit(1, Direction.IN, 512)
    await trio.testing.wait_all_tasks_blocked()
    assert (await client.unlink(second)).status == -ECONNRESET
    await client.transfer(1, Direction.OUT, data=b"one")
    assert (await client.reply(first)).data == b"one"


async def test_unlink_completed_urb(sim: Sim) -> None:
    client = await sim.imported("1-1")
    done = await client.submit(1, Direction.IN, 64)
    assert (await client.reply(done)).status == 0
    assert (await client.unlink(done)).status == 0


async def test_unlink_that_arrives_before_its_submit_cancels_the_urb(sim: Sim) -> None:
    """vhci can send CMD_UNLINK before the CMD_SUBMIT it targets (its tx thread sends
    the unlink list after the submit list). Answering "not found" would make vhci give
    the URB back and then drop the connection at its RET_SUBMIT: the sim waits for the
    submit and cancels it instead."""
    client = await sim.imported("1-1")
    before = await client.submit(1, Direction.IN, 64)
    assert (await client.reply(before)).status == 0
    target, unlink = client.next_seqnum(), client.next_seqnum()
    await client.send(CmdUnlink(unlink, target, client.devid))
    await client.send(CmdSubmit(target, client.devid, Direction.IN, 1, 64))
    answer = await client.receive()
    assert answer == RetUnlink(unlink, -ECONNRESET)
    # No RET_SUBMIT for it: the next reply is the next URB's (the codec would refuse one).
    after = await client.submit(1, Direction.IN, 64)
    assert (await client.reply(after)).data == mod63(64)


async def test_early_unlink_whose_submit_never_comes_is_answered_not_found(sim: Sim) -> None:
    client = await sim.imported("1-1")
    target, unlink = client.next_seqnum(), client.next_seqnum()
    await client.send(CmdUnlink(unlink, target, client.devid))
    newer = await client.submit(1, Direction.IN, 64)  # submits come in seqnum order
    assert await client.receive() == RetUnlink(unlink, 0)
    assert (await client.reply(newer)).status == 0


async def test_unlink_pending_out_when_full(nursery: trio.Nursery) -> None:
    client = await Sim(SimServer([Loopback(capacity=1024)]), nursery).imported("1-2")
    assert (await client.transfer(1, Direction.OUT, data=bytes(1024))).status == 0
    blocked = await client.submit(1, Direction.OUT, data=b"\x01" * 10)
    await trio.testing.wait_all_tasks_blocked()
    assert (await client.unlink(blocked)).status == -ECONNRESET
    assert (await client.transfer(1, Direction.IN, 4096)).data == bytes(1024)
    await client.transfer(1, Direction.OUT, data=b"\x02")
    assert (await client.transfer(1, Direction.IN, 4096)).data == b"\x02"


async def test_close_with_pending_urb_frees_device(sim: Sim, server: SimServer) -> None:
    client = await sim.imported("1-2")
    await client.transfer(1, Direction.OUT, data=b"stale")
    await client.submit(1, Direction.IN, 512)
    await client.submit(1, Direction.IN, 512)
    await trio.testing.wait_all_tasks_blocked()
    await client.stream.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert not server.in_use("1-2")
    assert server.connections_active == 0
    fresh = await sim.imported("1-2")
    loopback = server.devices["1-2"]
    assert isinstance(loopback, Loopback)
    assert len(loopback.fifo) == 0  # nothing left over from the last user
    assert (await fresh.control(0x80, 0x08, length=1)).data == b"\x01"


# ------------------------------------------------------------------ HID


async def test_keyboard_descriptors_and_class_requests(sim: Sim) -> None:
    client = await sim.imported("1-3")
    config = (await client.get_descriptor(2, 0, 255)).data
    parsed = parse_configuration(config)
    assert parsed is not None
    (alt,) = parsed.alts
    assert (alt.interface_class, alt.interface_subclass, alt.interface_protocol) == (3, 1, 1)
    (ep,) = alt.endpoints
    assert (ep.address, ep.attributes, ep.max_packet_size) == (0x81, 3, 8)
    hid = config[18:27]
    assert hid[:2] == b"\x09\x21"
    report_length = int.from_bytes(hid[7:9], "little")
    report = await client.control(0x81, 0x06, 0x2200, 0, report_length)
    assert len(report.data) == report_length == 63
    assert report.data.startswith(b"\x05\x01\x09\x06\xa1\x01")
    assert report.data.endswith(b"\xc0")
    assert (await client.control(0x21, 0x0A, 0)).status == 0  # SET_IDLE
    assert (await client.control(0x21, 0x0B, 0)).status == 0  # SET_PROTOCOL boot
    assert (await client.control(0xA1, 0x03, 0, 0, 1)).data == b"\x00"
    assert (await client.control(0x21, 0x09, 0x0200, 0, data=b"\x02")).status == 0  # LEDs
    assert (await client.control(0xA1, 0x01, 0x0100, 0, 8)).data == bytes(8)


async def test_keyboard_interrupt_in_waits_for_events(sim: Sim, server: SimServer) -> None:
    client = await sim.imported("1-3")
    keyboard = server.devices["1-3"]
    assert isinstance(keyboard, HidKeyboard)
    pending = await client.submit(1, Direction.IN, 8)
    await trio.testing.wait_all_tasks_blocked()
    # Still in flight: the control reply overtakes it.
    assert (await client.control(0x80, 0x08, length=1)).data == b"\x01"
    keyboard.press(0x04, modifiers=0x02)  # shift + a
    assert (await client.reply(pending)).data == b"\x02\x00\x04\x00\x00\x00\x00\x00"
    assert (await client.transfer(1, Direction.IN, 8)).data == bytes(8)


def test_facts() -> None:
    facts = HidKeyboard().facts()
    assert facts.as_dict() == {
        "busid": "1-3",
        "vid": "1209",
        "pid": "0001",
        "serial": "SIM-KB-0001",
        "manufacturer": "usbip-gateway",
        "product": "Boot keyboard (simulated)",
        "class": 0,
        "interface_classes": [3],
    }
    assert SourceSink().facts().interface_classes == (0xFF,)


# ------------------------------------------------------------------ TCP and CLI


async def test_serve_sim_over_tcp(nursery: trio.Nursery) -> None:
    server = await nursery.start(lambda task_status: serve_sim(port=0, task_status=task_status))
    assert isinstance(server, SimServer)
    ((host, port),) = server.addresses
    assert server.connections_accepted == 0
    stream = await trio.open_tcp_stream(host, port)
    client = Client(stream)
    reply = await client.devlist()
    assert len(reply.devices) == 3
    assert isinstance(await client.receive(), ConnectionClosed)
    assert server.connections_accepted == 1
    assert server.bytes_received == 8
    await stream.aclose()
    nursery.cancel_scope.cancel()


def test_cli_parser() -> None:
    parser = argparse.ArgumentParser()
    add_sim_parser(parser.add_subparsers())
    args = parser.parse_args(["sim"])
    assert args.listen == ("127.0.0.1", 3240)
    assert args.devices == ["all"]
    assert callable(args.func)
    args = parser.parse_args(["sim", "--listen", "[::1]:4000", "--devices", "loopback"])
    assert args.listen == ("::1", 4000)
    assert args.devices == ["loopback"]
    with pytest.raises(SystemExit):
        parser.parse_args(["sim", "--devices", "printer"])


def test_codec_rejects_a_ret_submit_after_unlink() -> None:
    # Guards the unlink test above: it relies on the client codec refusing a late reply.
    client = Connection(Role.CLIENT)
    loopback = Loopback()
    client.send(OpRequestImport("1-2"))
    client.receive_data(OpReplyImport(0, loopback.info()).encode())
    client.next_event()
    devid = loopback.info().devid
    # Enumerate first: the codec frames URBs to endpoint 1 once it knows the layout.
    config = loopback.configuration_descriptor(0)
    assert config is not None
    get_config = Setup(0x80, 0x06, 0x0200, 0, len(config)).encode()
    client.send(CmdSubmit(1, devid, Direction.IN, 0, len(config), setup=get_config))
    client.receive_data(RetSubmit(1, 0, len(config), data=config).encode())
    assert isinstance(client.next_event(), RetSubmit)
    set_config = Setup(0x00, 0x09, config[5], 0, 0).encode()
    client.send(CmdSubmit(2, devid, Direction.OUT, 0, 0, setup=set_config))
    client.receive_data(RetSubmit(2, 0, 0).encode())
    assert isinstance(client.next_event(), RetSubmit)
    client.send(CmdSubmit(5, devid, Direction.IN, 1, 8))
    client.send(CmdUnlink(6, 5, devid))
    client.receive_data(RetUnlink(6, -ECONNRESET).encode())
    assert isinstance(client.next_event(), RetUnlink)
    client.receive_data(RetSubmit(5, 0, 1, data=b"x").encode())
    with pytest.raises(RemoteProtocolError):
        client.next_event()


async def test_port_reset_keeps_configuration_and_clears_halts(sim: Sim) -> None:
    client = await sim.imported("1-1")
    assert (await client.control(0x01, 0x0B, 1, 0)).status == 0
    assert (await client.control(0x02, 0x03, 0, 0x81)).status == 0
    # USB_RT_PORT SET_FEATURE(PORT_RESET), which usbip-host turns into a device reset
    assert (await client.control(0x23, 0x03, 4, 1)).status == 0
    assert (await client.control(0x82, 0x00, 0, 0x81, 2)).data == b"\x00\x00"
    assert (await client.control(0x81, 0x0A, 0, 0, 1)).data == b"\x00"
    assert (await client.control(0x80, 0x08, length=1)).data == b"\x01"
