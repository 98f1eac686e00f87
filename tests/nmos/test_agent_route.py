"""With the agent, an NMOS connection attaches what its selection rules choose, and a
disconnection detaches it and keeps it detached (the kernel side is the zero-touch
tests' fake vhci, driving the real importer through the client gateway)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import trio

from gateway.companions.agent import Agent
from gateway.config import AgentSettings
from gateway.demo import start_stack
from gateway.nmos.node import run_nmos

from ..pkitools import PKI
from ..zerotouch.harness import FakeVhci
from .controller import CONNECTION, NODE, http, nmos_settings

WAIT = 20.0


async def test_the_agent_follows_the_receiver(pki: PKI, tmp_path: Path) -> None:
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            stack = await start_stack(
                nursery,
                pki.server_tls(),
                pki.client_tls(),
                server_nmos=nmos_settings(),
                client_nmos=nmos_settings(),
            )
            sender_node = await nursery.start(
                partial(run_nmos, stack.server, [stack.server_address])
            )
            receiver_node = await nursery.start(
                partial(run_nmos, stack.client, [stack.client_address])
            )
            rid = receiver_node.facts.id("receiver")
            staged = f"{receiver_node.facts.base}{CONNECTION}/single/receivers/{rid}/staged"
            off = {"master_enable": False, "activation": {"mode": "activate_immediate"}}
            assert (await http("PATCH", staged, off))[0] == 200

            vhci = FakeVhci(tmp_path / "sys", nursery)
            settings = AgentSettings(
                enabled=True,
                interval=0.05,
                backoff_max=0.2,
                select=("allow busid 1-2",),
                vhci=vhci.platform,
                state_dir=vhci.state_dir,
            )
            agent = Agent(settings, stack.client, stack.client_address, runner=vhci)
            await nursery.start(agent.run)
            for _ in range(3):
                await agent.wait_round()
            assert vhci.attached() == {}  # no route: nothing to attach
            assert agent.link == "down"

            (sender,) = (await http("GET", f"{sender_node.facts.base}{NODE}/senders"))[1]
            sdp = (await http("GET", sender["manifest_href"]))[1]
            connect = {
                "sender_id": sender["id"],
                "master_enable": True,
                "transport_file": {"data": sdp, "type": "application/sdp"},
                "activation": {"mode": "activate_immediate"},
            }
            assert (await http("PATCH", staged, connect))[0] == 200
            while "1-2" not in vhci.attached():
                await agent.wait_round()
            assert set(vhci.attached()) == {"1-2"}  # only what the rules choose

            assert (await http("PATCH", staged, off))[0] == 200
            while vhci.attached():
                await vhci.changed.wait()
            for _ in range(3):
                await agent.wait_round()
            assert vhci.attached() == {}
            nursery.cancel_scope.cancel()
