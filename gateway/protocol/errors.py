"""Protocol errors, split like h11's: who broke the rules decides the class."""

from __future__ import annotations


class ProtocolError(Exception):
    """The byte stream or an event violates USB/IP."""


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol forbids: a bug on our side."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids, or over a configured limit."""
