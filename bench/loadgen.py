"""A USB/IP load generator: the client side (what vhci-hcd does), as lean as it can be.

One imported device per connection. `stream` keeps `depth` CMD_SUBMITs in flight to the
source/sink's bulk endpoints (OUT 0x01, IN 0x81, or alternating), refilling in one write
per read, and checks every completion: status 0, the whole length, and for IN the mod-63
pattern byte for byte (the simulated sink checks OUT data itself and fails the URB if a
byte differs). `unlinks` sends CMD_UNLINKs right behind submits and checks that every
URB ends exactly once. No per-URB task or event: one task per connection.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import trio

from gateway.protocol import (
    ECONNRESET,
    CmdSubmit,
    CmdUnlink,
    Connection,
    ConnectionClosed,
    Direction,
    NeedData,
    OpReplyImport,
    OpRequestImport,
    OpStatus,
    RetSubmit,
    RetUnlink,
    Role,
    Setup,
)
from gateway.protocol.descriptors import GET_DESCRIPTOR, SET_CONFIGURATION
from gateway.sim.gadget_zero import Pattern, PatternBuffer
from gateway.transport.reads import next_event

RECEIVE_SIZE = 1024 * 1024  # per read: this client takes replies in big batches
BULK_EP = 1
PACKET = 512  # high-speed bulk: the pattern restarts every packet
DIRECTIONS = ("in", "out", "mixed")


class BenchError(Exception):
    """A URB failed or came back wrong."""


@dataclass
class Result:
    urbs: int = 0
    payload: int = 0  # bytes of URB data moved (OUT written + IN read)
    seconds: float = 0.0
    errors: int = 0
    verified: int = 0  # completions whose data/length were checked
    rtts_ns: list[int] = field(default_factory=list)

    def add(self, other: Result) -> None:
        self.urbs += other.urbs
        self.payload += other.payload
        self.errors += other.errors
        self.verified += other.verified
        self.rtts_ns += other.rtts_ns


class Device:
    """One connection with one imported device, in the URB phase."""

    def __init__(self, stream: trio.SocketStream, conn: Connection, devid: int) -> None:
        self.stream = stream
        self.conn = conn
        self.devid = devid
        self._seqnums = itertools.count(1)
        self.pattern = PatternBuffer(Pattern.MOD63, PACKET)

    @classmethod
    async def open(cls, port: int, busid: str, *, busy_timeout: float = 10.0) -> Device:
        """Connect and IMPORT `busid`, retrying while the simulator still holds it."""
        deadline = trio.current_time() + busy_timeout
        while True:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            conn = Connection(Role.CLIENT)
            try:
                await stream.send_all(conn.send(OpRequestImport(busid)))
                reply = await next_event(stream, conn, RECEIVE_SIZE)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            if isinstance(reply, OpReplyImport) and reply.device is not None:
                device = cls(stream, conn, reply.device.devid)
                await device._enumerate()
                return device
            await trio.aclose_forcefully(stream)
            busy = isinstance(reply, OpReplyImport) and reply.status == OpStatus.DEV_BUSY
            if not busy or trio.current_time() > deadline:
                raise BenchError(f"import of {busid} failed: {reply!r}")
            await trio.sleep(0.05)

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def _enumerate(self) -> None:
        """GET_DESCRIPTOR(configuration) and SET_CONFIGURATION, as usbcore does first:
        the gateways frame URBs by the endpoints they learn from it."""

        async def control(setup: Setup) -> RetSubmit:
            seqnum = next(self._seqnums)
            cmd = CmdSubmit(
                seqnum=seqnum,
                devid=self.devid,
                direction=Direction.IN if setup.is_in else Direction.OUT,
                ep=0,
                transfer_buffer_length=setup.length,
                setup=setup.encode(),
            )
            await self.stream.send_all(self.conn.send(cmd))
            reply = await next_event(self.stream, self.conn, RECEIVE_SIZE)
            if not isinstance(reply, RetSubmit) or reply.status != 0:
                raise BenchError(f"enumeration failed: {reply!r}")
            return reply

        header = await control(Setup(0x80, GET_DESCRIPTOR, 0x0200, 0, 9))
        whole = await control(
            Setup(0x80, GET_DESCRIPTOR, 0x0200, 0, int.from_bytes(header.data[2:4], "little"))
        )
        await control(Setup(0x00, SET_CONFIGURATION, whole.data[5], 0, 0))

    def _submit(self, direction: Direction, size: int) -> tuple[int, bytes]:
        seqnum = next(self._seqnums)
        data = self.pattern.take(size) if direction is Direction.OUT else b""
        cmd = CmdSubmit(
            seqnum=seqnum,
            devid=self.devid,
            direction=direction,
            ep=BULK_EP,
            transfer_buffer_length=size,
            data=data,
        )
        return seqnum, self.conn.send(cmd)

    def _check(self, ret: RetSubmit, direction: Direction, size: int) -> bool:
        if ret.status != 0 or ret.actual_length != size:
            return False
        return direction is Direction.OUT or ret.data == self.pattern.take(size)

    async def _events(self) -> list[object]:
        data = await self.stream.receive_some(RECEIVE_SIZE)
        if not data:
            raise BenchError("the path closed the connection")
        self.conn.receive_data(data)
        events: list[object] = []
        while True:
            event = self.conn.next_event()
            if isinstance(event, NeedData):
                return events
            if isinstance(event, ConnectionClosed):
                raise BenchError("the path closed the connection")
            events.append(event)

    async def stream_urbs(
        self,
        *,
        size: int,
        depth: int,
        direction: str = "mixed",
        seconds: float | None = None,
        count: int | None = None,
        record_rtt: bool = False,
        interval: float | None = None,
    ) -> Result:
        """Keep `depth` URBs in flight for `seconds` or `count` URBs, then drain.

        With `interval`, one URB at a time, each started `interval` seconds after the
        previous one started (a paced, latency-only load).
        """
        directions = {
            "in": itertools.repeat(Direction.IN),
            "out": itertools.repeat(Direction.OUT),
            "mixed": itertools.cycle((Direction.OUT, Direction.IN)),
        }[direction]
        result = Result()
        flight: dict[int, tuple[int, Direction]] = {}
        clock = time.perf_counter_ns
        started = time.perf_counter()
        deadline = started + seconds if seconds is not None else None
        remaining = count if count is not None else -1

        def more(n: int) -> bytes:
            nonlocal remaining
            chunks = []
            for _ in range(n):
                if remaining == 0 or (deadline is not None and time.perf_counter() > deadline):
                    break
                remaining -= 1
                d = next(directions)
                seqnum, raw = self._submit(d, size)
                flight[seqnum] = (clock(), d)
                chunks.append(raw)
            return b"".join(chunks)

        next_start = time.perf_counter()
        first = more(1 if interval else depth)
        if first:
            await self.stream.send_all(first)
        while flight:
            done = 0
            for event in await self._events():
                if not isinstance(event, RetSubmit):
                    raise BenchError(f"unexpected {event!r}")
                sent, d = flight.pop(event.seqnum)
                if record_rtt:
                    result.rtts_ns.append(clock() - sent)
                result.urbs += 1
                if self._check(event, d, size):
                    result.verified += 1
                    result.payload += size
                else:
                    result.errors += 1
                done += 1
            if interval and done:
                next_start += interval
                delay = next_start - time.perf_counter()
                if delay > 0:
                    await trio.sleep(delay)
            data = more(done)
            if data:
                await self.stream.send_all(data)
        result.seconds = time.perf_counter() - started
        return result

    async def unlinks(self, count: int) -> Result:
        """`count` bulk IN URBs, each followed at once by a CMD_UNLINK for it. Each URB must
        end exactly once: RET_SUBMIT then RET_UNLINK status 0 (it completed first), or
        RET_UNLINK -ECONNRESET and no RET_SUBMIT."""
        result = Result()
        for _ in range(count):
            seqnum, raw = self._submit(Direction.IN, PACKET)
            unlink = next(self._seqnums)
            raw += self.conn.send(CmdUnlink(unlink, seqnum, self.devid))
            await self.stream.send_all(raw)
            completed = False
            while True:
                events = await self._events()
                for event in events:
                    if isinstance(event, RetSubmit) and event.seqnum == seqnum and not completed:
                        completed = True
                        ok = self._check(event, Direction.IN, PACKET)
                        result.verified += ok
                        result.errors += not ok
                    elif isinstance(event, RetUnlink) and event.seqnum == unlink:
                        expected = 0 if completed else -ECONNRESET
                        result.errors += event.status != expected
                        result.verified += event.status == expected
                        result.urbs += 1
                        break
                    else:
                        result.errors += 1
                else:
                    continue
                break
        return result
