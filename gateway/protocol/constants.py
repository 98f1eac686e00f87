"""Numbers from the wire: codes, statuses, sizes and the kernel's own caps."""

from __future__ import annotations

import enum
import struct

USBIP_VERSION = 0x0111
DEFAULT_PORT = 3240

# usbip_common.h: a non-ISO URB carries number_of_packets 0 (Linux vhci) or this
# (usbip-win2 and usbipd-win); neither means isochronous.
NO_ISO_PACKETS = 0xFFFFFFFF

OP_HEADER = struct.Struct(">HHI")  # version, code, status
URB_HEADER_SIZE = 48
ISO_DESCRIPTOR = struct.Struct(">IIii")  # offset, length, actual_length, status (-errno)
BUSID_SIZE = 32
PATH_SIZE = 256

# The kernel stub refuses more (USBIP_MAX_ISO_PACKETS); we refuse them earlier.
KERNEL_MAX_ISO_PACKETS = 1024

# transfer_flags bit of a scatter-gather URB (include/uapi/linux/usbip.h).
URB_DMA_MAP_SG = 0x00040000

ECONNRESET = 104


class OpCode(enum.IntEnum):
    REQ_DEVLIST = 0x8005
    REP_DEVLIST = 0x0005
    REQ_IMPORT = 0x8003
    REP_IMPORT = 0x0003


class OpStatus(enum.IntEnum):
    """Op reply statuses used by current usbip tools (usbip_network.h)."""

    OK = 0
    NA = 1
    DEV_BUSY = 2
    DEV_ERR = 3
    NODEV = 4
    ERROR = 5


class UrbCommand(enum.IntEnum):
    CMD_SUBMIT = 1
    CMD_UNLINK = 2
    RET_SUBMIT = 3
    RET_UNLINK = 4


class Direction(enum.IntEnum):
    OUT = 0
    IN = 1


class TransferType(enum.IntEnum):
    """bmAttributes & 3 of an endpoint descriptor; UNKNOWN until a descriptor is seen."""

    CONTROL = 0
    ISOCHRONOUS = 1
    BULK = 2
    INTERRUPT = 3
    UNKNOWN = 4


class Speed(enum.IntEnum):
    """enum usb_device_speed, as carried in the device record."""

    UNKNOWN = 0
    LOW = 1
    FULL = 2
    HIGH = 3
    WIRELESS = 4
    SUPER = 5
    SUPER_PLUS = 6
