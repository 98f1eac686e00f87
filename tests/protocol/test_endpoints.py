"""Endpoint transfer types learned from enumeration decide which URBs are isochronous."""

from __future__ import annotations

import pytest

from gateway.protocol import (
    NEED_DATA,
    NO_ISO_PACKETS,
    CmdSubmit,
    Direction,
    IsoPacket,
    LocalProtocolError,
    RemoteProtocolError,
    RetSubmit,
    Role,
    TransferType,
    parse_configuration,
)

from .helpers import (
    DEVID,
    Trio,
    config_descriptor,
    get_config_setup,
    imported_trio,
    set_interface_setup,
    setup_packet,
)

C, S = Role.CLIENT, Role.SERVER
ISO_IN, BULK_IN, BULK_OUT, ISO_OUT = 0x01, 0x02, 0x02, 0x01

# interface 0: bulk 0x81/0x02; interface 1 alt 0: 0x83 bulk, alt 1: 0x83 iso + 0x04 iso
CONFIG = config_descriptor(
    1,
    [
        (0, 0, [(0x81, BULK_IN), (0x02, BULK_OUT)]),
        (1, 0, [(0x83, BULK_IN)]),
        (1, 1, [(0x83, ISO_IN | 0x04), (0x04, ISO_OUT)]),
    ],
)
_seq = iter(range(1000, 100000, 3))


def control(trio: Trio, setup: bytes, reply: bytes = b"", status: int = 0) -> None:
    seqnum = next(_seq)
    is_in = bool(setup[0] & 0x80)
    length = int.from_bytes(setup[6:8], "little")
    trio.exchange(
        C,
        CmdSubmit(
            seqnum=seqnum,
            devid=DEVID,
            direction=Direction.IN if is_in else Direction.OUT,
            ep=0,
            transfer_buffer_length=length,
            setup=setup,
            data=b"" if is_in else bytes(length),
        ),
    )
    trio.exchange(S, RetSubmit(seqnum, status=status, actual_length=len(reply), data=reply))


def enumerated() -> Trio:
    trio = imported_trio()
    control(trio, get_config_setup(9), CONFIG[:9])  # the kernel first reads the header
    control(trio, get_config_setup(len(CONFIG)), CONFIG)
    return trio


def types(trio: Trio, ep: int, direction: Direction) -> set[TransferType]:
    return {e.state.transfer_type(ep, direction) for e in (trio.client, trio.server, trio.splice)}


def header_only(ep: int, direction: Direction, number_of_packets: int) -> CmdSubmit:
    """A non-ISO-shaped CMD_SUBMIT: nothing but the header on the wire."""
    return CmdSubmit(
        seqnum=next(_seq),
        devid=DEVID,
        direction=direction,
        ep=ep,
        transfer_buffer_length=0,
        number_of_packets=number_of_packets,
    )


def parses_as_iso(trio: Trio, cmd: CmdSubmit) -> bool:
    """Feed a header-only CMD_SUBMIT to the server: an ISO URB waits for its descriptors."""
    trio.server.receive_data(cmd.encode())
    trio.splice.receive_data(C, cmd.encode())
    server_event, splice_frame = trio.server.next_event(), trio.splice.next_frame(C)
    assert (server_event is NEED_DATA) == (splice_frame is NEED_DATA)
    if server_event is not NEED_DATA:
        return False
    descriptors = bytes(16 * cmd.number_of_packets)
    trio.server.receive_data(descriptors)
    trio.splice.receive_data(C, descriptors)
    server_event, splice_frame = trio.server.next_event(), trio.splice.next_frame(C)
    assert len(server_event.iso_packets) == cmd.number_of_packets  # type: ignore[union-attr]
    assert splice_frame.raw == cmd.encode() + descriptors  # type: ignore[union-attr]
    return True


def test_configuration_parser_reads_alt_settings() -> None:
    parsed = parse_configuration(CONFIG)
    assert parsed is not None
    value, alts = parsed
    assert value == 1
    assert [(a.interface, a.alternate, len(a.endpoints)) for a in alts] == [
        (0, 0, 2),
        (1, 0, 1),
        (1, 1, 2),
    ]
    assert parse_configuration(CONFIG[:9]) is None
    assert parse_configuration(CONFIG[:-1]) is None


def test_header_only_reply_learns_nothing() -> None:
    trio = imported_trio()
    control(trio, get_config_setup(9), CONFIG[:9])
    assert types(trio, 1, Direction.IN) == {TransferType.UNKNOWN}


def test_configuration_reply_teaches_endpoint_types() -> None:
    trio = enumerated()
    assert types(trio, 1, Direction.IN) == {TransferType.BULK}
    assert types(trio, 2, Direction.OUT) == {TransferType.BULK}
    assert types(trio, 3, Direction.IN) == {TransferType.BULK}
    assert types(trio, 4, Direction.OUT) == {TransferType.UNKNOWN}  # alt 1 not active
    assert types(trio, 0, Direction.IN) == {TransferType.CONTROL}


def test_known_bulk_endpoint_is_not_iso_whatever_number_of_packets_says() -> None:
    trio = enumerated()
    cmd = header_only(1, Direction.IN, 3)
    assert not parses_as_iso(trio, cmd)
    assert trio.server.state.pending[cmd.seqnum].iso is False


def test_set_interface_switches_alt_setting_and_back() -> None:
    trio = enumerated()
    control(trio, set_interface_setup(1, 1))
    assert types(trio, 3, Direction.IN) == {TransferType.ISOCHRONOUS}
    assert types(trio, 4, Direction.OUT) == {TransferType.ISOCHRONOUS}
    assert types(trio, 1, Direction.IN) == {TransferType.BULK}  # interface 0 untouched
    assert parses_as_iso(trio, header_only(3, Direction.IN, 2))
    assert parses_as_iso(trio, header_only(3, Direction.IN, 1024))
    control(trio, set_interface_setup(1, 0))
    assert types(trio, 3, Direction.IN) == {TransferType.BULK}
    assert types(trio, 4, Direction.OUT) == {TransferType.UNKNOWN}
    assert not parses_as_iso(trio, header_only(3, Direction.IN, 2))


def test_failed_set_interface_changes_nothing() -> None:
    trio = enumerated()
    control(trio, set_interface_setup(1, 1), status=-32)
    assert types(trio, 3, Direction.IN) == {TransferType.BULK}


def test_set_configuration_zero_forgets_endpoints() -> None:
    trio = enumerated()
    control(trio, setup_packet(0x00, 0x09, 0, 0, 0))
    assert types(trio, 1, Direction.IN) == {TransferType.UNKNOWN}
    control(trio, setup_packet(0x00, 0x09, 1, 0, 0))
    assert types(trio, 1, Direction.IN) == {TransferType.BULK}


def test_iso_endpoint_urb_carries_descriptors_end_to_end() -> None:
    trio = enumerated()
    control(trio, set_interface_setup(1, 1))
    packets = (IsoPacket(0, 4), IsoPacket(4, 4))
    cmd = CmdSubmit(
        seqnum=77,
        devid=DEVID,
        direction=Direction.OUT,
        ep=4,
        transfer_buffer_length=8,
        number_of_packets=2,
        data=b"12345678",
        iso_packets=packets,
    )
    trio.exchange(C, cmd)
    assert {e.state.pending[77].iso for e in (trio.client, trio.server, trio.splice)} == {True}
    done = tuple(IsoPacket(p.offset, p.length, 4) for p in packets)
    trio.exchange(S, RetSubmit(77, actual_length=8, number_of_packets=2, iso_packets=done))


@pytest.mark.parametrize("number_of_packets", [0, NO_ISO_PACKETS])
def test_known_iso_endpoint_needs_a_packet_count(number_of_packets: int) -> None:
    trio = enumerated()
    control(trio, set_interface_setup(1, 1))
    cmd = header_only(3, Direction.IN, number_of_packets)
    with pytest.raises(LocalProtocolError, match="without a packet count"):
        trio.client.send(cmd)
    trio.server.receive_data(cmd.encode())
    with pytest.raises(RemoteProtocolError, match=r"ISO packets is outside 1\.\.1024"):
        trio.server.next_event()


@pytest.mark.parametrize(
    ("number_of_packets", "iso"),
    [(0, False), (NO_ISO_PACKETS, False), (1, True), (7, True), (1024, True)],
)
def test_fallback_on_unknown_endpoints(number_of_packets: int, iso: bool) -> None:
    trio = imported_trio()
    assert parses_as_iso(trio, header_only(5, Direction.IN, number_of_packets)) is iso


def test_malformed_configuration_is_ignored_not_fatal() -> None:
    trio = imported_trio()
    broken = bytearray(CONFIG)
    broken[9] = 0  # a descriptor of length 0
    control(trio, get_config_setup(len(broken)), bytes(broken))
    assert types(trio, 1, Direction.IN) == {TransferType.UNKNOWN}
