"""A built-in USB/IP server of simulated devices (`usbip-gateway sim`).

It speaks the op and URB protocol of the kernel's usbipd + usbip-host, so the gateway
can be demonstrated, tested and benchmarked without USB hardware, and a real vhci-hcd
can attach its devices.
"""

from .catalog import DEVICE_NAMES, make_devices
from .cli import add_sim_parser
from .descriptors import ConfigurationDescriptor, EndpointDescriptor, InterfaceDescriptor
from .device import DeviceFacts, SimDevice
from .gadget_zero import GADGET_ZERO_PID, GADGET_ZERO_VID, Loopback, SourceSink
from .hid import HidKeyboard
from .server import SimServer, serve_sim
from .urb import Urb, UrbResult

__all__ = [
    "DEVICE_NAMES",
    "GADGET_ZERO_PID",
    "GADGET_ZERO_VID",
    "ConfigurationDescriptor",
    "DeviceFacts",
    "EndpointDescriptor",
    "HidKeyboard",
    "InterfaceDescriptor",
    "Loopback",
    "SimDevice",
    "SimServer",
    "SourceSink",
    "Urb",
    "UrbResult",
    "add_sim_parser",
    "make_devices",
    "serve_sim",
]
