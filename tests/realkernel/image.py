"""Build (and cache) the QEMU guest used by the real-kernel tests.

Everything comes from Debian packages:

* the kernel is the package ``linux-image-amd64`` depends on, fetched with
  ``apt-get download`` and unpacked with ``dpkg-deb -x`` (never installed);
* busybox (``busybox-static``), the usbip tools (``usbip``) with the libraries ``ldd``
  lists, and ``usb.ids`` (``hwdata``) are taken from the host, where
  ``install-deps.sh`` installed them.

The result (``vmlinuz`` + ``initramfs.cpio.gz``) lives in a cache directory keyed on the
kernel package version, the contents of every host file copied in, and a hash of this
module and of the guest's ``/init``; a second run reuses it.

``testusb`` (tools/usb/testusb.c from Debian's ``linux-source``) is built statically on
demand and cached the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
INIT_SCRIPT = HERE / "guest_init.sh"
INSTALL_HINT = "run `bash tests/realkernel/install-deps.sh` (as root) to install them"

# Modules copied into the initramfs (with their dependencies).
MODULES = (
    "virtio_pci",
    "virtio_net",
    "9p",
    "9pnet_virtio",
    "xhci_pci",
    "usb_storage",
    "sd_mod",
    "usbip_host",
    "vhci_hcd",
    "usbhid",
    "hid_generic",
    "evdev",
    "dummy_hcd",
    "configfs",
    "libcomposite",
    "usb_f_ss_lb",
    "usbtest",
)
# Loaded by /init at boot; the others are loaded by the scenario scripts when needed.
BOOT_MODULES = (
    "virtio_pci",
    "virtio_net",
    "9pnet_virtio",
    "9p",
    "xhci_pci",
    "usb_storage",
    "sd_mod",
    "usbip_host",
    "vhci_hcd",
    "usbhid",
    "hid_generic",
    "evdev",
)
HOST_BINARIES = ("/usr/sbin/usbip", "/usr/sbin/usbipd")
BUSYBOX = "/bin/busybox"
USB_IDS = "/usr/share/hwdata/usb.ids"
# Bump when the way testusb is built changes (it is cached on this and linux-source's version).
TESTUSB_BUILD = "gcc -static -O2 -pthread tools/usb/testusb.c; rev 1"
REQUIRED_TOOLS = (
    "qemu-system-x86_64",
    "busybox",
    "usbip",
    "usbipd",
    "modprobe",
    "depmod",
    "cpio",
    "apt-get",
    "apt-cache",
    "dpkg-deb",
)


class PrerequisiteError(RuntimeError):
    """A host tool or package the harness needs is missing."""


@dataclass(frozen=True)
class GuestImage:
    """A built guest: kernel + initramfs, plus what they were built from."""

    kernel: Path
    initramfs: Path
    kernel_version: str
    kernel_package: str
    package_version: str
    key: str
    built_now: bool
    build_seconds: float


def cache_root() -> Path:
    env = os.environ.get("USBIP_GW_GUEST_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "usbip-gateway" / "guest"


def check_prerequisites() -> None:
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    missing += [p for p in (*HOST_BINARIES, BUSYBOX, USB_IDS) if not Path(p).exists()]
    if missing:
        raise PrerequisiteError(
            f"real-kernel tests need {', '.join(missing)} on the host; {INSTALL_HINT}"
        )


def _run(cmd: list[str], **kw: object) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise RuntimeError(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
        )
    out: str = proc.stdout
    return out


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def kernel_package() -> tuple[str, str]:
    """Name and candidate version of the package linux-image-amd64 depends on."""
    try:
        out = _run(["apt-cache", "depends", "linux-image-amd64"])
    except RuntimeError as exc:
        raise PrerequisiteError(
            f"apt-cache cannot resolve linux-image-amd64 (run `apt-get update`): {exc}"
        ) from exc
    m = re.search(r"Depends:\s*(linux-image-[0-9][^\s]*)", out)
    if not m:
        raise PrerequisiteError(f"no linux-image dependency in:\n{out}")
    name = m.group(1)
    policy = _run(["apt-cache", "policy", name])
    vm = re.search(r"Candidate:\s*(\S+)", policy)
    if not vm or vm.group(1) == "(none)":
        raise PrerequisiteError(f"no candidate version for {name} (run `apt-get update`)")
    return name, vm.group(1)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _ldd_libs(binary: str) -> list[str]:
    libs: list[str] = []
    for line in _run(["ldd", binary]).splitlines():
        m = re.search(r"(/\S+)\s+\(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


def _host_files() -> list[str]:
    files = [BUSYBOX, *HOST_BINARIES]
    for b in HOST_BINARIES:
        files += _ldd_libs(b)
    return sorted(set(files))


def build_key(pkg: str, version: str) -> str:
    h = hashlib.sha256()
    h.update(f"{pkg}={version}\n".encode())
    for name in (Path(__file__), INIT_SCRIPT):
        h.update(name.name.encode() + b"\0" + name.read_bytes())
    for f in _host_files():
        h.update(f"{f}={_file_digest(Path(f))}\n".encode())
    h.update(_file_digest(Path(USB_IDS)).encode())
    h.update(",".join(MODULES).encode() + b";" + ",".join(BOOT_MODULES).encode())
    return h.hexdigest()[:20]


def fetch_deb(pkg: str, version: str, dest_dir: Path) -> Path:
    """`apt-get download` pkg=version into dest_dir (reused when already there)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    quoted = version.replace(":", "%3a")
    for cand in dest_dir.glob(f"{pkg}_{quoted}_*.deb"):
        return cand
    with tempfile.TemporaryDirectory(dir=dest_dir) as tmp:
        os.chmod(tmp, 0o755)
        _run(["apt-get", "download", "-q", f"{pkg}={version}"], cwd=tmp)
        debs = list(Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            raise RuntimeError(f"apt-get download {pkg}={version} gave {debs}")
        final = dest_dir / debs[0].name
        debs[0].rename(final)
    return final


def _copy_with_dirs(src: str, root: Path, dest: str | None = None) -> None:
    target = root / (dest or src).lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(os.path.realpath(src), target)


def _resolve_modules(kroot: Path, kver: str) -> list[Path]:
    """Every .ko needed by MODULES, via modprobe --show-depends (soft deps included)."""
    mods: list[Path] = []
    for mod in MODULES:
        out = _run(["modprobe", "-d", str(kroot), "-S", kver, "--show-depends", mod])
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "insmod":
                p = Path(parts[1])
                if p not in mods:
                    mods.append(p)
            elif parts and parts[0] != "builtin":
                raise RuntimeError(f"unexpected modprobe output for {mod}: {line}")
    return mods


def _build_rootfs(root: Path, kroot: Path, kver: str) -> None:
    for d in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "var/run",
        "host",
        "etc",
        "root",
        "mnt",
    ):
        (root / d).mkdir(parents=True, exist_ok=True)
    # busybox and its applets (never a link named busybox to itself).
    _copy_with_dirs(BUSYBOX, root, "/bin/busybox")
    applets = _run([BUSYBOX, "--list-full"]).split()
    for applet in applets:
        link = root / applet
        if link.name == "busybox" or link.exists():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
    # usbip + libraries
    for f in _host_files():
        if f != BUSYBOX:
            _copy_with_dirs(f, root)
    ids = Path(USB_IDS).read_bytes()
    for dest in ("usr/share/hwdata/usb.ids", "usr/share/misc/usb.ids"):
        (root / dest).parent.mkdir(parents=True, exist_ok=True)
        (root / dest).write_bytes(ids)
    # modules
    mroot = kroot / "lib" / "modules" / kver
    for ko in _resolve_modules(kroot, kver):
        rel = ko.relative_to(mroot)
        target = root / "lib" / "modules" / kver / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ko, target)
    for meta in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (mroot / meta).exists():
            shutil.copy2(mroot / meta, root / "lib" / "modules" / kver / meta)
    _run(["depmod", "-b", str(root), kver])
    (root / "etc" / "rk-boot-modules").write_text("\n".join(BOOT_MODULES) + "\n")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    shutil.copy2(INIT_SCRIPT, root / "init")
    (root / "init").chmod(0o755)


def _make_cpio(root: Path, out: Path) -> None:
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    tmp = out.with_suffix(".tmp")
    with tmp.open("wb") as fh:
        cpio = subprocess.Popen(
            ["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"],
            cwd=root,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        gz = subprocess.Popen(["gzip", "-1", "-n"], stdin=cpio.stdout, stdout=fh)
        assert cpio.stdin is not None
        assert cpio.stdout is not None
        cpio.stdout.close()
        cpio.stdin.write(("\n".join([".", *files]) + "\n").encode())
        cpio.stdin.close()
        if cpio.wait() != 0 or gz.wait() != 0:
            raise RuntimeError("cpio/gzip failed building the initramfs")
    tmp.rename(out)


def build_guest(force: bool = False) -> GuestImage:
    """Return the cached guest image, building it first if needed."""

    check_prerequisites()
    pkg, version = kernel_package()
    key = build_key(pkg, version)
    croot = cache_root()
    out_dir = croot / f"image-{key}"
    manifest = out_dir / "manifest.json"
    with _locked(croot / ".lock"):
        if manifest.exists() and not force:
            m = json.loads(manifest.read_text())
            return GuestImage(
                kernel=out_dir / "vmlinuz",
                initramfs=out_dir / "initramfs.cpio.gz",
                kernel_version=m["kernel_version"],
                kernel_package=pkg,
                package_version=version,
                key=key,
                built_now=False,
                build_seconds=0.0,
            )
        t0 = time.monotonic()
        deb = fetch_deb(pkg, version, croot / "debs")
        # Older debs of the same package are superseded; keep the cache small.
        for old in (croot / "debs").glob("linux-image-*.deb"):
            if old != deb:
                old.unlink()
        with tempfile.TemporaryDirectory(dir=croot) as tmp:
            kroot = Path(tmp) / "kernel"
            _run(["dpkg-deb", "-x", str(deb), str(kroot)])
            kvers = sorted(p.name for p in (kroot / "lib" / "modules").iterdir())
            if len(kvers) != 1:
                raise RuntimeError(f"expected one kernel version in {deb}, got {kvers}")
            kver = kvers[0]
            _run(["depmod", "-b", str(kroot), kver])
            root = Path(tmp) / "root"
            _build_rootfs(root, kroot, kver)
            stage = Path(tmp) / "out"
            stage.mkdir()
            shutil.copy2(kroot / "boot" / f"vmlinuz-{kver}", stage / "vmlinuz")
            _make_cpio(root, stage / "initramfs.cpio.gz")
            (stage / "manifest.json").write_text(
                json.dumps(
                    {"kernel_version": kver, "package": pkg, "version": version, "key": key},
                    indent=1,
                )
            )
            if out_dir.exists():
                shutil.rmtree(out_dir)
            stage.rename(out_dir)
        # Drop superseded images.
        for old in croot.glob("image-*"):
            if old != out_dir:
                shutil.rmtree(old, ignore_errors=True)
        return GuestImage(
            kernel=out_dir / "vmlinuz",
            initramfs=out_dir / "initramfs.cpio.gz",
            kernel_version=kver,
            kernel_package=pkg,
            package_version=version,
            key=key,
            built_now=True,
            build_seconds=time.monotonic() - t0,
        )


# --------------------------------------------------------------------------- testusb


def _linux_source_package() -> tuple[str, str]:
    policy = _run(["apt-cache", "policy", "linux-source"])
    vm = re.search(r"Candidate:\s*(\S+)", policy)
    if not vm or vm.group(1) == "(none)":
        raise PrerequisiteError("no candidate for linux-source (run `apt-get update`)")
    depends = _run(["apt-cache", "depends", f"linux-source={vm.group(1)}"])
    m = re.search(r"Depends:\s*(linux-source-[0-9.]+)", depends)
    if not m:
        raise PrerequisiteError(f"cannot find the versioned linux-source package:\n{depends}")
    return m.group(1), vm.group(1)


def build_testusb() -> Path:
    """A static `testusb` built from tools/usb/testusb.c in Debian's linux-source."""
    if shutil.which("gcc") is None:
        raise PrerequisiteError(f"building testusb needs gcc; {INSTALL_HINT}")
    pkg, version = _linux_source_package()
    h = hashlib.sha256(f"{pkg}={version}\n{TESTUSB_BUILD}\n".encode())
    key = h.hexdigest()[:20]
    croot = cache_root()
    out = croot / f"testusb-{key}" / "testusb"
    with _locked(croot / ".lock-testusb"):
        if out.exists():
            return out
        deb = fetch_deb(pkg, version, croot / "debs")
        with tempfile.TemporaryDirectory(dir=croot) as tmp:
            t = Path(tmp)
            _run(["dpkg-deb", "-x", str(deb), str(t / "src")])
            tarballs = list((t / "src" / "usr" / "src").glob("linux-source-*.tar.*"))
            if len(tarballs) != 1:
                raise RuntimeError(f"expected one source tarball in {deb}, got {tarballs}")
            top = tarballs[0].name.split(".tar")[0]
            member = f"{top}/tools/usb/testusb.c"
            _run(["tar", "-xf", str(tarballs[0]), "-C", str(t), member])
            src = t / member
            binary = t / "testusb"
            _run(["gcc", "-static", "-O2", "-Wall", "-pthread", "-o", str(binary), str(src)])
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, out.parent / "testusb.c")
            shutil.copy2(binary, out)
        for old in croot.glob("testusb-*"):
            if old != out.parent:
                shutil.rmtree(old, ignore_errors=True)
        # The source deb is large and only needed once.
        deb.unlink(missing_ok=True)
    return out


if __name__ == "__main__":
    img = build_guest(force=bool(os.environ.get("RK_FORCE")))
    print(img)
