"""The server gateway: mutual TLS in, the kernel's usbipd on loopback out.

Per connection: handshake (bounded), the client's identity from its certificate, the op
request read and judged by the policy before usbipd hears of it, then one usbipd
connection relayed frame by frame. An IMPORT reply is checked against what was decided
before it is forwarded, and attached sessions are judged again when the policy reloads.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from gateway.accounting.outcome import Outcome, OutcomeKind, protocol_error
from gateway.accounting.session import Session
from gateway.config import GatewayRole, ServerConfig
from gateway.edges.acceptor import Acceptor, Slot
from gateway.edges.access import AccessControl, PolicyFile, Verdict, rule_summary
from gateway.edges.audit import AuditLog
from gateway.edges.device_facts import NoStrings, StringSource, SysfsLayout, SysfsStrings
from gateway.edges.dialer import Dialer, Link
from gateway.edges.gateway import Gateway
from gateway.edges.reconfigure import take_reloadable
from gateway.edges.reloading import watch
from gateway.observability.metrics import GatewayMetrics
from gateway.observability.reverse import ReverseMetrics
from gateway.policy import DeviceFacts, Target
from gateway.policy.shorthand import shorthand_rules
from gateway.protocol import (
    ConnectionClosed,
    DeviceInfo,
    ExportedDevice,
    Frame,
    OpReplyDevlist,
    OpReplyImport,
    OpRequestImport,
    OpStatus,
    ProtocolError,
    Role,
    Splice,
)
from gateway.relay.budget import BufferBudget
from gateway.relay.pumps import IdleTimeouts, close_all, log_session_end, receive_frame, relay
from gateway.transport.compression import alpn_protocols, compress_if_negotiated
from gateway.transport.credentials import read_revocations
from gateway.transport.identity import IdentityRefused, PeerIdentity, client_identity
from gateway.transport.names import local_name, peer_name
from gateway.transport.sockets import (
    TunedListener,
    close_listeners,
    open_tcp,
    open_tcp_listeners,
    transport_name,
)
from gateway.transport.tls import (
    HandshakeFailed,
    ReloadableContext,
    handshake,
    peer_certificate,
)
from gateway.transport.tls_stream import TlsStream
from gateway.usbip.importer import list_devices

log = logging.getLogger("gateway.edges.server_gateway")

_LOST = (trio.BrokenResourceError, trio.ClosedResourceError)
AUDIT_FLUSH_TIMEOUT = 5.0


class UpstreamUnreachable(Exception):
    pass


@dataclass(eq=False)
class Attached:
    """An imported device in use: what the policy is asked again on reload."""

    session: Session
    identity: PeerIdentity
    device: DeviceFacts
    scope: trio.CancelScope
    revoked: Outcome | None = None


class ServerGateway(Gateway[ServerConfig]):
    log = log

    def __init__(
        self,
        config: ServerConfig,
        *,
        tls: ReloadableContext | None = None,
        strings: StringSource | None = None,
        audit: AuditLog | None = None,
        layouts: SysfsLayout | None = None,
    ) -> None:
        self.config = config
        self.tls = tls or ReloadableContext.server(
            config.tls.cert,
            config.tls.key,
            config.tls.ca,
            min_version=config.tls.version,
            crl=config.tls.crl,
            alpn=alpn_protocols(config.compression.enabled),
        )
        sysfs = config.policy.sysfs
        if strings is None:
            strings = SysfsStrings(sysfs) if sysfs is not None else NoStrings()
        # Where usbip-host's devices are visible, URBs are framed by their own sysfs.
        self.layouts = layouts or (SysfsLayout(sysfs) if sysfs is not None else None)
        self.audit = audit or AuditLog(config.audit.path)
        self.metrics = GatewayMetrics.for_server(config)
        shorthand = shorthand_rules(
            config.policy.allow_cn, config.policy.allow_uri, config.policy.allow_dns
        )
        self.access = AccessControl(
            PolicyFile(config.policy.file, shorthand),
            strings,
            self.audit,
            self._list_upstream,
            on_decision=self.metrics.record_policy_decision,
        )
        self.sessions: dict[int, Session] = {}
        self.attached: dict[int, Attached] = {}
        self.buffers = BufferBudget(config.resources.max_buffered_bytes)
        self.metrics.track_buffers(self.buffers)
        self._track_expiry()
        self.acceptor = Acceptor(
            "server gateway",
            self.handle,
            config.max_connections,
            self.metrics.connection_refused,
            max_handshakes=config.resources.max_handshakes,
            max_handshakes_per_source=config.resources.max_handshakes_per_source,
        )
        self.dialers = self._dialers(config)
        if config.policy.file is None and shorthand:
            log.info("policy from the --allow-* shorthands: %s", shorthand.strip())
        elif config.policy.file is None:
            log.warning(
                "no policy file: every client with a valid certificate may list and "
                "import every device"
            )

    def _dialers(self, config: ServerConfig) -> list[Dialer]:
        """Reverse mode: one dialer per client gateway to dial out to."""
        reverse = config.reverse
        if not reverse.dial:
            return []
        # The same certificate, now as a TLS client: it needs the clientAuth usage too.
        self.dial_tls = ReloadableContext.client(
            config.tls.cert,
            config.tls.key,
            config.tls.ca,
            min_version=config.tls.version,
            crl=config.tls.crl,
            alpn=alpn_protocols(config.compression.enabled),
        )
        reverse_metrics = ReverseMetrics(self.metrics, tuple(str(a) for a in reverse.dial))
        dialers = [
            Dialer(
                target,
                reverse,
                self.dial_tls,
                connect_timeout=config.connect_timeout,
                handshake_timeout=config.handshake_timeout,
                mptcp=config.transport.mptcp,
                identify=self.identify,
                adopt=self._adopt,
                metrics=self.metrics,
                reverse_metrics=reverse_metrics,
            )
            for target in reverse.dial
        ]
        self.metrics.status_sections["reverse"] = lambda: [d.status() for d in dialers]
        return dialers

    def _adopt(self, link: Link) -> bool:
        serve = partial(
            self.serve_connection,
            link.stream,
            link.identity,
            link.address,
            link.transport,
            dialer="server",
        )
        return self.acceptor.adopt(serve, link.address)

    def tls_contexts(self) -> list[ReloadableContext]:
        return [self.tls] + ([self.dial_tls] if self.dialers else [])

    # -- lifecycle

    def _connection_sources(self) -> Sequence[Callable[[], Awaitable[None]]]:
        return [dialer.run for dialer in self.dialers]

    async def _open_listeners(self) -> list[TunedListener]:
        listeners: list[TunedListener] = []
        if self.dialers and not self.config.reverse.also_listen:
            return listeners  # reverse mode: nothing to accept
        try:
            for address in self.config.listen:
                listeners.extend(
                    await open_tcp_listeners(
                        address.host, address.port, mptcp=self.config.transport.mptcp
                    )
                )
        except BaseException:
            await close_listeners(listeners)  # those of the addresses before
            raise
        return listeners

    def _describe(self, listener: TunedListener) -> str:
        return f"{local_name(listener)} (mutual TLS), usbipd at {self.config.upstream}"

    async def _start_services(self, nursery: trio.Nursery) -> None:
        await nursery.start(self.audit.run)
        if self.config.policy.watch:  # no file yet: a reload may name one
            nursery.start_soon(self.watch_policy)

    async def _after_drain(self) -> None:
        """Flush the audit log: every session's end is in it."""
        self.audit.close()
        with trio.move_on_after(AUDIT_FLUSH_TIMEOUT):
            await self.audit.finished.wait()

    def reload_policy(self, path: Path | None = None) -> bool:
        """Reload the policy file (from `path`, if its path changed in the configuration);
        judge attached sessions again. False: the old one kept."""
        if not self.access.policy.reload(path):
            return False
        for attached in list(self.attached.values()):
            decision = self.access.recheck(attached.identity, attached.device)
            if decision.target is not Target.ALLOW:
                self._revoke(
                    attached, f"access revoked by policy reload ({rule_summary(decision)})"
                )
        return True

    def _tls_reloaded(self) -> None:
        """Attached sessions whose client certificate the CRL now revokes are closed, as
        a policy reload closes the ones it denies (`policy.revoke_on_reload`)."""
        crl = self.tls.files.crl
        if crl is None or not self.attached:
            return
        revocations = read_revocations(crl, self.tls.files.ca)
        for attached in list(self.attached.values()):
            if revocations.revokes(attached.identity):
                self._revoke(
                    attached,
                    f"client certificate revoked (serial {attached.identity.serial:x} in the "
                    f"CRL {os.fspath(crl)})",
                )

    def _reload_more(self, config: ServerConfig | None) -> None:
        path = None
        if config is not None:
            path = config.policy.file
            if path is None and self.config.policy.file is not None:
                log.error(
                    "policy.file is no longer set: running without a policy needs a restart; "
                    "keeping %s",
                    self.config.policy.file,
                )
                path = self.config.policy.file
            else:
                self.config = take_reloadable(self.config, config, "policy")
        self.reload_policy(path)

    def _revoke(self, attached: Attached, why: str) -> None:
        """Close an attached session that is no longer allowed, or say it stays open."""
        session = attached.session
        closing = self.config.policy.revoke_on_reload
        if closing:
            log.warning("closing session %d: %s", session.id, why)
            attached.revoked = Outcome(OutcomeKind.DENIED, why)
            attached.scope.cancel()
        else:
            log.warning(
                "session %d now denied, left open (revoke_on_reload off): %s", session.id, why
            )
        self.audit.record(
            "session_revoked",
            client=attached.identity.as_dict(),
            address=session.address,
            device={"busid": session.busid},
            reason=why,
            closed=closing,
        )

    async def watch_policy(self) -> None:
        """Reload the policy whenever its file changes."""
        await watch(self.access.policy.files, self.config.policy.watch_interval, self.reload_policy)

    # -- one connection

    async def handle(self, stream: trio.SocketStream, slot: Slot) -> None:
        address = peer_name(stream)
        transport = transport_name(stream)
        tls_stream = TlsStream.over(stream, self.tls.current, server_side=True)
        try:
            await handshake(tls_stream, self.config.handshake_timeout)
        except HandshakeFailed as exc:
            self.metrics.handshake_failed(exc.reason)
            log.warning("TLS handshake from %s failed: %s", address, exc)
            await trio.aclose_forcefully(tls_stream)
            return
        self.metrics.handshake_succeeded()
        if not slot.promote():  # every session place taken meanwhile (counted, logged)
            await trio.aclose_forcefully(tls_stream)
            return
        identity = self.identify(tls_stream, address)
        if identity is None:
            await trio.aclose_forcefully(tls_stream)
            return
        await self.serve_connection(tls_stream, identity, address, transport, dialer="client")

    async def serve_connection(
        self,
        tls_stream: TlsStream,
        identity: PeerIdentity,
        address: str,
        transport: str,
        *,
        dialer: GatewayRole,
    ) -> None:
        """One session on a verified connection, whichever gateway opened it: `dialer`
        "client" (accepted here) or "server" (dialed out from here, reverse mode)."""
        session = Session("server", str(identity), address, time.time())
        session.transport = transport
        session.dialer = dialer
        client = compress_if_negotiated(
            tls_stream, level=self.config.compression.level, on_bytes=self.metrics.compressed
        )
        session.compression = "none" if client is tls_stream else "zstd"
        log.debug(
            "session %d from %s (connection dialed by the %s gateway): %s, compression %s",
            session.id,
            identity,
            dialer,
            session.transport,
            session.compression,
        )
        self.sessions[session.id] = session
        self.metrics.session_started(session)
        try:
            await self._serve_session(client, identity, session)
        finally:
            await close_all(client)
            self.metrics.session_ended(session)
            log_session_end(log, session)
            self.audit.record(
                "session_end",
                client=identity.as_dict(),
                address=address,
                dialer=dialer,
                request=session.request,
                device={"busid": session.busid},
                outcome=session.outcome.detail,
                urbs=session.urbs_submitted,
                bytes_from_client=session.bytes_from_client,
                bytes_from_server=session.bytes_from_server,
                duration_seconds=round(time.time() - session.started, 3),
            )
            del self.sessions[session.id]

    def identify(self, stream: TlsStream, address: str) -> PeerIdentity | None:
        """The client's identity, or None (logged, audited, counted) if its certificate
        is not one: before a session exists, so nothing of it reaches usbipd."""
        try:
            return client_identity(peer_certificate(stream))
        except IdentityRefused as exc:
            self.metrics.identity_refused(exc.reason)
            log.warning(
                "refused the client certificate from %s (sha256 %s): %s: %s",
                address,
                exc.fingerprint_sha256,
                exc.reason,
                exc.detail,
            )
            self.audit.record(
                "identity_refused",
                address=address,
                reason=exc.reason,
                detail=exc.detail,
                fingerprint_sha256=exc.fingerprint_sha256,
            )
            return None

    async def _serve_session(
        self, client: trio.abc.Stream, identity: PeerIdentity, session: Session
    ) -> None:
        splice = Splice(self.config.limits, cut_through=True)
        try:
            with trio.fail_after(self.config.request_timeout):
                request = await receive_frame(splice, Role.CLIENT, client)
        except trio.TooSlowError:
            session.outcome = Outcome(
                OutcomeKind.TIMEOUT, f"no request within {self.config.request_timeout:g}s"
            )
        except ProtocolError as exc:
            session.outcome = protocol_error(Role.CLIENT, exc)
        except _LOST:
            session.outcome = Outcome(
                OutcomeKind.CONNECTION_LOST, "connection lost before the request"
            )
        else:
            if isinstance(request, ConnectionClosed):
                session.outcome = Outcome(OutcomeKind.CLOSED, "closed by client before a request")
            elif splice.buffered(Role.CLIENT):
                # A client speaks again only after the reply (`usbip` never pipelines):
                # whatever follows the request is refused, never forwarded.
                session.observe(Role.CLIENT, request, trio.current_time())
                session.outcome = protocol_error(
                    Role.CLIENT,
                    f"{splice.buffered(Role.CLIENT)} bytes after the op request, before its reply",
                )
            else:
                session.observe(Role.CLIENT, request, trio.current_time())
                if isinstance(request.event, OpRequestImport):
                    await self._import(client, identity, session, splice, request)
                else:
                    await self._devlist(client, identity, session, splice, request)
                return
        await close_all(client)

    async def _devlist(
        self,
        client: trio.abc.Stream,
        identity: PeerIdentity,
        session: Session,
        splice: Splice,
        request: Frame,
    ) -> None:
        async def answer(upstream: trio.abc.Stream, reply: Frame) -> None:
            assert isinstance(reply.event, OpReplyDevlist)
            devices = reply.event.devices
            shown = self.access.visible(identity, session.address, devices)
            # Encoded afresh even when nothing was left out: whatever quirk usbipd's own
            # bytes have, a hidden device and an absent one give the same reply.
            ok = reply.event.status == OpStatus.OK
            await client.send_all(splice.replace(reply, OpReplyDevlist(shown)) if ok else reply.raw)
            session.outcome = Outcome(
                OutcomeKind.LISTED, f"listed {len(shown)} of {len(devices)} devices"
            )

        refusal = OpReplyDevlist(status=OpStatus.ERROR)
        await self._exchange(client, session, splice, request, refusal=refusal, answer=answer)

    async def _import(
        self,
        client: trio.abc.Stream,
        identity: PeerIdentity,
        session: Session,
        splice: Splice,
        request: Frame,
    ) -> None:
        try:
            verdict = await self.access.judge_import(identity, session.address, session.busid)
        except UpstreamUnreachable:
            await self._refuse(client, splice, OpReplyImport(OpStatus.ERROR))
            session.outcome = Outcome(
                OutcomeKind.UPSTREAM_UNREACHABLE, "usbipd unreachable while looking up the device"
            )
            return
        if not verdict.allowed:
            session.outcome = Outcome(
                OutcomeKind.DENIED,
                f"import {verdict.decision.target.name.lower()}ed by policy "
                f"({rule_summary(verdict.decision)})",
            )
            await self._refuse(client, splice, OpReplyImport(verdict.refusal))
            return

        async def answer(upstream: trio.abc.Stream, reply: Frame) -> None:
            assert isinstance(reply.event, OpReplyImport)
            if reply.event.device is None:
                await client.send_all(reply.raw)  # usbipd's own refusal, as it is
                return
            facts = self._confirm(verdict, identity, session, reply)
            refusal = None
            if facts is None:
                refusal = Outcome(
                    OutcomeKind.DENIED, "device changed between decision and import; refused"
                )
            elif not self._load_layout(splice, reply.event.device):
                refusal = Outcome(
                    OutcomeKind.REFUSED,
                    "device layout in sysfs unreadable or not the imported device",
                )
            if refusal is not None or facts is None:
                session.outcome = refusal or Outcome(OutcomeKind.DENIED, "refused")
                # Answered as a device that is not there; closing usbipd's socket (on
                # return) frees the device. Not through the splice: it has seen usbipd's
                # OK, and nothing more goes through this session.
                await client.send_all(OpReplyImport(OpStatus.NODEV).encode())
                return
            await client.send_all(reply.raw)
            await self._attached_relay(
                client=client,
                upstream=upstream,
                identity=identity,
                session=session,
                splice=splice,
                facts=facts,
            )

        refusal = OpReplyImport(OpStatus.ERROR)
        await self._exchange(client, session, splice, request, refusal=refusal, answer=answer)

    async def _exchange(
        self,
        client: trio.abc.Stream,
        session: Session,
        splice: Splice,
        request: Frame,
        *,
        refusal: OpReplyImport | OpReplyDevlist,
        answer: Callable[[trio.abc.Stream, Frame], Awaitable[None]],
    ) -> None:
        """Forward the op request to usbipd and hand its reply to `answer`; every way it
        can fail becomes the session's outcome; both ends are closed at the end."""
        upstream = await self._connect_upstream(session)
        if upstream is None:
            await self._refuse(client, splice, refusal)
            return
        what = "DEVLIST" if isinstance(refusal, OpReplyDevlist) else "IMPORT"
        try:
            await upstream.send_all(request.raw)
            with trio.fail_after(self.config.request_timeout):
                reply = await receive_frame(splice, Role.SERVER, upstream)
            if isinstance(reply, ConnectionClosed):
                session.outcome = Outcome(
                    OutcomeKind.CONNECTION_LOST,
                    f"usbipd closed without answering the {what} request",
                )
                return
            session.observe(Role.SERVER, reply, trio.current_time())
            await answer(upstream, reply)
        except ProtocolError as exc:
            session.outcome = protocol_error(Role.SERVER, exc, sender="usbipd")
        except trio.TooSlowError:
            session.outcome = Outcome(
                OutcomeKind.TIMEOUT, f"usbipd did not answer the {what} request"
            )
        except _LOST as exc:
            session.outcome = Outcome(OutcomeKind.CONNECTION_LOST, f"connection lost: {exc}")
        finally:
            await close_all(client, upstream)

    def _confirm(
        self, verdict: Verdict, identity: PeerIdentity, session: Session, reply: Frame
    ) -> DeviceFacts | None:
        """The facts of the device usbipd handed over, if it is the one decided on."""
        assert isinstance(reply.event, OpReplyImport)
        assert reply.event.device is not None
        info = reply.event.device
        if verdict.listed is not None and verdict.device is not None:
            # The whole 312-byte record: ids, class, bus and device numbers (a replugged
            # device is enumerated anew), configuration, number of interfaces.
            if info == verdict.listed:
                return verdict.device
        elif info.busid == session.busid:
            # Allowed by client and bus id alone, and not in usbipd's listing (it was in
            # use, or freed since): whatever device this is, the policy allows it.
            return self.access.record_facts(info)
        self.access.changed_device(identity, session.address, verdict, info)
        return None

    def _load_layout(self, splice: Splice, device: DeviceInfo) -> bool:
        """Tie the device's endpoint layout, as usbcore here holds it, to this session.

        From sysfs where the device is visible (the authoritative source); where it is
        not (usbipd on another host or in a VM), the codec learns it from the session's
        own descriptors and lets only endpoint 0 through until then. A device that sysfs
        shows but cannot be read consistently is refused.
        """
        layouts = self.layouts
        if layouts is None or not layouts.present(device.busid):
            log.debug("%s: no sysfs view, endpoints learned in the session", device.busid)
            return True
        seen = layouts.read(device.busid, device.busnum, device.devnum)
        if seen is None:
            log.warning("%s: sysfs descriptors unreadable or of another device", device.busid)
            return False
        state = splice.state
        state.layout.load(seen.configurations, seen.active, seen.alternates)
        state.confirm_layout = partial(layouts.current, device.busid)
        return True

    async def _attached_relay(
        self,
        *,
        client: trio.abc.Stream,
        upstream: trio.abc.Stream,
        identity: PeerIdentity,
        session: Session,
        splice: Splice,
        facts: DeviceFacts,
    ) -> None:
        with trio.CancelScope() as scope:
            attached = Attached(session, identity, facts, scope)
            self.attached[session.id] = attached
            try:
                await relay(
                    splice,
                    client,
                    upstream,
                    session,
                    budget=self.buffers,
                    # The op phase is behind us (bounded by request_timeout).
                    idle=IdleTimeouts(attached=self.config.attached_idle_timeout),
                )
            finally:
                del self.attached[session.id]
        if attached.revoked is not None:
            session.outcome = attached.revoked

    # -- usbipd

    async def _open_upstream(self) -> trio.SocketStream:
        up = self.config.upstream
        try:
            stream = await open_tcp(up.host, up.port, connect_timeout=self.config.connect_timeout)
        except (OSError, trio.TooSlowError):
            self.metrics.upstream_connect_failed()
            raise
        self.metrics.upstream_connected()
        return stream

    async def _connect_upstream(self, session: Session) -> trio.SocketStream | None:
        try:
            return await self._open_upstream()
        except OSError as exc:
            session.outcome = Outcome(
                OutcomeKind.UPSTREAM_UNREACHABLE,
                f"usbipd at {self.config.upstream} unreachable: {exc}",
            )
            log.error("cannot reach usbipd at %s: %s", self.config.upstream, exc)
            return None

    async def _list_upstream(self) -> tuple[ExportedDevice, ...]:
        """The gateway's own DEVLIST query, to learn a device's facts before an IMPORT."""
        try:
            with trio.fail_after(self.config.request_timeout):
                return await list_devices(await self._open_upstream(), self.config.limits)
        except (OSError, ConnectionError, ProtocolError, trio.TooSlowError, *_LOST) as exc:
            log.error("cannot list usbipd's devices at %s: %s", self.config.upstream, exc)
            raise UpstreamUnreachable(str(exc)) from exc

    async def _refuse(
        self, client: trio.abc.Stream, splice: Splice, reply: OpReplyImport | OpReplyDevlist
    ) -> None:
        with suppress(*_LOST):
            await client.send_all(splice.inject(Role.SERVER, reply))
        await close_all(client)
