"""Byte transports between the gateways: TCP/MPTCP sockets and mutual TLS."""
