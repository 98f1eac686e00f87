"""What a user on the client side does, for the reverse-mode namespace test.

Run as `python -m tests.netns.reverse_probe COMMAND ...` inside the client namespace; one
line on stdout says what happened:

    direct HOST PORT     "connected" or "unreachable: ..." (a TCP connect, 3 s bound)
    list PORT            "listed BUSID,BUSID,..."
    import PORT BUSID    "ok N" after N byte-exact 64 KiB rounds on the loopback device,
                         or "refused STATUS"
"""

from __future__ import annotations

import os
import sys

import trio

from gateway.protocol import Direction
from gateway.usbip.importer import ImportRefused, import_device, list_devices

ROUNDS = 8
ROUND_SIZE = 64 * 1024
TIMEOUT = 20.0


async def direct(host: str, port: int) -> str:
    try:
        with trio.fail_after(3):
            stream = await trio.open_tcp_stream(host, port)
    except (OSError, trio.TooSlowError) as exc:
        return f"unreachable: {exc or 'timeout'}"
    await stream.aclose()
    return "connected"


async def listing(port: int) -> str:
    devices = await list_devices(await trio.open_tcp_stream("127.0.0.1", port))
    return "listed " + ",".join(d.info.busid for d in devices)


async def rounds(port: int, busid: str) -> str:
    try:
        device = await import_device(await trio.open_tcp_stream("127.0.0.1", port), busid)
    except ImportRefused as exc:
        return f"refused {exc.status}"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(device.serve)
        for n in range(ROUNDS):
            payload = os.urandom(ROUND_SIZE)
            out = await device.submit(1, Direction.OUT, data=payload)
            back = await device.submit(1, Direction.IN, length=ROUND_SIZE)
            if out.status != 0 or back.data != payload:
                return f"error: round {n} came back different"
        await device.aclose()
        nursery.cancel_scope.cancel()
    return f"ok {ROUNDS}"


async def main(argv: list[str]) -> str:
    with trio.fail_after(TIMEOUT):
        if argv[0] == "direct":
            return await direct(argv[1], int(argv[2]))
        if argv[0] == "list":
            return await listing(int(argv[1]))
        return await rounds(int(argv[1]), argv[2])


if __name__ == "__main__":
    try:
        print(trio.run(main, sys.argv[1:]))
    except Exception as exc:  # one line, whatever it is: the test prints it
        print(f"error: {type(exc).__name__}: {exc}")
        sys.exit(1)
