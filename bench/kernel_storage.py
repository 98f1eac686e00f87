"""Storage through the real kernel: direct, a stunnel pair and the gateway pair, side by side.

    python -m bench.kernel_storage --runs 3 --size-mb 256 --write-mb 16

One QEMU guest (the tests/realkernel harness: Debian's kernel under TCG) boots once with
QEMU's usb-storage stick. Its own `usbipd` + `usbip-host` export the stick and its
`vhci-hcd` imports it again through each path in turn:

    direct   guest vhci -> 10.0.2.2:HOSTFWD -> QEMU port forward -> guest usbipd
    stunnel  guest vhci -> 10.0.2.2:C -> stunnel client -> (mutual TLS 1.3) ->
             stunnel server -> 127.0.0.1:HOSTFWD -> QEMU port forward -> guest usbipd
    gateway  the same with `python -m gateway client` / `server` in place of stunnel
    socat    (only with --paths ... socat) bench/procs.py's socat pair: bytes only

The relays run on the host, where tests/realkernel/test_gateway.py runs the gateway pair
for its storage scenario: the guest reaches them at 10.0.2.2 (QEMU's user network maps it
to the host's loopback) and they reach the guest's usbipd through QEMU's port forward.
Both pairs are started by bench/procs.py's `Launcher`, as in bench/throughput.py: the
stunnel configuration there (Debian's stunnel4, TLS 1.3 minimum, `verifyChain`,
`checkHost`, TCP_NODELAY on both sockets of both sides) and the gateways at log level
warning, all with the certificates of `usbip-gateway certs demo`.

Each pass (one path, one run): attach, write `--write-mb` MiB of a random pattern to a
slot of its own (fsync'd; timed), drop the page cache, read `--size-mb` MiB of random
data to /dev/null (timed), checksum that region from the page cache the read filled,
detach, wait until usbip-host offers the stick again (guestlib.sh `rk_storage_pass`).
The read's sha256 is checked against the image's, and after the guest has powered off
every pass's write slot in QEMU's backing file is checked against the pattern's. Passes
rotate the path order run by run (run 1: direct, stunnel, gateway; run 2: stunnel,
gateway, direct; ...) so drifting load hits every path alike. The table gives per path
the median of the runs' times, MiB/s from that median, and the time as a ratio to
stunnel's and to direct's. The exit status is 1 if any pass failed or any checksum
differed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from bench.procs import Launcher, Path_
from tests.realkernel.guest import Guest, GuestError, GuestResult, usb_storage
from tests.realkernel.hostprocs import make_demo_certs
from tests.realkernel.image import GuestImage, PrerequisiteError, build_guest
from tests.realkernel.storage import StorageImage

PATHS = ("direct", "stunnel", "gateway")
BEFORE = "gateway before"  # with --before DIR: the gateway pair run from another tree
# socat (bytes only, bench/procs.py's pair) on request: how much any host relay changes.
OPTIONAL_PATHS = ("socat",)
LOAD_SAMPLE_S = 5.0

SCRIPT = """
rk_start_usbipd
busid=$(rk_local_busid 46f4 0001) || exit 1
rk_bind "$busid" || exit 1
cp /host/pattern_a.bin /tmp/pattern.bin || { rk_fail "copying the pattern"; exit 1; }
rk_mark bench_ready
for step in $RK_STEPS; do
    rk_storage_pass "s${step%%:*}" "${step#*:}" "$busid" "${step%%:*}" || exit 1
done
"""


def plan(runs: int, paths: Sequence[str] = PATHS) -> list[tuple[int, str]]:
    """(run, path) in the order the guest does them: the order rotates by one per run."""
    order: list[tuple[int, str]] = []
    for run in range(runs):
        shift = run % len(paths)
        order += [(run, p) for p in [*paths[shift:], *paths[:shift]]]
    return order


@dataclass
class Pass:
    run: int
    path: str
    read_s: float | None = None
    write_s: float | None = None
    read_ok: bool = False
    write_ok: bool = False
    problem: str = ""

    @property
    def ok(self) -> bool:
        return self.read_ok and self.write_ok and not self.problem


@dataclass
class Measurement:
    read_mb: int
    write_mb: int
    passes: list[Pass]
    guest: GuestResult
    relay_problems: list[str] = field(default_factory=list)
    # The host's 1-minute load average, sampled every few seconds while the guest ran:
    # the machine is shared, and this says how much else competed for its cores.
    host_load: list[float] = field(default_factory=list)

    def load_summary(self) -> str:
        if not self.host_load:
            return "host load average: not sampled"
        q = sorted(self.host_load)
        return (
            f"host 1-min load average while the guest ran: min {q[0]:.1f}, "
            f"median {statistics.median(q):.1f}, max {q[-1]:.1f} ({len(q)} samples)"
        )

    @property
    def ok(self) -> bool:
        return not self.relay_problems and all(p.ok for p in self.passes)

    def problems(self) -> list[str]:
        return self.relay_problems + [
            f"run {p.run + 1} {p.path}: "
            + (p.problem or f"read checksum ok={p.read_ok}, write slot ok={p.write_ok}")
            for p in self.passes
            if not p.ok
        ]

    def medians(self, path: str) -> tuple[float | None, float | None]:
        """Median read and write seconds of the path's passes (None if none finished)."""
        reads = [p.read_s for p in self.passes if p.path == path and p.read_s is not None]
        writes = [p.write_s for p in self.passes if p.path == path and p.write_s is not None]
        return (
            statistics.median(reads) if reads else None,
            statistics.median(writes) if writes else None,
        )


def guest_timeout(steps: int, read_mb: int, write_mb: int) -> float:
    """A deadline only: generous for TCG on a loaded machine (1 MiB/s or better each way)."""
    return 120 + steps * (60 + read_mb + write_mb)


async def start_relays(
    launcher: Launcher, upstream_port: int, paths: Sequence[str], before: Path | None = None
) -> dict[str, Path_]:
    """The relay pairs of `paths` on the host, each to the guest's usbipd (`BEFORE`: the
    gateway pair from the tree `before`)."""
    usbipd = Path_("guest usbipd", upstream_port)
    relays = {"direct": usbipd}
    for path in paths:
        if path == "stunnel":
            relays[path] = await launcher.stunnel(usbipd)
        elif path == "gateway":
            relays[path] = await launcher.gateways(usbipd, zstd=False)
        elif path == "socat":
            relays[path] = await launcher.socat(usbipd)
        elif path == BEFORE and before is not None:
            relays[path] = await launcher.gateways(usbipd, zstd=False, root=before, tag=" (before)")
    return relays


async def measure(
    image: GuestImage,
    workdir: Path,
    *,
    runs: int,
    read_mb: int,
    write_mb: int,
    paths: Sequence[str] = PATHS,
    before: Path | None = None,
) -> Measurement:
    """Boot the guest once and do every (run, path) pass of plan(runs, paths)."""
    steps = plan(runs, paths)
    disk = workdir / "disk"
    disk.mkdir(parents=True, exist_ok=True)
    # Write slots first (zeros until a pass writes its own), then the random read region.
    slots_mb = len(steps) * write_mb
    stick = StorageImage.create(
        disk,
        size_mb=slots_mb + read_mb,
        a_mb=write_mb,
        b_offset_mb=slots_mb,
        b_mb=read_mb,
    )
    certs = await make_demo_certs(workdir / "certs")
    guest = Guest(
        image,
        workdir / "share",
        script=SCRIPT,
        devices=[usb_storage(stick.image)],
        params=stick.params(),
        files={"pattern_a.bin": stick.pattern_a},
        memory_mb=384 + read_mb,  # the read region stays in the page cache for its checksum
        trace=False,
    )
    relays = await start_relays(
        Launcher(workdir / "logs", certs), guest.hostfwd_port, paths, before
    )
    try:
        guest.params["RK_STEPS"] = " ".join(
            f"{k}:{relays[path].port}" for k, (_, path) in enumerate(steps)
        )
        host_load: list[float] = []
        async with trio.open_nursery() as nursery:

            async def sample_load() -> None:
                while True:
                    host_load.append(os.getloadavg()[0])
                    await trio.sleep(LOAD_SAMPLE_S)

            nursery.start_soon(sample_load)
            res = await guest.arun(timeout=guest_timeout(len(steps), read_mb, write_mb))
            nursery.cancel_scope.cancel()
        relay_problems = [
            f"{relay.name} exited early (logs in {workdir / 'logs'})"
            for relay in relays.values()
            if not relay.alive()
        ]
    finally:
        for relay in relays.values():
            relay.stop()
    passes = []
    for k, (run, path) in enumerate(steps):
        p = Pass(run, path)
        passes.append(p)
        prefix = f"s{k}"
        if f"t_{prefix}_released" not in res.results:
            p.problem = "did not finish: " + "; ".join(res.errors or [f"see {res.run_log}"])
            continue
        p.write_s = res.elapsed(f"{prefix}_attached", f"{prefix}_written")
        p.read_s = res.elapsed(f"{prefix}_read_start", f"{prefix}_read_end")
        p.read_ok = res.get(f"{prefix}_read_sha256") == stick.region_b_sha256
        p.write_ok = stick.image_sha256(k * write_mb, write_mb) == stick.pattern_a_sha256
    return Measurement(read_mb, write_mb, passes, res, relay_problems, host_load)


def _ratio(value: float | None, base: float | None) -> str:
    return "-" if value is None or not base else f"{value / base:.3f}"


def _rate(mb: int, seconds: float | None) -> str:
    return "-" if not seconds else f"{mb / seconds:.1f}"


def _secs(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}"


def table(m: Measurement) -> str:
    """Markdown: per path the median times, MiB/s and time ratios, then every pass."""
    paths = list(dict.fromkeys(p.path for p in m.passes))
    runs = max((p.run for p in m.passes), default=0) + 1
    med = {path: m.medians(path) for path in paths}
    st, di = med.get("stunnel", (None, None)), med.get("direct", (None, None))
    lines = [
        f"| path | read {m.read_mb} MiB s | read MiB/s | read time vs stunnel | vs direct "
        f"| write {m.write_mb} MiB s | write MiB/s | write time vs stunnel | vs direct "
        "| passes ok |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for path in paths:
        r, w = med[path]
        ok = sum(p.ok for p in m.passes if p.path == path)
        lines.append(
            f"| {path} | {_secs(r)} | {_rate(m.read_mb, r)} | {_ratio(r, st[0])} "
            f"| {_ratio(r, di[0])} | {_secs(w)} | {_rate(m.write_mb, w)} "
            f"| {_ratio(w, st[1])} | {_ratio(w, di[1])} | {ok}/{runs} |"
        )
    lines += [
        "",
        "| run | " + " | ".join(f"{path} read s / write s" for path in paths) + " |",
        "|---:|" + "---:|" * len(paths),
    ]
    for run in range(runs):
        cells = []
        for path in paths:
            p = next(x for x in m.passes if x.run == run and x.path == path)
            cells.append(f"{_secs(p.read_s)} / {_secs(p.write_s)}" + ("" if p.ok else " FAIL"))
        lines.append(f"| {run + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size-mb", type=int, default=256, help="MiB read per pass")
    parser.add_argument("--write-mb", type=int, default=16, help="MiB written per pass")
    parser.add_argument("--paths", nargs="+", choices=PATHS + OPTIONAL_PATHS, default=list(PATHS))
    parser.add_argument(
        "--out", type=Path, default=None, help="work folder kept afterwards (default: temporary)"
    )
    parser.add_argument(
        "--before",
        type=Path,
        default=None,
        metavar="DIR",
        help="also run the gateway pair from DIR/gateway (e.g. a `git worktree` of an "
        "earlier revision), to compare a change side by side",
    )
    args = parser.parse_args(argv)
    if args.before is not None:
        args.paths = [*args.paths, BEFORE]
    if args.runs < 1 or args.size_mb < 1 or args.write_mb < 1:
        parser.error("--runs, --size-mb and --write-mb must be at least 1")
    try:
        image = build_guest()
    except PrerequisiteError as exc:
        print(f"cannot build the guest: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="kernel-storage-") as tmp:
        workdir = args.out or Path(tmp)
        try:
            m = trio.run(
                lambda: measure(
                    image,
                    workdir,
                    runs=args.runs,
                    read_mb=args.size_mb,
                    write_mb=args.write_mb,
                    paths=args.paths,
                    before=args.before,
                )
            )
        except GuestError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(table(m))
        print(f"\n{m.load_summary()}")
        if not m.ok:
            print("\n".join(["FAILED:", *m.problems(), m.guest.diagnosis()]), file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
