"""The agent survives a link that breaks in the middle of a device list (after the TLS
handshake, before the reply): found by the real-kernel zero-touch test, where cutting the
link during a round killed the agent and with it the client gateway."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import trio

from gateway.companions.agent import Agent
from gateway.config import Address, AgentSettings, ClientConfig
from gateway.edges.client_gateway import ClientGateway
from gateway.transport.tls import server_context

from ..pkitools import PKI


async def test_link_broken_mid_list_is_a_failed_round(pki: PKI, tmp_path: Path) -> None:
    context = server_context(pki.server_cert, pki.server_key, pki.ca_pem)
    handshakes = 0

    async def handshake_then_drop(tcp: trio.SocketStream) -> None:
        nonlocal handshakes
        stream = trio.SSLStream(tcp, context, server_side=True)
        await stream.do_handshake()
        handshakes += 1
        await tcp.aclose()  # no close_notify, no DEVLIST reply

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, handshake_then_drop, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        settings = AgentSettings(
            enabled=True, interval=0.2, backoff_max=1.0, vhci=tmp_path, state_dir=tmp_path
        )
        client = ClientGateway(
            ClientConfig(
                tls=pki.client_tls(),
                server=Address("127.0.0.1", port),
                server_name="localhost",
                agent=settings,
            )
        )
        # No jitter here (the top of each wait): the doubling itself is checked.
        agent = Agent(settings, client, Address("127.0.0.1", 3240), jitter=lambda: 1.0)
        with trio.fail_after(10):
            assert await agent.round() == 0.2
            assert await agent.round() == 0.4
        assert handshakes == 2
        assert agent.link == "down"
        assert agent.failures == 2
        assert agent.last_error == "BrokenResourceError"
        nursery.cancel_scope.cancel()
