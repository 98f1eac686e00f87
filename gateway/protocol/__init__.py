"""Sans-I/O USB/IP: bytes in, typed events out; events in, bytes out. No sockets, no clock."""

from .connection import NEED_DATA, Connection, Frame, NeedData, Splice
from .constants import (
    DEFAULT_PORT,
    ECONNRESET,
    NO_ISO_PACKETS,
    Direction,
    OpCode,
    OpStatus,
    Speed,
    TransferType,
    UrbCommand,
)
from .descriptors import Configuration, Setup, parse_configuration, split_descriptors
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .events import (
    CmdSubmit,
    CmdUnlink,
    ConnectionClosed,
    Event,
    IsoPacket,
    OpReplyDevlist,
    OpReplyImport,
    OpRequestDevlist,
    OpRequestImport,
    RetSubmit,
    RetUnlink,
    UrbEvent,
)
from .layout import DeviceLayout
from .records import DeviceInfo, ExportedDevice, InterfaceInfo, check_busid
from .state import Limits, PendingUrb, Phase, ProtocolState, Role

__all__ = [
    "DEFAULT_PORT",
    "ECONNRESET",
    "NEED_DATA",
    "NO_ISO_PACKETS",
    "CmdSubmit",
    "CmdUnlink",
    "Configuration",
    "Connection",
    "ConnectionClosed",
    "DeviceInfo",
    "DeviceLayout",
    "Direction",
    "Event",
    "ExportedDevice",
    "Frame",
    "InterfaceInfo",
    "IsoPacket",
    "Limits",
    "LocalProtocolError",
    "NeedData",
    "OpCode",
    "OpReplyDevlist",
    "OpReplyImport",
    "OpRequestDevlist",
    "OpRequestImport",
    "OpStatus",
    "PendingUrb",
    "Phase",
    "ProtocolError",
    "ProtocolState",
    "RemoteProtocolError",
    "RetSubmit",
    "RetUnlink",
    "Role",
    "Setup",
    "Speed",
    "Splice",
    "TransferType",
    "UrbCommand",
    "UrbEvent",
    "check_busid",
    "parse_configuration",
    "split_descriptors",
]
