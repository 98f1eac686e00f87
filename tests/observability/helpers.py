"""A session fed with frames built by the codec, at clock readings the test chooses."""

from __future__ import annotations

from gateway.accounting.session import Session
from gateway.config import MetricsSettings
from gateway.observability.metrics import GatewayMetrics
from gateway.protocol import (
    NEED_DATA,
    CmdSubmit,
    Connection,
    DeviceInfo,
    Direction,
    Event,
    Frame,
    OpReplyImport,
    OpRequestImport,
    OpStatus,
    RetSubmit,
    Role,
    Splice,
)

from ..protocol.helpers import config_descriptor, device, get_config_setup

BULK_IN, BULK_OUT, ISO_IN = 0x81, 0x02, 0x83
CONFIG = config_descriptor(1, [(0, 0, [(BULK_IN, 2), (BULK_OUT, 2), (ISO_IN, 1)])])


class Wire:
    """Client and server codec ends and a relay's Splice, with one observed Session."""

    def __init__(
        self,
        metrics: GatewayMetrics,
        *,
        info: DeviceInfo | None = None,
        role: str = "server",
    ) -> None:
        self.metrics = metrics
        self.info = info or device()
        self.client = Connection(Role.CLIENT)
        self.server = Connection(Role.SERVER)
        self.splice = Splice()
        self.session = Session(role, "spiffe://test/client", "127.0.0.1:40000", 0.0)
        metrics.session_started(self.session)
        self._seqnums = iter(range(1, 1_000_000))

    def send(self, sender: Role, event: Event, now: float) -> Frame:
        raw = (self.client if sender is Role.CLIENT else self.server).send(event)
        receiver = self.server if sender is Role.CLIENT else self.client
        receiver.receive_data(raw)
        assert receiver.next_event() == event
        self.splice.receive_data(sender, raw)
        frame = self.splice.next_frame(sender)
        assert isinstance(frame, Frame)
        assert self.splice.next_frame(sender) is NEED_DATA
        self.session.observe(sender, frame, now)
        return frame

    def seqnum(self) -> int:
        return next(self._seqnums)

    def import_device(self, *, learn_endpoints: bool = True) -> None:
        self.send(Role.CLIENT, OpRequestImport(self.info.busid), 0.0)
        self.send(Role.SERVER, OpReplyImport(OpStatus.OK, self.info), 0.0)
        if learn_endpoints:
            # GET_DESCRIPTOR(configuration), as enumeration does: endpoint types are learned.
            seq = self.seqnum()
            self.submit(seq, 0, Direction.IN, len(CONFIG), 0.0, setup=get_config_setup(len(CONFIG)))
            self.complete(seq, 0.0, data=CONFIG)

    def submit(
        self,
        seqnum: int,
        ep: int,
        direction: Direction,
        length: int,
        now: float,
        **kw: object,
    ) -> Frame:
        data = bytes(length) if direction == Direction.OUT else b""
        event = CmdSubmit(
            seqnum=seqnum,
            devid=self.info.devid,
            direction=direction,
            ep=ep,
            transfer_buffer_length=length,
            data=data,
            **kw,  # type: ignore[arg-type]
        )
        return self.send(Role.CLIENT, event, now)

    def complete(self, seqnum: int, now: float, *, data: bytes = b"", **kw: object) -> Frame:
        actual = kw.pop("actual_length", len(data))
        event = RetSubmit(seqnum=seqnum, actual_length=actual, data=data, **kw)  # type: ignore[arg-type]
        return self.send(Role.SERVER, event, now)


def new_metrics(role: str = "server", **settings: object) -> GatewayMetrics:
    return GatewayMetrics(role, MetricsSettings(**settings))  # type: ignore[arg-type]


def sample(metrics: GatewayMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)
