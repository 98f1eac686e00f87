"""The Node API (IS-04 v1.3) and Connection API (IS-05 v1.1) of one Node: a request in,
an answer out, no sockets (gateway.observability.http serves it).

Paths are read with or without their trailing slash. Every answer carries the CORS
headers the specifications ask for; errors are IS-04/IS-05 error objects.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.observability.http import Answer, Request

from .connection import PatchError
from .model import CONNECTION_API_VERSION, NODE_API_VERSION, TRANSPORT, tai_now
from .state import NodeState

log = logging.getLogger("gateway.nmos.api")

JSON_TYPE = "application/json"
SDP_TYPE = "application/sdp"
CORS = (
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "GET, PUT, POST, PATCH, HEAD, OPTIONS, DELETE"),
    ("Access-Control-Allow-Headers", "Content-Type, Accept"),
    ("Access-Control-Max-Age", "3600"),
)
NODE_LISTS = ("self/", "sources/", "flows/", "devices/", "senders/", "receivers/")
PLURAL = {
    "sources": "source",
    "flows": "flow",
    "devices": "device",
    "senders": "sender",
    "receivers": "receiver",
}
MAX_BULK = 64


class _Refused(Exception):
    def __init__(self, status: int, message: str, allow: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.allow = allow


def _json(status: int, value: Any, headers: tuple[tuple[str, str], ...] = ()) -> Answer:
    body = json.dumps(value).encode()
    return Answer(status, JSON_TYPE, body, CORS + headers)


def _error(status: int, message: str, allow: str = "") -> Answer:
    headers = (("Allow", allow),) if allow else ()
    return _json(status, {"code": status, "error": message, "debug": None}, headers)


class NmosApi:
    """Answers /x-nmos/node/v1.3/... and /x-nmos/connection/v1.1/... for `state`;
    `transport_file` gives the Sender's SDP; `scheduled` is told of each scheduled
    activation (the caller runs it when due)."""

    def __init__(
        self,
        state: NodeState,
        *,
        transport_file: Callable[[], str] | None = None,
        scheduled: Callable[[tuple[int, int]], None] | None = None,
        on_refused: Callable[[int], None] | None = None,
        fetch: Callable[[str], Awaitable[str]] | None = None,
    ) -> None:
        self.state = state
        self.transport_file = transport_file
        self.scheduled = scheduled
        self.on_refused = on_refused  # counts refused requests, by status
        self.fetch = fetch  # a Sender's transport file by its manifest_href (IS-04 target)

    async def __call__(self, request: Request) -> Answer:
        method = "GET" if request.method == "HEAD" else request.method
        path = request.target.split("?", 1)[0]
        parts = [p for p in path.split("/") if p]
        if method == "OPTIONS":
            return Answer(200, "text/plain", b"", CORS)
        try:
            if parts[:4] == ["x-nmos", "node", NODE_API_VERSION, "receivers"] and parts[5:] == [
                "target"
            ]:
                return await self._target(method, parts[4], request.body)
            return self._route(method, parts, request.body)
        except _Refused as exc:
            if self.on_refused is not None:
                self.on_refused(exc.status)
            log.info("NMOS %s %s: %d %s", request.method, path[:200], exc.status, exc)
            return _error(exc.status, str(exc), exc.allow)
        except Exception:
            # A fault here must not take the gateway down with the endpoint.
            log.exception("NMOS %s %s: internal error", request.method, path[:200])
            if self.on_refused is not None:
                self.on_refused(500)
            return _error(500, "internal error (logged)")

    # -- routing

    def _route(self, method: str, parts: list[str], body: bytes) -> Answer:
        if not parts:
            self._only(method, "GET")
            return _json(200, ["x-nmos/"])
        if parts[0] != "x-nmos":
            raise _Refused(404, "not found: the APIs are under /x-nmos/")
        if len(parts) == 1:
            self._only(method, "GET")
            return _json(200, ["node/", "connection/"])
        api, rest = parts[1], parts[2:]
        if api == "node":
            return self._versioned(method, rest, NODE_API_VERSION, self._node, body)
        if api == "connection":
            return self._versioned(method, rest, CONNECTION_API_VERSION, self._connection, body)
        raise _Refused(404, f"no API {api!r} here: node and connection")

    def _versioned(
        self,
        method: str,
        rest: list[str],
        version: str,
        handler: Callable[[str, list[str], bytes], Answer],
        body: bytes,
    ) -> Answer:
        if not rest:
            self._only(method, "GET")
            return _json(200, [f"{version}/"])
        if rest[0] != version:
            raise _Refused(404, f"API version {rest[0]!r} not served: {version}")
        return handler(method, rest[1:], body)

    @staticmethod
    def _only(method: str, *allowed: str) -> None:
        if method not in allowed:
            allow = ", ".join((*allowed, "HEAD", "OPTIONS") if "GET" in allowed else allowed)
            raise _Refused(405, f"{method} is not allowed here", allow)

    # -- Node API

    def _node(self, method: str, rest: list[str], body: bytes) -> Answer:
        state = self.state
        if not rest:
            self._only(method, "GET")
            return _json(200, list(NODE_LISTS))
        head = rest[0]
        if head == "self" and len(rest) == 1:
            self._only(method, "GET")
            return _json(200, state.resource("node"))
        kind = PLURAL.get(head)
        if kind is None:
            raise _Refused(404, f"no resource list {head!r}")
        if len(rest) == 1:
            self._only(method, "GET")
            return _json(200, state.resources(kind))
        found = state.find(kind, rest[1])
        if found is None or len(rest) > 2:
            raise _Refused(404, f"no {kind} {rest[1]!r}")
        self._only(method, "GET")
        return _json(200, found)

    async def _target(self, method: str, receiver_id: str, body: bytes) -> Answer:
        """IS-04's (deprecated) connection: PUT a Sender to connect, `{}` to disconnect."""
        self._only(method, "PUT")
        if self.state.find("receiver", receiver_id) is None:
            raise _Refused(404, f"no receiver {receiver_id!r}")
        sender = self._body(body)
        if not isinstance(sender, dict):
            raise _Refused(400, "the body must be a Sender or {}")
        immediate = {"mode": "activate_immediate"}
        if not sender:
            patch: dict[str, Any] = {"sender_id": None, "master_enable": False}
        else:
            href = sender.get("manifest_href")
            if not isinstance(href, str) or self.fetch is None:
                raise _Refused(400, "the Sender has no manifest_href to connect to")
            try:
                sdp = await self.fetch(href)
            except (OSError, ValueError) as exc:
                raise _Refused(400, f"cannot read the Sender's transport file: {exc}") from None
            patch = {
                "sender_id": sender.get("id"),
                "master_enable": True,
                "transport_file": {"data": sdp, "type": SDP_TYPE},
            }
        self._patch({**patch, "activation": immediate})
        return _json(202, sender)

    # -- Connection API

    def _connection(self, method: str, rest: list[str], body: bytes) -> Answer:
        if not rest:
            self._only(method, "GET")
            return _json(200, ["bulk/", "single/"])
        if rest[0] == "single":
            return self._single(method, rest[1:], body)
        if rest[0] == "bulk":
            return self._bulk(method, rest[1:], body)
        raise _Refused(404, f"no {rest[0]!r} in the Connection API")

    def _single(self, method: str, rest: list[str], body: bytes) -> Answer:
        state = self.state
        if not rest:
            self._only(method, "GET")
            return _json(200, ["senders/", "receivers/"])
        plural = rest[0]
        if plural not in ("senders", "receivers"):
            raise _Refused(404, f"no {plural!r} in /single")
        kind = plural[:-1]
        ours = kind == state.port_kind
        our_id = state.facts.id(kind)
        if len(rest) == 1:
            self._only(method, "GET")
            return _json(200, [f"{our_id}/"] if ours else [])
        if not ours or rest[1] != our_id:
            raise _Refused(404, f"no {kind} {rest[1]!r}")
        if len(rest) == 2:
            self._only(method, "GET")
            endpoints = ["constraints/", "staged/", "active/", "transporttype/"]
            if kind == "sender":
                endpoints.insert(3, "transportfile/")
            return _json(200, endpoints)
        if len(rest) > 3:
            raise _Refused(404, "not found")
        return self._endpoint(method, kind, rest[2], body)

    def _endpoint(self, method: str, kind: str, name: str, body: bytes) -> Answer:
        port = self.state.port
        if name == "constraints":
            self._only(method, "GET")
            return _json(200, port.constraints())
        if name == "active":
            self._only(method, "GET")
            return _json(200, port.active)
        if name == "transporttype":
            self._only(method, "GET")
            return _json(200, TRANSPORT)
        if name == "transportfile" and kind == "sender":
            self._only(method, "GET")
            if self.transport_file is None:
                raise _Refused(404, "no transport file")
            return Answer(200, SDP_TYPE, self.transport_file().encode(), CORS)
        if name == "staged":
            if method == "GET":
                return _json(200, port.staged)
            self._only(method, "GET", "PATCH")
            status, value = self._patch(self._body(body))
            return _json(status, value)
        raise _Refused(404, f"no {name!r} for a {kind}")

    @staticmethod
    def _body(body: bytes) -> Any:
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise _Refused(400, "the body is not JSON") from None

    def _patch(self, body: Any) -> tuple[int, Any]:
        try:
            answer = self.state.patch(body, tai_now())
        except PatchError as exc:
            raise _Refused(exc.status, str(exc)) from None
        if answer.due is not None and self.scheduled is not None:
            self.scheduled(answer.due)
        return answer.status, answer.body

    def _bulk(self, method: str, rest: list[str], body: bytes) -> Answer:
        if not rest:
            self._only(method, "GET")
            return _json(200, ["senders/", "receivers/"])
        if len(rest) > 1 or rest[0] not in ("senders", "receivers"):
            raise _Refused(404, "not found")
        self._only(method, "POST")
        kind = rest[0][:-1]
        items = self._body(body)
        if not isinstance(items, list) or len(items) > MAX_BULK:
            raise _Refused(400, f"the body must be a list of at most {MAX_BULK} {{id, params}}")
        results = []
        for item in items:
            if not isinstance(item, dict) or set(item) != {"id", "params"}:
                raise _Refused(400, "each entry must be {id, params}")
            target = str(item["id"])
            result: dict[str, Any] = {"id": target}
            if kind != self.state.port_kind or target != self.state.facts.id(kind):
                result.update(code=404, error=f"no {kind} {target}")
            else:
                try:
                    result["code"], _ = self._patch(item["params"])
                except _Refused as exc:
                    result.update(code=exc.status, error=str(exc))
            results.append(result)
        return _json(200, results)
