"""File descriptors: make the configured connection limits fit RLIMIT_NOFILE at start.

Each session holds two sockets (the client's and the one upstream) and the eventfd that
wakes its relay threads, each connection in its TLS handshake one; listeners, the event
loop, logs, the audit file, the metrics endpoint and usbipd lookups need a few more.
Running out mid-flight makes `accept` fail for everyone, so the soft limit is raised to
the hard one, and if the sessions still do not fit, `max_connections` is lowered to what
does, with one log line.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass

log = logging.getLogger("gateway.edges.fd_limit")

FDS_PER_SESSION = 3
FDS_PER_HANDSHAKE = 1
RESERVED_FDS = 64


class FdLimitError(Exception):
    """Not even one session fits the file descriptor limit."""


@dataclass(frozen=True, slots=True)
class FdPlan:
    soft: int  # the soft limit to ask for
    max_connections: int  # what fits under it (the configured value when it all fits)
    needed: int  # descriptors the configured limits need


def needed_fds(max_connections: int, max_handshakes: int) -> int:
    return RESERVED_FDS + FDS_PER_HANDSHAKE * max_handshakes + FDS_PER_SESSION * max_connections


def plan(soft: int, hard: int, max_connections: int, max_handshakes: int) -> FdPlan:
    """Pure: the soft limit to set and the sessions that fit, from a (soft, hard) pair."""
    needed = needed_fds(max_connections, max_handshakes)
    if soft == resource.RLIM_INFINITY:
        return FdPlan(soft=soft, max_connections=max_connections, needed=needed)
    # An unlimited hard limit: ask for what is needed (the kernel's nr_open still caps).
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    fits = (target - RESERVED_FDS - FDS_PER_HANDSHAKE * max_handshakes) // FDS_PER_SESSION
    if fits < 1:
        raise FdLimitError(
            f"the file descriptor limit {target} leaves no room for a session next to "
            f"max_handshakes = {max_handshakes}: raise it (systemd: LimitNOFILE=, "
            f"shell: ulimit -n) to at least {needed}"
        )
    capped = min(max_connections, fits)
    return FdPlan(soft=target, max_connections=capped, needed=needed)


def fit_fd_limit(max_connections: int, max_handshakes: int) -> int:
    """Raise the soft RLIMIT_NOFILE; return the max_connections that fits (logged if
    lowered). Raises FdLimitError when not one session fits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = plan(soft, hard, max_connections, max_handshakes)
    if wanted.soft != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted.soft, hard))
        except (OSError, ValueError) as exc:  # e.g. a seccomp filter forbids setrlimit
            log.warning("cannot raise the file descriptor limit from %d: %s", soft, exc)
            wanted = plan(soft, soft, max_connections, max_handshakes)
    if wanted.max_connections < max_connections:
        log.warning(
            "max_connections lowered from %d to %d: the file descriptor limit %d fits no "
            "more (%d needed; raise LimitNOFILE= or ulimit -n)",
            max_connections,
            wanted.max_connections,
            wanted.soft,
            wanted.needed,
        )
    return wanted.max_connections
