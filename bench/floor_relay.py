"""The floor of a relay in Python: two blocking threads per connection doing only
`recv` and `sendall`, no parsing, no TLS. Not a product path: `bench.hops` runs it
beside the gateway to show what Python itself costs per hop.

    python -m bench.floor_relay --listen 127.0.0.1:PORT --upstream 127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import threading

RECEIVE_SIZE = 128 * 1024


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(RECEIVE_SIZE):
            sink.sendall(data)
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def serve(listen: tuple[str, int], upstream: tuple[str, int]) -> None:
    server = socket.create_server(listen, reuse_port=False)
    while True:
        client, _ = server.accept()
        up = socket.create_connection(upstream)
        for sock in (client, up):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_pump, args=(client, up), daemon=True).start()
        threading.Thread(target=_pump, args=(up, client), daemon=True).start()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=_address, required=True)
    parser.add_argument("--upstream", type=_address, required=True)
    opts = parser.parse_args(argv)
    serve(opts.listen, opts.upstream)


if __name__ == "__main__":
    main()
