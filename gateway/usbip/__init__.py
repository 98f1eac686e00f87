"""A USB/IP importer/lister in userspace (what `usbip list/attach` and vhci do):
used by the server gateway to list usbipd's devices, the agent, the demo and tests."""
