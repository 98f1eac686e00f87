"""What one hop of the relay thread costs, in one process, without the rest of the chain.

    python -m bench.relay_thread [--urbs 20000] [--runs 3]

Between two socket pairs, a ping-pong of 64-byte CMD_SUBMIT / RET_SUBMIT pairs (an
imported device, bulk IN) goes through, alternating run by run:
- the floor: two blocking Python threads that only `recv` and `sendall`;
- the relay thread (`gateway.relay.pumps.pump`) forwarding reads unparsed;
- the relay thread as it is: parsing, the per-seqnum state, the accounting.

For each, the relaying threads' CPU time (`time.thread_time`) per hop (two hops per
URB) and the round trip, medians of `--runs`. The unparsed variant replaces
`cut_frames` for its run only.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time
from collections.abc import Callable

from gateway.accounting.session import Session
from gateway.protocol import CmdSubmit, Direction, Role, Splice
from gateway.relay import pumps
from gateway.relay.pumps import Stop, pump
from gateway.transport.socket_ends import SocketEnd
from tests.protocol.helpers import imported_trio  # a Splice past IMPORT and enumeration

SIZE = 64
Mode = Callable[[int], tuple[float, float]]  # urbs -> (CPU per hop, round trip), seconds


def _devid() -> int:
    imported = imported_trio().splice.state.imported
    assert imported is not None
    return imported.devid


def _frames(urbs: int, devid: int) -> tuple[list[bytes], list[bytes]]:
    from gateway.protocol import RetSubmit  # noqa: PLC0415

    cmds = [CmdSubmit(i + 1, devid, Direction.IN, 1, SIZE).encode() for i in range(urbs)]
    rets = [RetSubmit(i + 1, actual_length=SIZE, data=bytes(SIZE)).encode() for i in range(urbs)]
    return cmds, rets


def _ping_pong(
    client: socket.socket, server: socket.socket, cmds: list[bytes], rets: list[bytes]
) -> float:
    started = time.perf_counter()
    for cmd, ret in zip(cmds, rets, strict=True):
        client.sendall(cmd)
        server.recv(65536)
        server.sendall(ret)
        client.recv(65536)
    return (time.perf_counter() - started) / len(cmds)


def floor(urbs: int) -> tuple[float, float]:
    client, ours_c = socket.socketpair()
    ours_s, server = socket.socketpair()
    cpu: list[float] = []

    def forward(source: socket.socket, sink: socket.socket) -> None:
        started = time.thread_time()
        while data := source.recv(131072):
            sink.sendall(data)
        cpu.append(time.thread_time() - started)
        sink.shutdown(socket.SHUT_WR)

    threads = [
        threading.Thread(target=forward, args=(ours_c, ours_s)),
        threading.Thread(target=forward, args=(ours_s, ours_c)),
    ]
    for thread in threads:
        thread.start()
    cmds, rets = _frames(urbs, _devid())
    rtt = _ping_pong(client, server, cmds, rets)
    client.shutdown(socket.SHUT_WR)
    server.shutdown(socket.SHUT_WR)
    for thread in threads:
        thread.join()
    for sock in (client, ours_c, ours_s, server):
        sock.close()
    return sum(cpu) / urbs / 2, rtt


def relay_thread(parse: bool) -> Mode:
    def run(urbs: int) -> tuple[float, float]:
        client, ours_c = socket.socketpair()
        ours_s, server = socket.socketpair()
        for sock in (ours_c, ours_s):
            sock.setblocking(False)
        splice = imported_trio(cut_through=True).splice
        cmds, rets = _frames(urbs, _devid())
        session = Session("server", "bench", "socketpair", time.time())
        stop = Stop()
        ends = {Role.CLIENT: SocketEnd(ours_c), Role.SERVER: SocketEnd(ours_s)}
        cpu: list[float] = []
        cut_frames = pumps.cut_frames

        def unparsed(
            splice: Splice, sender: Role, data: bytes, observe: object, now: float
        ) -> tuple[bytes, bool, None, int]:
            return data, False, None, 0

        def serve() -> None:
            started = time.thread_time()
            pump(splice, ends, session, stop=stop)
            cpu.append(time.thread_time() - started)

        if not parse:
            pumps.cut_frames = unparsed  # type: ignore[assignment]
        try:
            thread = threading.Thread(target=serve)
            thread.start()
            rtt = _ping_pong(client, server, cmds, rets)
            stop.set()
            thread.join()
        finally:
            pumps.cut_frames = cut_frames
            stop.close()
        for sock in (client, ours_c, ours_s, server):
            sock.close()
        return cpu[0] / urbs / 2, rtt

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--urbs", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=3)
    opts = parser.parse_args()
    modes: dict[str, Mode] = {
        "two blocking Python threads, recv and sendall (the floor)": floor,
        "the relay thread, frames forwarded unparsed": relay_thread(parse=False),
        "the relay thread as it is (parsing, state, accounting)": relay_thread(parse=True),
    }
    figures: dict[str, list[tuple[float, float]]] = {name: [] for name in modes}
    for _ in range(opts.runs):
        for name, mode in modes.items():
            figures[name].append(mode(opts.urbs))
    print(f"{opts.urbs} URBs of {SIZE} B, ping-pong, medians of {opts.runs} runs\n")
    print("| relay between two socket pairs | CPU per hop µs | round trip µs |")
    print("|---|---:|---:|")
    for name, runs in figures.items():
        cpu = statistics.median(c for c, _ in runs) * 1e6
        rtt = statistics.median(r for _, r in runs) * 1e6
        print(f"| {name} | {cpu:.1f} | {rtt:.1f} |")


if __name__ == "__main__":
    main()
