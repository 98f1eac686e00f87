"""Programs beside the gateways: the exporter (binds devices to usbip-host), the
agent (attaches devices on the client), and DNS-SD discovery."""
