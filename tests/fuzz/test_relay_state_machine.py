"""Hypothesis drives the whole relay: client -> client gateway -> server gateway -> sim.

A RuleBasedStateMachine interleaves, on two imported devices at once, bulk OUT and IN
URBs of many sizes on the loopback device (1-2: what OUT writes, IN reads back, chunk by
chunk), pending INs unlinked, unlinks of URBs already completed, vendor control
write/read-back, and bursts of concurrent IN/OUT on the source/sink (1-1: zeros). A
model of the loopback FIFO predicts each IN's bytes exactly; every URB must end exactly
once (RET_SUBMIT, or RET_UNLINK -ECONNRESET when unlinked while pending), and the
gateways' session counts must agree with what the client saw.

The gateways run in a Trio loop on a helper thread (the state machine is synchronous);
every call into it is bounded. `USBIP_GW_RELAY_EXAMPLES` (default 25) sets how many
programs run.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import trio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from gateway.accounting.outcome import Outcome, OutcomeKind
from gateway.accounting.session import Session
from gateway.config import Address
from gateway.edges.client_gateway import ClientGateway
from gateway.edges.server_gateway import ServerGateway
from gateway.protocol import ECONNRESET, Direction, Setup
from gateway.sim.catalog import make_devices
from gateway.sim.gadget_zero import REQ_CTRL_READ, REQ_CTRL_WRITE
from gateway.sim.server import SimServer, serve_sim
from gateway.transport.names import local_address
from gateway.usbip.importer import Completion, ImportedDevice, import_device

from ..hostile.usbipd import Tracker
from ..pkitools import PKI, client_config, make_pki, server_config

T = TypeVar("T")
CLOSED_BY_CLIENT = Outcome(OutcomeKind.CLOSED, "closed by client")
EXAMPLES = int(os.environ.get("USBIP_GW_RELAY_EXAMPLES", "25"))
CALL_BOUND = 20.0  # seconds any one step may take
FIFO_CAPACITY = 1024 * 1024  # the simulated loopback device's (gadget_zero.Loopback)
BULK = 1
# URBs `import_device` sends before any rule runs (ImportedDevice.enumerate, what usbcore
# does): GET_DESCRIPTOR(configuration) for the header, then for the whole set, then
# SET_CONFIGURATION; all three end in a RET_SUBMIT. The gateways learn the endpoints
# from them, and count them in the session like any other URB.
ENUMERATION_URBS = 3
sizes = st.sampled_from([0, 1, 63, 64, 511, 512, 513, 4096, 65536]) | st.integers(0, 70000)


class Portal:
    """A Trio loop on a thread, running the stack; synchronous calls into it."""

    def __init__(self, pki: PKI) -> None:
        self._pki = pki
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._thread_main, daemon=True)
        self._thread.start()
        if not self._ready.wait(CALL_BOUND):
            raise TimeoutError("the gateway stack did not start")
        if self._error is not None:
            raise self._error

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self.sim = SimServer(make_devices())
            self.sim_sessions = Tracker()
            self.sim.handle_stream = self.sim_sessions.wrap(  # type: ignore[method-assign,assignment]
                self.sim.handle_stream
            )
            await nursery.start(partial(serve_sim, self.sim, host="127.0.0.1", port=0))
            self.server = ServerGateway(
                server_config(self._pki, Address(*self.sim.addresses[0])), strings=self.sim
            )
            listeners = await nursery.start(self.server.serve)
            self.client = ClientGateway(client_config(self._pki, local_address(listeners[0])))
            listeners = await nursery.start(self.client.serve)
            self.address = local_address(listeners[0])
            self.token = trio.lowlevel.current_trio_token()
            self._ready.set()

    def run(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        async def bounded() -> T:
            with trio.fail_after(CALL_BOUND):
                return await afn(*args)

        return trio.from_thread.run(bounded, trio_token=self.token)

    def close(self) -> None:
        trio.from_thread.run_sync(self.nursery.cancel_scope.cancel, trio_token=self.token)
        self._thread.join(CALL_BOUND)
        assert not self._thread.is_alive()

    async def quiet(self) -> None:
        await self.client.acceptor.wait_idle()
        await self.server.wait_idle()
        await self.sim_sessions.idle()


@dataclass
class Urb:
    seqnum: int
    length: int
    done: trio.Event = field(default_factory=trio.Event)
    result: Completion | None = None
    error: str = ""
    expected: bytes | None = None  # the model's prediction, once data is there for it


class RelayMachine(RuleBasedStateMachine):
    portal: Portal  # set by the test

    def __init__(self) -> None:
        super().__init__()
        p = self.portal
        self.lb: ImportedDevice = p.run(self._import, "1-2")
        self.ss: ImportedDevice = p.run(self._import, "1-1")
        self.lb_session = self._server_session("1-2")
        self.chunks: deque[bytes] = deque()  # the loopback FIFO, as the model sees it
        self.waiting: list[Urb] = []  # loopback INs with no data yet, in order
        self.arriving: list[Urb] = []  # INs the model has data for, not yet checked
        self.completed: list[int] = []
        self.urbs = ENUMERATION_URBS  # loopback URBs submitted
        self.rets = ENUMERATION_URBS  # loopback RET_SUBMITs received
        self.unlinked = 0  # loopback URBs ended by RET_UNLINK -ECONNRESET

    # -- plumbing (these run in the Trio thread)

    async def _import(self, busid: str) -> ImportedDevice:
        p = self.portal
        device = await import_device(
            await trio.open_tcp_stream(p.address.host, p.address.port), busid, enumerate=True
        )
        p.nursery.start_soon(device.serve)
        return device

    def _server_session(self, busid: str) -> Session:
        found = [s for s in self.portal.server.sessions.values() if s.busid == busid]
        assert len(found) == 1
        return found[0]

    async def _start_in(self, urb: Urb) -> None:
        async def wait() -> None:
            try:
                urb.result = await self.lb.submit(
                    BULK, Direction.IN, length=urb.length, seqnum=urb.seqnum
                )
            except ConnectionError as exc:
                urb.error = str(exc)
            finally:
                urb.done.set()

        self.portal.nursery.start_soon(wait)
        await self.lb.sent(urb.seqnum)

    async def _wait(self, urbs: list[Urb]) -> None:
        for urb in urbs:
            await urb.done.wait()

    # -- the model of the loopback FIFO (gateway/sim/fifo.py ChunkFifo.get)

    def _feed_waiting(self) -> None:
        while self.waiting and self.chunks:
            urb, chunk = self.waiting[0], self.chunks[0]
            if len(chunk) > urb.length:
                urb.expected, self.chunks[0] = chunk[: urb.length], chunk[urb.length :]
            else:
                urb.expected = self.chunks.popleft()
            self.arriving.append(self.waiting.pop(0))

    def _check_arrived(self) -> None:
        self.portal.run(self._wait, self.arriving)
        for urb in self.arriving:
            assert urb.result is not None, f"IN {urb.seqnum} ended without a result: {urb.error}"
            assert urb.result.status == 0
            assert urb.result.data == urb.expected, f"IN {urb.seqnum}: wrong bytes"
            self.rets += 1
            self.completed.append(urb.seqnum)
        self.arriving.clear()

    # -- rules

    @rule(length=sizes)
    def read(self, length: int) -> None:
        urb = Urb(self.lb.next_seqnum(), length)
        self.portal.run(self._start_in, urb)
        self.urbs += 1
        self.waiting.append(urb)
        self._feed_waiting()
        self._check_arrived()

    @rule(size=sizes, data=st.data())
    def write(self, size: int, data: st.DataObject) -> None:
        buffered = sum(map(len, self.chunks))
        if buffered and buffered + size > FIFO_CAPACITY:
            return  # the OUT would stay pending until read: not what this rule tests
        payload = (
            data.draw(st.binary(min_size=size, max_size=size)) if size < 64 else (os.urandom(size))
        )
        done = self.portal.run(partial(self.lb.submit, BULK, Direction.OUT, data=payload))
        assert done.status == 0
        assert done.ret is not None
        assert done.ret.actual_length == size
        self.urbs += 1
        self.rets += 1
        self.chunks.append(payload)
        self._feed_waiting()
        self._check_arrived()

    @precondition(lambda self: bool(self.waiting))
    @rule(data=st.data())
    def unlink_pending(self, data: st.DataObject) -> None:
        urb = self.waiting.pop(data.draw(st.integers(0, len(self.waiting) - 1)))
        self.portal.run(self.lb.unlink, urb.seqnum)
        self.portal.run(self._wait, [urb])
        assert urb.result is not None, urb.error
        assert urb.result.ret is None, "an unlinked pending URB got a RET_SUBMIT"
        assert urb.result.unlink_status == -ECONNRESET
        self.unlinked += 1

    @precondition(lambda self: bool(self.completed))
    @rule(data=st.data())
    def unlink_completed(self, data: st.DataObject) -> None:
        # Answered with RET_UNLINK 0, which the importer ignores; nothing may change.
        self.portal.run(self.lb.unlink, data.draw(st.sampled_from(self.completed)))

    @rule(payload=st.binary(max_size=4096))
    def control_write_read_back(self, payload: bytes) -> None:
        n = len(payload)
        write = Setup(0x40, REQ_CTRL_WRITE, 0, 0, n)
        read = Setup(0xC0, REQ_CTRL_READ, 0, 0, n)
        assert self.portal.run(self.lb.control, write, payload).status == 0
        back = self.portal.run(self.lb.control, read)
        assert back.status == 0
        assert back.data == payload
        self.urbs += 2
        self.rets += 2

    @rule(urbs=st.lists(st.tuples(st.booleans(), sizes), min_size=1, max_size=24))
    def source_sink_burst(self, urbs: list[tuple[bool, int]]) -> None:
        results: dict[int, Completion] = {}

        async def burst() -> None:
            async with trio.open_nursery() as nursery:
                for i, (is_in, size) in enumerate(urbs):

                    async def one(i: int = i, is_in: bool = is_in, size: int = size) -> None:
                        if is_in:
                            results[i] = await self.ss.submit(BULK, Direction.IN, length=size)
                        else:
                            results[i] = await self.ss.submit(BULK, Direction.OUT, data=bytes(size))

                    nursery.start_soon(one)

        self.portal.run(burst)
        for i, (is_in, size) in enumerate(urbs):
            done = results[i]
            assert done.status == 0
            assert done.ret is not None
            assert done.ret.actual_length == size
            assert done.data == (bytes(size) if is_in else b"")

    # -- invariants

    @invariant()
    def waiting_ins_are_still_pending(self) -> None:
        for urb in self.waiting:
            assert not urb.done.is_set(), f"IN {urb.seqnum} ended with no data for it"

    def teardown(self) -> None:
        p = self.portal
        p.run(self.lb.aclose)
        p.run(self.ss.aclose)
        p.run(self._wait, self.waiting)
        for urb in self.waiting:  # pending when the connection closed: no completion
            assert urb.result is None
            assert urb.error
        p.run(p.quiet)
        session = self.lb_session
        assert session.urbs_submitted == self.urbs
        assert session.urbs_completed == self.rets
        assert session.urbs_unlinked == self.unlinked
        assert session.urbs_in_flight == len(self.waiting)
        assert session.outcome == CLOSED_BY_CLIENT, session.outcome
        assert not p.sim.in_use("1-2")
        assert not p.sim.in_use("1-1")


def test_relay_state_machine(tmp_path: Path) -> None:
    portal = Portal(make_pki(tmp_path / "pki"))
    RelayMachine.portal = portal
    try:
        run_state_machine_as_test(  # type: ignore[no-untyped-call]
            RelayMachine,
            settings=settings(
                max_examples=EXAMPLES,
                stateful_step_count=30,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                print_blob=True,
            ),
        )
    finally:
        portal.close()
