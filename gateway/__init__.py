"""usbip-gateway: a mutual-TLS gateway pair for Linux USB/IP."""

__version__ = "0.1.0"
