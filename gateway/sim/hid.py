"""A boot-protocol HID keyboard whose interrupt IN URB waits for injected key events."""

from __future__ import annotations

import struct

from ..protocol import Direction, Setup, Speed, TransferType
from .descriptors import (
    DT_HID,
    DT_REPORT,
    ConfigurationDescriptor,
    EndpointDescriptor,
    InterfaceDescriptor,
)
from .device import GET_DESCRIPTOR, OK, RECIP_INTERFACE, SimDevice
from .fifo import ChunkFifo
from .urb import STALL, Urb, UrbResult

PID_CODES_VID = 0x1209  # pid.codes, whose test PIDs suit simulated devices
PID_CODES_TEST_PID = 0x0001

HID_CLASS, BOOT_SUBCLASS, KEYBOARD_PROTOCOL = 3, 1, 1

# HID class requests (HID 1.11 section 7.2)
GET_REPORT, GET_IDLE, GET_PROTOCOL = 0x01, 0x02, 0x03
SET_REPORT, SET_IDLE, SET_PROTOCOL = 0x09, 0x0A, 0x0B

REPORT_SIZE = 8
MAX_QUEUED_REPORTS = 256

# The boot keyboard report descriptor of HID 1.11 appendix E.6: modifiers, reserved
# byte, six key codes in; five LEDs out.
BOOT_KEYBOARD_REPORT_DESCRIPTOR = bytes.fromhex(
    "05010906a101"  # Usage Page (Generic Desktop), Usage (Keyboard), Collection
    "050719e029e71500250175019508 8102"  # modifiers: 8 x 1 bit
    "950175088101"  # reserved byte
    "95057501050819012905 9102"  # LEDs: 5 x 1 bit out
    "950175039101"  # LED padding
    "95067508150025650507190029658100"  # six key codes
    "c0"
)

_HID_DESCRIPTOR = struct.Struct("<BBHBBBH")


def keyboard_report(*keys: int, modifiers: int = 0) -> bytes:
    """An 8-byte boot report: modifier bits, a reserved byte, up to six usage IDs."""
    if len(keys) > 6:
        raise ValueError("a boot keyboard report holds at most six keys")
    return bytes((modifiers, 0, *keys)).ljust(REPORT_SIZE, b"\0")


class HidKeyboard(SimDevice):
    """Full speed, one interface (HID boot keyboard), interrupt IN 0x81."""

    def __init__(
        self,
        *,
        busid: str = "1-3",
        devnum: int = 4,
        busnum: int = 1,
        serial: str = "SIM-KB-0001",
    ) -> None:
        hid = _HID_DESCRIPTOR.pack(
            _HID_DESCRIPTOR.size,
            DT_HID,
            0x0111,  # bcdHID 1.11
            0,  # not localized
            1,
            DT_REPORT,
            len(BOOT_KEYBOARD_REPORT_DESCRIPTOR),
        )
        # State reset() needs, set before super().__init__ calls it.
        self.reports = ChunkFifo()
        self.current_report = keyboard_report()
        self.leds = self.idle = 0
        self.protocol = 1  # report protocol until the host asks for boot
        interrupt_in = EndpointDescriptor(0x81, TransferType.INTERRUPT, REPORT_SIZE, 10)
        interface = InterfaceDescriptor(
            0,
            0,
            HID_CLASS,
            BOOT_SUBCLASS,
            KEYBOARD_PROTOCOL,
            endpoints=(interrupt_in,),
            extra=hid,
        )
        super().__init__(
            busid=busid,
            busnum=busnum,
            devnum=devnum,
            speed=Speed.FULL,
            vendor_id=PID_CODES_VID,
            product_id=PID_CODES_TEST_PID,
            manufacturer="usbip-gateway",
            product="Boot keyboard (simulated)",
            serial=serial,
            # bus powered, remote wakeup, 100 mA
            configurations=[ConfigurationDescriptor(1, (interface,), 0xA0, 50)],
        )
        self._hid_descriptor = hid

    def reset(self) -> None:
        super().reset()
        self.reports.clear()
        self.current_report = keyboard_report()
        self.leds = self.idle = 0
        self.protocol = 1

    def inject(self, report: bytes) -> None:
        """Queue one input report for the interrupt IN endpoint; the oldest pending URB
        completes with it. Reports beyond MAX_QUEUED_REPORTS are dropped."""
        if len(report) != REPORT_SIZE:
            raise ValueError(f"a boot keyboard report is {REPORT_SIZE} bytes")
        if self.reports.chunks < MAX_QUEUED_REPORTS:
            self.reports.put_nowait(report)
        self.current_report = report

    def press(self, *keys: int, modifiers: int = 0) -> None:
        """A key press followed by its release, as two reports."""
        self.inject(keyboard_report(*keys, modifiers=modifiers))
        self.inject(keyboard_report())

    async def handle_transfer(self, urb: Urb, endpoint: EndpointDescriptor) -> UrbResult:
        if urb.direction != Direction.IN:
            return STALL
        return UrbResult(data=await self.reports.get(urb.length))

    async def handle_control(self, setup: Setup, data: bytes) -> UrbResult | None:
        if setup.recipient != RECIP_INTERFACE or setup.index & 0xFF != 0:
            return None
        if setup.kind == 0:
            if setup.request == GET_DESCRIPTOR and setup.is_in:
                kind = setup.value >> 8
                if kind == DT_REPORT:
                    return UrbResult(data=BOOT_KEYBOARD_REPORT_DESCRIPTOR)
                if kind == DT_HID:
                    return UrbResult(data=self._hid_descriptor)
            return None
        if setup.kind != 1:
            return None
        return self._class_request(setup, data)

    def _class_request(self, setup: Setup, data: bytes) -> UrbResult | None:
        request = setup.request
        if setup.is_in:
            if request == GET_REPORT:
                return UrbResult(data=self.current_report)
            if request == GET_IDLE:
                return UrbResult(data=bytes((self.idle,)))
            if request == GET_PROTOCOL:
                return UrbResult(data=bytes((self.protocol,)))
            return None
        if request == SET_REPORT:
            if data:
                self.leds = data[0]
            return OK
        if request == SET_IDLE:
            self.idle = setup.value >> 8
            return OK
        if request == SET_PROTOCOL and setup.value in (0, 1):
            self.protocol = setup.value
            return OK
        return None
