"""Boot the test guest under QEMU (TCG) and run one scenario script in it.

The guest's /init mounts a per-run host folder over 9p on /host, runs /host/run.sh (the
harness writes it: guestlib.sh + parameters + the scenario script), records the script's
exit status in /host/exit-code and powers off. Scenario scripts write key=value results to
/host/results.txt (``rk_result``), so nothing is scraped from the console; the console goes
to ``console.log`` in the same folder and is only read for diagnosis.

Usage (sync)::

    img = build_guest()
    g = Guest(img, workdir, script="rk_result answer 42", devices=[usb_kbd()])
    res = g.run(timeout=120)
    res.check()
    assert res["answer"] == "42"

or ``await g.arun(timeout=120)`` from a trio test.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .image import GuestImage

HERE = Path(__file__).resolve().parent
GUESTLIB = HERE / "guestlib.sh"
QEMU = "qemu-system-x86_64"
KERNEL_PROBLEM = re.compile(
    r"general protection fault|BUG:|Oops|Kernel panic|WARNING:|RIP: |Call Trace|unable to handle"
)


class GuestError(AssertionError):
    """The guest did not finish its script (timeout, crash, failed script, ...)."""


@dataclass(frozen=True)
class QemuDevice:
    """Extra QEMU arguments for one emulated device (plus a short label)."""

    label: str
    args: tuple[str, ...]


def usb_storage(image: Path, drive_id: str = "stick") -> QemuDevice:
    """QEMU's usb-storage stick (46f4:0001) on the xHCI bus, backed by a raw file."""
    return QemuDevice(
        f"usb-storage:{image.name}",
        (
            "-drive",
            f"if=none,id={drive_id},file={image},format=raw,cache=writethrough",
            "-device",
            f"usb-storage,bus=xhci.0,drive={drive_id}",
        ),
    )


def usb_kbd() -> QemuDevice:
    """QEMU's USB keyboard (0627:0001)."""
    return QemuDevice("usb-kbd", ("-device", "usb-kbd,bus=xhci.0"))


def usb_tablet() -> QemuDevice:
    """QEMU's USB tablet (0627:0001 as well, product string differs)."""
    return QemuDevice("usb-tablet", ("-device", "usb-tablet,bus=xhci.0"))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"<{path.name} missing>"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class GuestResult:
    results: dict[str, str]
    exit_code: int | None
    workdir: Path
    wall_seconds: float
    timed_out: bool
    qemu_returncode: int | None
    init_times: dict[str, float] = field(default_factory=dict)

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    @property
    def run_log(self) -> Path:
        return self.workdir / "run.log"

    @property
    def errors(self) -> list[str]:
        return [v for k, v in sorted(self.results.items()) if k.startswith("error_")]

    @property
    def boot_seconds(self) -> float | None:
        """Guest uptime when /init started the scenario script (kernel + modules + net)."""
        return self.init_times.get("ready")

    def kernel_problems(self) -> list[str]:
        """Console lines reporting a kernel oops, BUG, warning or panic."""
        try:
            text = self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [ln for ln in text.splitlines() if KERNEL_PROBLEM.search(ln)]

    def diagnosis(self) -> str:
        return (
            f"guest in {self.workdir}: exit_code={self.exit_code} timed_out={self.timed_out} "
            f"kernel problems: {self.kernel_problems()[:6]}\n"
            f"qemu_rc={self.qemu_returncode} wall={self.wall_seconds:.1f}s\n"
            f"errors: {self.errors}\nresults: {self.results}\n"
            f"--- run.log (tail) ---\n{tail(self.run_log)}\n"
            f"--- console.log (tail) ---\n{tail(self.console_log, 40)}"
        )

    def check(self) -> GuestResult:
        """Raise GuestError unless the script ran to the end with status 0 and no rk_fail."""
        if self.timed_out or self.exit_code != 0 or self.errors:
            raise GuestError(self.diagnosis())
        return self

    def __getitem__(self, key: str) -> str:
        try:
            return self.results[key]
        except KeyError:
            raise GuestError(f"guest result {key!r} missing\n{self.diagnosis()}") from None

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.results.get(key, default)

    def elapsed(self, start: str, end: str) -> float:
        """Seconds between two rk_mark points."""
        return float(self[f"t_{end}"]) - float(self[f"t_{start}"])


class Guest:
    """One boot of the test guest running one scenario script."""

    def __init__(
        self,
        image: GuestImage,
        workdir: Path,
        *,
        script: str,
        devices: Sequence[QemuDevice] = (),
        hostfwd_port: int | None = None,
        params: Mapping[str, str | int] | None = None,
        files: Mapping[str, Path | bytes] | None = None,
        smp: int | None = None,
        memory_mb: int = 512,
        trace: bool = True,
        host_root: bool = False,
        monitor: Path | None = None,
        hostfwd_guest_port: int = 3240,
    ) -> None:
        self.image = image
        self.workdir = workdir
        self.script = script
        self.devices = list(devices)
        self.hostfwd_port = hostfwd_port if hostfwd_port is not None else free_port()
        self.params = dict(params or {})
        self.files = dict(files or {})
        self.smp = smp if smp is not None else int(os.environ.get("USBIP_GW_GUEST_SMP", "2"))
        self.memory_mb = memory_mb
        self.trace = trace
        # host_root: the host's / shared read-only (9p tag "hostroot"), so the guest can run
        # the host's Python (rk_hostroot_mount, rk_hostroot_run in guestlib.sh).
        self.host_root = host_root
        # monitor: a unix socket for QEMU's human monitor (device_add at run time).
        self.monitor = monitor
        self.hostfwd_guest_port = hostfwd_guest_port

    # ------------------------------------------------------------------ preparation
    def prepare(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for stale in ("exit-code", "results.txt", "init-times", "run.log", "console.log"):
            (self.workdir / stale).unlink(missing_ok=True)
        shutil.copy2(GUESTLIB, self.workdir / "guestlib.sh")
        params = {"RK_HOSTFWD_PORT": self.hostfwd_port, **self.params}
        (self.workdir / "params.sh").write_text(
            "".join(f"{k}={shlex.quote(str(v))}\nexport {k}\n" for k, v in params.items())
        )
        for name, content in self.files.items():
            dest = self.workdir / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                shutil.copy2(content, dest)
            else:
                dest.write_bytes(content)
        header = "set -x\n" if self.trace else ""
        (self.workdir / "run.sh").write_text(
            f"{header}. /host/guestlib.sh\n. /host/params.sh\nrk_mark script_start\n{self.script}\n"
        )

    def qemu_command(self) -> list[str]:
        cmd = [
            QEMU,
            "-accel", "tcg",
            "-cpu", "max",
            "-smp", str(self.smp),
            "-m", str(self.memory_mb),
            "-nographic",
            "-no-reboot",
            "-kernel", str(self.image.kernel),
            "-initrd", str(self.image.initramfs),
            "-append", "console=ttyS0 panic=-1 oops=panic loglevel=6",
            "-virtfs",
            f"local,path={self.workdir},mount_tag=host,security_model=none",
            "-netdev",
            f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.hostfwd_port}-:{self.hostfwd_guest_port}",
            "-device", "virtio-net-pci,netdev=n0",
            "-device", "qemu-xhci,id=xhci",
        ]  # fmt: skip
        if self.host_root:
            cmd += [
                "-virtfs",
                "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            ]
        if self.monitor is not None:
            cmd += ["-monitor", f"unix:{self.monitor},server=on,wait=off"]
        for dev in self.devices:
            cmd += dev.args
        return cmd

    # ------------------------------------------------------------------ results
    def _collect(self, wall: float, timed_out: bool, rc: int | None) -> GuestResult:
        results: dict[str, str] = {}
        res_file = self.workdir / "results.txt"
        if res_file.exists():
            for line in res_file.read_text(errors="replace").splitlines():
                if "=" in line:
                    k, v = line.split("=", 1)
                    results[k] = v
        exit_code: int | None = None
        with contextlib.suppress(FileNotFoundError, ValueError):
            exit_code = int((self.workdir / "exit-code").read_text().strip())
        init_times: dict[str, float] = {}
        with contextlib.suppress(FileNotFoundError):
            for line in (self.workdir / "init-times").read_text().splitlines():
                k, _, v = line.partition("=")
                with contextlib.suppress(ValueError):
                    init_times[k] = float(v)
        return GuestResult(results, exit_code, self.workdir, wall, timed_out, rc, init_times)

    # ------------------------------------------------------------------ running
    def run(self, timeout: float) -> GuestResult:
        """Boot, run the script, wait for power-off (QEMU killed after `timeout` s)."""
        self.prepare()
        t0 = time.monotonic()
        timed_out = False
        with (self.workdir / "console.log").open("wb") as log:
            proc = subprocess.Popen(
                self.qemu_command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
            try:
                rc: int | None = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                proc.kill()
                rc = proc.wait()
        return self._collect(time.monotonic() - t0, timed_out, rc)

    async def arun(self, timeout: float) -> GuestResult:
        """Like run(), for trio code: other tasks (gateway processes) keep running."""
        self.prepare()
        t0 = time.monotonic()
        rc: int | None = None
        with (self.workdir / "console.log").open("wb") as log:
            proc = await trio.lowlevel.open_process(
                self.qemu_command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
            try:
                with trio.move_on_after(timeout) as scope:
                    rc = await proc.wait()
            finally:
                if proc.returncode is None:
                    proc.kill()
                    with trio.CancelScope(shield=True):
                        await proc.wait()
        timed_out = scope.cancelled_caught
        if timed_out:
            rc = proc.returncode
        return self._collect(time.monotonic() - t0, timed_out, rc)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "no", "false")
