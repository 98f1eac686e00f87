"""In-process pieces for the agent tests: a link that can be cut, and a vhci-hcd stand-in.

`FakeVhci` is what `usbip attach` + vhci-hcd do, in userspace: an attach imports the
device through the client gateway's listener (the whole real path: client gateway, TLS,
server gateway, simulated usbipd), holds the connection, and shows the port in a fake
`vhci_hcd.0/status` and `/var/run/vhci_hcd/portN`; the port goes when the connection
ends, as the kernel drops it on any TCP error.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import trio

from gateway.config import Address
from gateway.usbip.importer import ImportedDevice, ImportRefused, import_device

PORTS = 8
HEADER = "hub port sta spd dev      sockfd local_busid\n"


class CuttableLink:
    """A TCP forwarder: `cut()` resets every connection and refuses new ones until
    `restore()`; `cut(server_side_only=True)` closes only the server's side, leaving the
    client's connections open but silent (a NAT that forgot the flow)."""

    def __init__(self, target: Address) -> None:
        self.target = target
        self.up = True
        self.pairs: list[tuple[trio.SocketStream, trio.SocketStream]] = []
        self.silenced: set[trio.SocketStream] = set()
        self.address = Address("127.0.0.1", 0)

    async def serve(
        self, *, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.address = Address("127.0.0.1", listeners[0].socket.getsockname()[1])
        task_status.started(self.address)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        if not self.up:
            await client.aclose()
            return
        try:
            server = await trio.open_tcp_stream(self.target.host, self.target.port)
        except OSError:
            await client.aclose()
            return
        pair = (client, server)
        self.pairs.append(pair)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, server)
                nursery.start_soon(self._pump, server, client)
        finally:
            if pair in self.pairs:
                self.pairs.remove(pair)
            await trio.aclose_forcefully(server)
            if client in self.silenced:
                await self._swallow(client)
            await trio.aclose_forcefully(client)

    async def _swallow(self, client: trio.SocketStream) -> None:
        """A dead path: take what the client sends, answer nothing, until it closes."""
        try:
            while await client.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.silenced.discard(client)

    async def _pump(self, source: trio.SocketStream, sink: trio.SocketStream) -> None:
        try:
            while data := await source.receive_some(65536):
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        if sink not in self.silenced:
            await trio.aclose_forcefully(sink)

    async def cut(self, *, server_side_only: bool = False) -> None:
        self.up = False
        for client, server in list(self.pairs):
            if server_side_only:
                self.silenced.add(client)
            await trio.aclose_forcefully(server)
            if not server_side_only:
                await trio.aclose_forcefully(client)

    def restore(self) -> None:
        self.up = True


class FakeVhci:
    """The agent's runner: `usbip [--tcp-port P] attach -r H -b B` and `usbip detach -p N`."""

    def __init__(self, root: Path, nursery: trio.Nursery) -> None:
        self.platform = root / "platform"
        self.state_dir = root / "run" / "vhci_hcd"
        (self.platform / "vhci_hcd.0").mkdir(parents=True)
        self.state_dir.mkdir(parents=True)
        self.nursery = nursery
        self.ports: dict[int, tuple[str, ImportedDevice]] = {}
        self.calls: list[list[str]] = []
        self.changed = trio.Event()
        self._write()

    def _write(self) -> None:
        lines = [HEADER]
        for port in range(PORTS):
            used = port in self.ports
            status = 6 if used else 4
            lines.append(f"hs  {port:04d} {status:03d} 003 00010002 000003 0-0\n")
        (self.platform / "vhci_hcd.0" / "status").write_text("".join(lines))
        self.changed.set()
        self.changed = trio.Event()

    async def __call__(self, argv: Sequence[str]) -> tuple[int, str]:
        self.calls.append(list(argv))
        args = list(argv[1:])
        tcp_port = 3240
        if args[:1] == ["--tcp-port"]:
            tcp_port, args = int(args[1]), args[2:]
        if args[:1] == ["attach"]:
            host, busid = args[args.index("-r") + 1], args[args.index("-b") + 1]
            return await self._attach(host, tcp_port, busid)
        if args[:1] == ["detach"]:
            port = int(args[args.index("-p") + 1])
            entry = self.ports.get(port)
            if entry is None:
                return 1, f"usbip: error: port {port} is not in use"
            await entry[1].aclose()
            return 0, ""
        return 2, f"unexpected {argv}"

    async def _attach(self, host: str, tcp_port: int, busid: str) -> tuple[int, str]:
        try:
            stream = await trio.open_tcp_stream(host, tcp_port)
            device = await import_device(stream, busid)
        except (OSError, ConnectionError, ImportRefused, trio.BrokenResourceError) as exc:
            return 1, f"usbip: error: import device: {exc}"
        port = min(set(range(PORTS)) - set(self.ports))
        self.ports[port] = (busid, device)
        (self.state_dir / f"port{port}").write_text(f"{host} {tcp_port} {busid}\n")
        self._write()
        self.nursery.start_soon(self._hold, port, device)
        return 0, ""

    async def _hold(self, port: int, device: ImportedDevice) -> None:
        try:
            await device.serve()
        finally:
            del self.ports[port]
            (self.state_dir / f"port{port}").unlink(missing_ok=True)
            self._write()
            await trio.aclose_forcefully(device._link.stream)

    def attached(self) -> dict[str, int]:
        return {busid: port for port, (busid, _) in self.ports.items()}
