"""The few bytes a reverse connection carries before USB/IP: liveness while it waits in a
pool, and the hand-over to a session.

A server gateway dials a client gateway and the connection waits, TLS done and both
identities checked, until a local `usbip` needs it. Meanwhile each side pings the other
when it has been silent for its `keepalive` (`PING`, answered `PONG`), so that a
connection a NAT or a cut link has silently killed is noticed and replaced on both ends.
The client gateway takes a connection by sending `CLAIM`; the server gateway answers
`READY` and from then on the connection is an ordinary USB/IP session, the client's op
request first. A connection that does not answer the claim in time is dropped and the
next pooled one is tried. Every byte is one of these four; anything else ends the
connection.
"""

from __future__ import annotations

import trio

PING = b"?"
PONG = b"!"
CLAIM = b"C"
READY = b"R"


class LinkLost(Exception):
    """The pooled connection closed, broke, stopped answering or sent something else."""


async def _one_byte(stream: trio.abc.ReceiveStream) -> bytes:
    try:
        byte = await stream.receive_some(1)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise LinkLost(f"connection lost: {exc.__cause__ or exc}") from exc
    if not byte:
        raise LinkLost("closed by the peer")
    return bytes(byte)


async def _send(stream: trio.abc.SendStream, byte: bytes) -> None:
    try:
        # One byte: never left half-sent by a cancellation.
        with trio.CancelScope(shield=True):
            await stream.send_all(byte)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise LinkLost(f"connection lost: {exc.__cause__ or exc}") from exc


async def _keep_idle(stream: trio.abc.Stream, keepalive: float, *, claimable: bool) -> None:
    """Answer the peer's pings and ping it when it has been silent for `keepalive`
    seconds; LinkLost when a ping goes unanswered as long again. Returns when claimed
    (`claimable`: the dialing side), after answering READY."""
    unanswered = False
    while True:
        with trio.move_on_after(keepalive):
            byte = await _one_byte(stream)
            if byte == PING:
                await _send(stream, PONG)
            elif byte == CLAIM and claimable:
                await _send(stream, READY)
                return
            elif byte != PONG:
                raise LinkLost(f"unexpected byte {byte!r} while idle")
            unanswered = False
            continue
        if unanswered:
            raise LinkLost(f"no answer to a keepalive within {keepalive:g}s")
        await _send(stream, PING)
        unanswered = True


async def wait_for_claim(stream: trio.abc.Stream, keepalive: float) -> None:
    """Dialing side: keep the idle connection alive until the peer claims it (READY
    sent), or raise LinkLost."""
    await _keep_idle(stream, keepalive, claimable=True)


async def keep_alive(stream: trio.abc.Stream, keepalive: float) -> None:
    """Accepting side, while the connection is pooled: until cancelled (the connection is
    being claimed; no byte is lost) or LinkLost."""
    await _keep_idle(stream, keepalive, claimable=False)


async def claim(stream: trio.abc.Stream, timeout: float) -> None:
    """Accepting side: make the pooled connection a session's; LinkLost if it does not
    answer within `timeout` seconds. Pings that crossed the claim are left unanswered:
    after READY every byte is USB/IP."""
    await _send(stream, CLAIM)
    with trio.move_on_after(timeout):
        while True:
            byte = await _one_byte(stream)
            if byte == READY:
                return
            if byte not in (PING, PONG):
                raise LinkLost(f"unexpected byte {byte!r} answering the claim")
    raise LinkLost(f"no answer to the claim within {timeout:g}s")
