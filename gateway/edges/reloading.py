"""Reloading what lives in files: the TLS material and the policy, on SIGHUP or on change.

Kubernetes and cert-manager replace mounted files by swapping a symlink, so a change is
judged on what `os.stat` sees through links: modification time, size and inode.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import trio

from gateway.config import TLSSettings
from gateway.transport.tls import ReloadableContext, TLSConfigError, TLSFiles

log = logging.getLogger("gateway.reload")

Signature = tuple[int, int, int] | None


class FileSignatures:
    """Notices when any of some files changed since it last looked."""

    def __init__(self, paths: Iterable[Path | None]) -> None:
        self.paths = tuple(p for p in paths if p is not None)
        self._seen = self._read()

    def retarget(self, paths: Iterable[Path | None]) -> None:
        """Look at other files from now on (their paths changed in the configuration)."""
        self.paths = tuple(p for p in paths if p is not None)
        self._seen = self._read()

    def _read(self) -> tuple[Signature, ...]:
        return tuple(_signature(p) for p in self.paths)

    def changed(self) -> bool:
        """True once per change: what it sees now becomes what it has seen."""
        now = self._read()
        if now == self._seen:
            return False
        self._seen = now
        return True


def _signature(path: Path) -> Signature:
    try:
        stat = os.stat(path)
    except OSError:
        return None  # missing for a moment while being replaced; the next look sees it
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


def reload_tls(tls: ReloadableContext, files: TLSFiles | None = None) -> bool:
    """Rebuild the TLS context for new connections, from `files` if given (their paths
    changed in the configuration); a bad file keeps the old one."""
    try:
        tls.reload(files)
    except TLSConfigError as exc:
        log.error("TLS reload failed, keeping the previous certificates: %s", exc)
        return False
    log.info("reloaded TLS certificates (generation %d)", tls.generation)
    return True


async def watch(files: FileSignatures, interval: float, on_change: Callable[[], object]) -> None:
    """Call `on_change` after each change to `files`, looking every `interval` seconds."""
    while True:
        await trio.sleep(interval)
        if files.changed():
            on_change()


def tls_files(settings: TLSSettings) -> TLSFiles:
    return TLSFiles(settings.cert, settings.key, settings.ca, settings.crl)


def _paths(files: TLSFiles) -> tuple[Path | None, ...]:
    return tuple(
        None if p is None else Path(p) for p in (files.cert, files.key, files.ca, files.crl)
    )


async def watch_tls(
    tls: ReloadableContext,
    settings: TLSSettings,
    on_change: Callable[[], object] | None = None,
) -> None:
    """Reload certificates, key, CA and CRL when any of them changes on disk (by default
    with `reload_tls`). The files watched are those in force: a reload with other paths
    moves the watch to them."""
    files = FileSignatures(_paths(tls.files))
    while True:
        await trio.sleep(settings.watch_interval)
        paths = _paths(tls.files)
        if files.paths != tuple(p for p in paths if p is not None):
            files.retarget(paths)  # loaded just now, by whoever changed the paths
        elif files.changed():
            if on_change is None:
                reload_tls(tls)
            else:
                on_change()
