"""The Sender's transport file: written for one or two legs, read back, refused when it
does not describe a USB/IP TCP server."""

from __future__ import annotations

import pytest

from gateway.nmos.sdp import Leg, SdpError, make_sdp, parse_sdp


def test_one_leg() -> None:
    text = make_sdp([Leg("192.0.2.10", 3240)], session_id=7, version=1, label="lab")
    lines = text.split("\r\n")
    assert "m=application 3240 TCP usb" in lines
    assert "c=IN IP4 192.0.2.10" in lines
    assert "a=setup:passive" in lines
    assert not any(line.startswith(("a=group", "a=mid")) for line in lines)
    assert parse_sdp(text) == [Leg("192.0.2.10", 3240)]


def test_two_mptcp_legs_are_a_dup_group() -> None:
    legs = [Leg("192.0.2.10", 3240), Leg("2001:db8::10", 3240)]
    text = make_sdp(legs, session_id=7, version=1, label="lab")
    lines = text.split("\r\n")
    assert "a=group:DUP 1 2" in lines
    assert lines.count("a=setup:passive") == 2
    assert [line for line in lines if line.startswith("a=mid")] == ["a=mid:1", "a=mid:2"]
    assert "c=IN IP6 2001:db8::10" in lines
    assert parse_sdp(text) == legs


def test_a_session_level_address_serves_every_leg() -> None:
    text = "v=0\nc=IN IP4 192.0.2.1\nm=application 4000 TCP usb\n"
    assert parse_sdp(text) == [Leg("192.0.2.1", 4000)]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("v=0\nc=IN IP4 192.0.2.1\nm=video 5004 RTP/AVP 96\n", "not a TCP application"),
        ("v=0\nc=IN IP4 192.0.2.1\nm=application 5004 TCP hid\n", "is not 'usb'"),
        ("v=0\nm=application 5004 TCP usb\n", "without a connection address"),
        ("v=0\nc=IN IP4 server.example\nm=application 5004 TCP usb\n", "not an IP address"),
        ("v=0\nc=IN IP4 192.0.2.1\nm=application 70000 TCP usb\n", "out of range"),
        ("v=0\n", "no media description"),
        ("hello\n", "not an SDP line"),
        ("v=0\n" + "a=x\n" * 5000, "over"),
    ],
)
def test_refused_with_the_reason(text: str, why: str) -> None:
    with pytest.raises(SdpError, match=why):
        parse_sdp(text)
