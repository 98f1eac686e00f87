"""Relaying one USB/IP connection between two streams while parsing every frame.

Both directions share one `Splice`: what a side sends is cut into frames and what passed
is forwarded, so no header reaches the far side before it was parsed and checked. A bulk
or interrupt URB's data follows its header as it arrives (cut-through); a control
transfer or an ISO frame, which the gateway reads, goes on once whole. Backpressure: a
side is not read while the other end has not taken what it sent before.

`pump` runs both directions of a session in one OS thread, in a `poll` loop over
non-blocking ends (`gateway.transport.socket_ends`: TCP, MPTCP, TLS on the standard
library's SSLSocket, zstd above TLS). Each URB crosses a gateway twice, and a thread
wakeup costs far less than Trio's run loop per read, write and TLS record; one thread
rather than one per direction, because two threads of a busy session hand the GIL to
each other around every system call (futex calls and context switches: 8.5 per URB at
64 KiB, depth 8). Trio keeps the session: its idle timeout, and cancelling it, which
stops the thread.
"""

from __future__ import annotations

import logging
import math
import os
import select
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass

import trio

from gateway.accounting.outcome import Outcome, OutcomeKind, protocol_error
from gateway.accounting.session import Session
from gateway.logs import kv
from gateway.protocol import (
    ConnectionClosed,
    Frame,
    NeedData,
    Phase,
    ProtocolError,
    Role,
    Splice,
)
from gateway.relay.budget import BufferBudget, Holding, OverBudget
from gateway.transport.socket_ends import READ, AnySocketEnd, LinkBroken, socket_end

log = logging.getLogger("gateway.relay.pumps")

RECEIVE_SIZE = 256 * 1024
CLOSE_TIMEOUT = 2.0


Observe = Callable[[Role, Frame, float], None]


@dataclass(frozen=True, slots=True)
class IdleTimeouts:
    """Seconds without a byte either way after which a session is closed; None: never."""

    op: float | None = None  # before a successful import (and after a DEVLIST)
    attached: float | None = None  # the URB phase: a device may be idle legitimately


class Activity:
    """When the last byte arrived from either side (the pumps' clock)."""

    __slots__ = ("at",)

    def __init__(self, at: float) -> None:
        self.at = at


def _over_budget(sender: Role, exc: OverBudget) -> Outcome:
    return Outcome(OutcomeKind.RESOURCE_LIMIT, f"over memory budget: the {sender.value} sent {exc}")


def cut_frames(
    splice: Splice, sender: Role, data: bytes, observe: Observe, now: float
) -> tuple[bytes | memoryview, bool, ProtocolError | None, int]:
    """Feed one read from `sender` to `splice` and account the frames (and pieces) in it.

    Returns the bytes to forward (those frames, for one write: fewer syscalls and TLS
    records), whether `sender` closed, the error that stopped parsing, if any (the
    frames before it still go through, as they would had they come earlier), and how
    many bytes of `sender` the splice holds back (a partial header, a control transfer).
    """
    out: list[bytes | memoryview] = []
    closed = False
    error: ProtocolError | None = None
    next_frame = splice.next_frame
    held = splice.buffered(sender)
    try:
        splice.receive_data(sender, data)
        while True:
            frame = next_frame(sender)
            if isinstance(frame, NeedData):
                break
            if isinstance(frame.event, ConnectionClosed):
                closed = True
                break
            observe(sender, frame, now)
            if held:  # otherwise the front of `data` is forwarded, below
                out.append(frame.raw)
    except ProtocolError as exc:
        error = exc
    left = splice.buffered(sender)
    if not held:
        # The frames are the front of `data`, in order: pass that on as it is.
        passed = len(data) - left
        return (data if passed == len(data) else memoryview(data)[:passed]), closed, error, left
    return (out[0] if len(out) == 1 else b"".join(out)), closed, error, left


# Threads are bounded by the sessions the acceptor lets in, not by Trio's default 40.
_THREADS = trio.CapacityLimiter(math.inf)
_EMPTY = memoryview(b"")
_BROKEN = select.POLLERR | select.POLLHUP | select.POLLNVAL


class Stop:
    """Asks a session's relay thread to return at once: an eventfd in its poll set,
    readable for good once set."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.requested = False

    def set(self) -> None:
        self.requested = True
        if self.fd != -1:
            os.eventfd_write(self.fd, 1)

    def close(self) -> None:
        if self.fd != -1:
            os.close(self.fd)
            self.fd = -1


def pump(
    splice: Splice,
    ends: dict[Role, AnySocketEnd],
    session: Session,
    *,
    stop: Stop,
    clock: Callable[[], float] = time.perf_counter,
    holdings: dict[Role, Holding | None] | None = None,
    activity: Activity | None = None,
) -> Outcome | None:
    """Relay both directions of one session in this thread until either side ends;
    returns how it ended (None: stopped first).

    Reads and writes are non-blocking; the thread waits in one `poll` for whichever end
    can go on. Backpressure: a side is not read while what it sent before is still
    waiting for the other side to take it, so a session holds at most one read per
    direction (and the frames the splice holds back, counted in `holdings` against the
    gateway's budget: OverBudget past it). Once the session ends, what is waiting still
    goes out, for up to `CLOSE_TIMEOUT` seconds.
    """
    # Per side, indexed 0 (client) and 1 (server), the other side being 1 - i: lists,
    # not dicts keyed by Role, whose Enum hash is Python code run several times a pass.
    roles = (Role.CLIENT, Role.SERVER)
    end_of = [ends[role] for role in roles]
    fds = [end.fileno() for end in end_of]
    holding_of = [(holdings or {}).get(role) for role in roles]
    # The events each side's next read or write waits for; 0: try it now. A session's
    # first bytes come after its handshake or import: wait before the first read.
    read_wait = [READ, READ]
    write_wait = [0, 0]
    pending = [_EMPTY, _EMPTY]  # bytes for that side, not yet written
    interest = [0, 0]  # what the poller has for each side's socket
    observe = session.observe
    poller = select.poll()
    poller.register(stop.fd, READ)
    outcome: Outcome | None = None
    deadline = math.inf

    def end(how: Outcome) -> None:
        nonlocal outcome, deadline
        if outcome is None:
            outcome, deadline = how, clock() + CLOSE_TIMEOUT

    def lost(side: int, exc: LinkBroken) -> None:
        pending[side] = _EMPTY  # nothing more goes to a broken connection
        end(Outcome(OutcomeKind.CONNECTION_LOST, f"connection lost: {exc}"))

    def flush(side: int) -> None:
        try:
            sent, write_wait[side] = end_of[side].write(pending[side])
        except LinkBroken as exc:
            lost(side, exc)
            return
        pending[side] = pending[side][sent:]

    def receive(side: int) -> None:
        """Read what `side` sent and queue the frames that passed for the other."""
        sender = roles[side]
        try:
            data, read_wait[side] = end_of[side].read()
            if data is None:
                return
            now = clock()
            if activity is not None:
                activity.at = now
            out, closed, error, held = cut_frames(splice, sender, data, observe, now)
            holding = holding_of[side]
            if holding is not None and held != holding.held:  # whole frames: nothing to do
                holding.update(held)
        except OverBudget as exc:
            end(_over_budget(sender, exc))
            return
        except LinkBroken as exc:
            lost(side, exc)
            return
        if out:
            pending[1 - side] = memoryview(out)
            flush(1 - side)  # at once: most writes go out whole
        if error is not None:
            end(protocol_error(sender, error))
        elif closed:
            end(Outcome(OutcomeKind.CLOSED, f"closed by {sender.value}"))

    while not stop.requested:  # looked at on every pass: a busy session never polls
        for side in (0, 1):
            if pending[side] and not write_wait[side]:
                flush(side)
            if outcome is None and not read_wait[side] and not pending[1 - side]:
                receive(side)
        reading = outcome is None
        if not reading and not pending[0] and not pending[1]:
            return outcome
        if (pending[0] and not write_wait[0]) or (pending[1] and not write_wait[1]):
            continue  # a write can go on without waiting
        if reading and (
            (not read_wait[0] and not pending[1]) or (not read_wait[1] and not pending[0])
        ):
            continue  # so can a read
        for side in (0, 1):
            events = write_wait[side] if pending[side] else 0
            if reading and not pending[1 - side]:
                events |= read_wait[side]
            if events != interest[side]:
                if events:
                    poller.register(fds[side], events)
                else:
                    poller.unregister(fds[side])
                interest[side] = events
        timeout = None if reading else max(0, math.ceil((deadline - clock()) * 1000))
        if timeout == 0:
            return outcome  # what is still waiting could not go out in time
        for fd, revents in poller.poll(timeout):
            if fd == fds[0]:
                side = 0
            elif fd == fds[1]:
                side = 1
            else:  # the stop
                return outcome
            if revents & _BROKEN:  # whatever waits learns how from its next call
                read_wait[side] = write_wait[side] = 0
                continue
            if revents & read_wait[side]:
                read_wait[side] = 0
            if revents & write_wait[side]:
                write_wait[side] = 0
    return outcome


async def _relay_in_thread(
    splice: Splice,
    ends: dict[Role, AnySocketEnd],
    session: Session,
    *,
    holdings: dict[Role, Holding | None],
    activity: Activity,
    clock: Callable[[], float],
) -> Outcome | None:
    """The session's relay thread; cancelling this stops it (None then)."""
    stop = Stop()
    outcome: Outcome | None = None

    async def watch() -> None:
        try:
            await trio.sleep_forever()
        finally:  # cancelled: the gateway is stopping, access was revoked, or idle
            stop.set()

    def run() -> Outcome | None:
        return pump(
            splice, ends, session, stop=stop, clock=clock, holdings=holdings, activity=activity
        )

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            outcome = await trio.to_thread.run_sync(run, limiter=_THREADS)
            nursery.cancel_scope.cancel()
    finally:
        for end in ends.values():
            end.finish()
        stop.close()
    return outcome


async def relay(
    splice: Splice,
    client: trio.abc.Stream,
    server: trio.abc.Stream,
    session: Session,
    *,
    budget: BufferBudget | None = None,
    idle: IdleTimeouts | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Outcome:
    """Run both pumps until either side ends (or the session is idle past `idle`);
    close both; return the outcome. Partial frames count against `budget`.

    `clock` times frames and idleness, from the threads: real seconds, as Trio's
    clock counts them (tests pass a `trio.testing.MockClock`'s `current_time`).
    """
    outcome = Outcome(OutcomeKind.CANCELLED, "cancelled (gateway stopping)")
    holdings = {r: budget.holding() if budget is not None else None for r in Role}
    activity = Activity(clock())
    try:
        ends = {Role.CLIENT: socket_end(client)}
        try:
            ends[Role.SERVER] = socket_end(server)
        except BaseException:
            ends[Role.CLIENT].finish()
            raise
        async with trio.open_nursery() as nursery:
            if idle is not None and (idle.op is not None or idle.attached is not None):

                async def watch_idle() -> None:
                    nonlocal outcome
                    outcome = await _idle_watch(splice, activity, idle, clock)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch_idle)
            ended = await _relay_in_thread(
                splice, ends, session, holdings=holdings, activity=activity, clock=clock
            )
            outcome = ended or outcome
            nursery.cancel_scope.cancel()
    finally:
        for holding in holdings.values():
            if holding is not None:
                holding.release()
        session.outcome = outcome
        await close_all(client, server)
    return outcome


async def _idle_watch(
    splice: Splice, activity: Activity, idle: IdleTimeouts, clock: Callable[[], float]
) -> Outcome:
    """Returns once no byte came from either side for the phase's idle timeout."""
    while True:
        attached = splice.phase is Phase.URB
        timeout = idle.attached if attached else idle.op
        if timeout is None:
            if attached or idle.attached is None:
                await trio.sleep_forever()
            # Op phase without its own timeout: look again once it may have changed.
            await trio.sleep(idle.attached or 0.0)
            continue
        remaining = activity.at + timeout - clock()
        if remaining <= 0:
            phase = "attached" if attached else "in the op phase"
            return Outcome(OutcomeKind.TIMEOUT, f"idle: no traffic for {timeout:g}s {phase}")
        await trio.sleep(remaining)


async def close_all(*streams: trio.abc.AsyncResource) -> None:
    """Close gracefully (TLS close_notify) within a bound, then forcefully."""
    with trio.move_on_after(CLOSE_TIMEOUT) as scope:
        scope.shield = True
        for stream in streams:
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.aclose()
    if scope.cancelled_caught:
        for stream in streams:
            await trio.aclose_forcefully(stream)


async def receive_frame(
    splice: Splice, sender: Role, stream: trio.abc.ReceiveStream
) -> Frame | ConnectionClosed:
    """Read from `stream` until `sender`'s next whole frame (op phase: one at a time)."""
    while True:
        frame = splice.next_frame(sender)
        if not isinstance(frame, NeedData):
            return frame.event if isinstance(frame.event, ConnectionClosed) else frame
        splice.receive_data(sender, await stream.receive_some(RECEIVE_SIZE))


def log_session_end(logger: logging.Logger, session: Session) -> None:
    """One line per session: who, which device, how it ended, how much went through."""
    summary = session.summary()
    level = logging.INFO if session.ended_normally else logging.WARNING
    logger.log(level, "session end %s", kv(summary), extra={"fields": summary})
