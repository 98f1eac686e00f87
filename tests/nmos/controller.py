"""What a controller does over HTTP, in a few lines of urllib (as any controller might)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import trio

from gateway.config import Address, NmosSettings
from gateway.nmos.connection import Port, sender_params
from gateway.nmos.model import Interface, NodeFacts
from gateway.nmos.sdp import Leg
from gateway.nmos.state import NodeState

NODE = "/x-nmos/node/v1.3"
CONNECTION = "/x-nmos/connection/v1.1"


def _http(method: str, url: str, value: Any = None) -> tuple[int, Any]:
    data = None if value is None else json.dumps(value).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            status, body = answer.status, answer.read()
            kind = answer.headers.get("Content-Type", "")
    except urllib.error.HTTPError as error:
        with error:
            status, body, kind = error.code, error.read(), error.headers.get("Content-Type", "")
    return status, json.loads(body) if "json" in kind else body.decode()


async def http(method: str, url: str, value: Any = None) -> tuple[int, Any]:
    return await trio.to_thread.run_sync(_http, method, url, value)


def nmos_settings(**extra: Any) -> NmosSettings:
    return NmosSettings(enabled=True, listen=Address("127.0.0.1", 0), registration=False, **extra)


def sender_state() -> NodeState:
    """A server Node's state, without a gateway."""
    facts = NodeFacts(
        seed="test",
        role="server",
        label="lab",
        hostname="lab",
        host="127.0.0.1",
        port=3212,
        interfaces=(Interface("lo", "00-00-00-00-00-00"),),
        binding=("lo",),
    )
    port = Port(
        "sender",
        [sender_params(Leg("127.0.0.1", 3240))],
        [{"source_ip": "127.0.0.1", "source_port": 3240}],
    )
    return NodeState(facts, port)
