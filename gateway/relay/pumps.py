"""Relaying one USB/IP connection between two streams while parsing every frame.

Two pumps share one `Splice`: each reads what its side sends, cuts it into frames and
forwards what passed, so no header reaches the far side before it was parsed and
checked. A bulk or interrupt URB's data follows its header as it arrives (cut-through);
a control transfer or an ISO frame, which the gateway reads, goes on once whole.
Backpressure is the send: a pump reads no more while the other end is not taking what
it has.

The pumps run in two OS threads per session (`gateway.transport.blocking`: TCP, MPTCP,
TLS on the standard library's SSLSocket, zstd above TLS), since each URB crosses a
gateway twice and a thread wakeup costs far less than Trio's run loop per read, write
and TLS record. Trio keeps the session: its idle timeout, and cancelling it, which
wakes the threads.
"""

from __future__ import annotations

import logging
import math
import threading
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
from gateway.transport.blocking import AnySocketEnd, LinkBroken, Wakeup, socket_end

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


# Frames are parsed and accounted to their session under its Splice's lock (both pumps of
# a session share it); the metric series that sessions of one device share lock
# themselves (accounting.series), so no lock spans sessions here.
# Threads are bounded by the sessions the acceptor lets in, not by Trio's default 40.
_THREADS = trio.CapacityLimiter(math.inf)


def forward(
    splice: Splice,
    sender: Role,
    source: AnySocketEnd,
    sink: AnySocketEnd,
    session: Session,
    *,
    lock: threading.Lock,
    clock: Callable[[], float] = time.perf_counter,
    holding: Holding | None = None,
    activity: Activity | None = None,
) -> Outcome:
    """Pump one direction in a thread until `sender` closes; returns how it ended.
    `lock` guards `splice` against the other direction's thread; `holding` counts the
    partial frames held against the gateway's budget (OverBudget past it)."""
    observe = session.observe
    while True:
        data = source.recv()
        now = clock()
        if activity is not None:
            activity.at = now
        with lock:
            out, closed, error, held = cut_frames(splice, sender, data, observe, now)
        if holding is not None and held != holding.held:  # nothing held back: nothing to do
            holding.update(held)
        if out:
            sink.send(out)
        if error is not None:
            raise error
        if closed:
            return Outcome(OutcomeKind.CLOSED, f"closed by {sender.value}")


async def _relay_in_threads(
    splice: Splice,
    ends: dict[Role, AnySocketEnd],
    session: Session,
    *,
    holdings: dict[Role, Holding | None],
    activity: Activity,
    clock: Callable[[], float],
) -> Outcome | None:
    """Both pumps in threads; the first to end decides the outcome (None if cancelled)."""
    outcomes: list[Outcome] = []
    guard = threading.Lock()
    splice_lock = threading.Lock()

    def pump(sender: Role) -> None:
        source, sink = ends[sender], ends[sender.peer]
        try:
            outcome = forward(
                splice,
                sender,
                source,
                sink,
                session,
                lock=splice_lock,
                clock=clock,
                holding=holdings[sender],
                activity=activity,
            )
        except ProtocolError as exc:
            outcome = protocol_error(sender, exc)
        except OverBudget as exc:
            outcome = _over_budget(sender, exc)
        except LinkBroken as exc:
            outcome = Outcome(OutcomeKind.CONNECTION_LOST, f"connection lost: {exc}")
        with guard:
            if outcomes:
                return  # woken by the other pump's ending
            outcomes.append(outcome)
        for end in ends.values():
            end.stop_reading()

    finished = 0
    first_done, all_done = trio.Event(), trio.Event()

    async def run(sender: Role) -> None:
        nonlocal finished
        await trio.to_thread.run_sync(pump, sender, limiter=_THREADS)
        finished += 1
        first_done.set()
        if finished == len(ends):
            all_done.set()

    async def watch() -> None:
        try:
            await first_done.wait()
            # The other pump sees the end of its stream, unless it is stuck writing to
            # a peer that does not read: then it is woken by force.
            with trio.move_on_after(CLOSE_TIMEOUT):
                await all_done.wait()
                return
        except BaseException:  # cancelled: the gateway is stopping or access was revoked
            for end in ends.values():
                end.abort()
            raise
        for end in ends.values():
            end.abort()

    wakeup = Wakeup()
    try:
        for end in ends.values():
            end.start(wakeup)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            for sender in ends:
                nursery.start_soon(run, sender)
    finally:
        for end in ends.values():
            end.finish()
        wakeup.close()
    return outcomes[0] if outcomes else None


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
            ended = await _relay_in_threads(
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
