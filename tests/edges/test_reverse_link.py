"""The reverse link's idle phase and hand-over, on memory streams and Trio's clock."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from gateway.edges.reverse_link import (
    PING,
    LinkLost,
    claim,
    keep_alive,
    wait_for_claim,
)

KEEPALIVE = 10.0
OP_REQUEST = b"\x01\x11\x80\x05\x00\x00\x00\x00"


async def test_idle_for_long_then_claimed_and_usbip_passes_untouched(
    autojump_clock: trio.testing.MockClock,
) -> None:
    dialing, accepting = trio.testing.memory_stream_pair()
    received: list[bytes] = []

    async def server_side() -> None:
        await wait_for_claim(dialing, KEEPALIVE)
        received.append(await dialing.receive_some(100))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server_side)
        with trio.move_on_after(20 * KEEPALIVE):  # many pings each way, all answered
            await keep_alive(accepting, KEEPALIVE)
        assert trio.current_time() >= 20 * KEEPALIVE
        await claim(accepting, 1.0)
        await accepting.send_all(OP_REQUEST)
    assert received == [OP_REQUEST]


@pytest.mark.parametrize("side", ["dialing", "accepting"])
async def test_a_silent_peer_is_noticed_within_two_keepalives(
    autojump_clock: trio.testing.MockClock, side: str
) -> None:
    ours, _silent = trio.testing.memory_stream_pair()
    idle = wait_for_claim if side == "dialing" else keep_alive
    with pytest.raises(LinkLost, match="no answer to a keepalive"):
        await idle(ours, KEEPALIVE)
    assert trio.current_time() == pytest.approx(2 * KEEPALIVE)


async def test_a_byte_outside_the_link_protocol_ends_it() -> None:
    dialing, accepting = trio.testing.memory_stream_pair()
    await accepting.send_all(OP_REQUEST)  # USB/IP before a claim: refused
    with pytest.raises(LinkLost, match="unexpected byte"):
        await wait_for_claim(dialing, KEEPALIVE)


async def test_a_peer_that_closes_is_lost() -> None:
    dialing, accepting = trio.testing.memory_stream_pair()
    await dialing.aclose()
    with pytest.raises(LinkLost):
        await keep_alive(accepting, KEEPALIVE)


async def test_an_unanswered_claim_times_out(autojump_clock: trio.testing.MockClock) -> None:
    _dead, accepting = trio.testing.memory_stream_pair()
    with pytest.raises(LinkLost, match="no answer to the claim"):
        await claim(accepting, 2.0)
    assert trio.current_time() == pytest.approx(2.0)


async def test_a_ping_crossing_the_claim_is_not_answered_into_the_session() -> None:
    dialing, accepting = trio.testing.memory_stream_pair()
    # The dialing side pinged just as the accepting side claimed.
    await dialing.send_all(PING)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(claim, accepting, 1.0)
        await wait_for_claim(dialing, KEEPALIVE)  # answers the ping, then READY
    await accepting.send_all(OP_REQUEST)
    # After READY, the dialing side sees exactly the USB/IP bytes, no link byte.
    assert await dialing.receive_some(100) == OP_REQUEST
