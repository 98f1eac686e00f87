"""A USB/IP load client for the namespace tests: rounds of write-then-read-back.

Run as `python -m tests.netns.loadgen PORT` inside the client namespace. It imports the
simulator's loopback device (1-2) through the client gateway on 127.0.0.1:PORT and, round
after round without pause, writes a 64 KiB pattern unique to the round to bulk OUT and
reads it back from bulk IN, checking every byte. Protocol on stdout/stdin, one line each:

    round N ok            after each verified round
    done                  `after` rounds completed after "continue" arrived on stdin
    error: ...            anything else; exit status 1

Every round is bounded by ROUND_TIMEOUT, so a dead path ends it rather than hangs it.
"""

from __future__ import annotations

import argparse
import random
import struct
import sys

import trio

from gateway.protocol import Direction
from gateway.usbip.importer import import_device

BUSID = "1-2"
ROUND_SIZE = 64 * 1024
ROUND_TIMEOUT = 20.0


def pattern(n: int) -> bytes:
    """Round n's bytes: every 4-byte word names the round and its offset (so a lost,
    duplicated or reordered block is visible), random-looking on odd rounds."""
    if n % 2:
        return random.Random(n).randbytes(ROUND_SIZE)
    return b"".join(struct.pack(">HH", n & 0xFFFF, i & 0xFFFF) for i in range(ROUND_SIZE // 4))


async def run(port: int, after: int) -> None:
    told = trio.Event()

    async def wait_for_continue() -> None:
        line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        if line.strip() == "continue":
            told.set()

    stream = await trio.open_tcp_stream("127.0.0.1", port)
    device = await import_device(stream, BUSID)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(device.serve)
        nursery.start_soon(wait_for_continue)
        n = 0
        left = after
        while left > 0:
            n += 1
            counting = told.is_set()
            data = pattern(n)
            with trio.fail_after(ROUND_TIMEOUT):
                out = await device.submit(1, Direction.OUT, data=data)
                if out.status != 0:
                    raise RuntimeError(f"round {n}: bulk OUT status {out.status}")
                back = bytearray()
                while len(back) < len(data):
                    got = await device.submit(1, Direction.IN, length=len(data) - len(back))
                    if got.status != 0:
                        raise RuntimeError(f"round {n}: bulk IN status {got.status}")
                    back += got.data
            if bytes(back) != data:
                raise RuntimeError(f"round {n}: read back differs from what was written")
            print(f"round {n} ok", flush=True)
            if counting:
                left -= 1
        await device.aclose()
        nursery.cancel_scope.cancel()
    print("done", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--after", type=int, default=50, help="rounds after 'continue'")
    args = parser.parse_args()
    try:
        trio.run(run, args.port, args.after)
    except Exception as exc:  # reported to the test, which fails on it
        error: BaseException = exc
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]
        print(f"error: {type(error).__name__}: {error}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
