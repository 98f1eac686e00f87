"""URBs are framed by the device's endpoints, as usbip-host frames them; unknown is refused."""

from __future__ import annotations

import pytest

from gateway.protocol import (
    NEED_DATA,
    NO_ISO_PACKETS,
    CmdSubmit,
    CmdUnlink,
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
    """Descriptors seen; the alt settings not yet known (no SET_CONFIGURATION yet)."""
    trio = imported_trio(enumerate=False)
    control(trio, get_config_setup(9), CONFIG[:9])  # the kernel first reads the header
    control(trio, get_config_setup(len(CONFIG)), CONFIG)
    return trio


def configured() -> Trio:
    trio = enumerated()
    control(trio, setup_packet(0x00, 0x09, 1, 0, 0))
    return trio


def types(trio: Trio, ep: int, direction: Direction) -> set[TransferType | None]:
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
    assert parsed.value == 1
    assert parsed.irregular is None
    assert [(a.interface, a.alternate, len(a.endpoints)) for a in parsed.alts] == [
        (0, 0, 2),
        (1, 0, 1),
        (1, 1, 2),
    ]
    assert parse_configuration(CONFIG[:9]) is None
    assert parse_configuration(CONFIG[:-1]) is None


def test_parser_skips_what_usbcore_skips() -> None:
    """config.c: number 0, reserved address bits, more than bNumEndpoints, duplicates."""
    raw = bytearray(
        config_descriptor(
            1,
            [
                (0, 0, [(0x81, BULK_IN), (0x00, BULK_OUT), (0x92, BULK_OUT), (0x81, ISO_IN)]),
                (1, 0, [(0x81, BULK_IN), (0x03, BULK_OUT)]),
            ],
        )
    )
    parsed = parse_configuration(bytes(raw))
    assert parsed is not None
    first, second = parsed.alts
    assert [e.address for e in first.endpoints] == [0x81]  # 0x00, 0x92 and the 2nd 0x81 skipped
    assert [e.address for e in second.endpoints] == [0x03]  # 0x81 is taken by interface 0
    raw[9 + 4] = 1  # interface 0 now declares one endpoint: usbcore keeps the first only
    parsed = parse_configuration(bytes(raw))
    assert parsed is not None
    assert [e.address for e in parsed.alts[0].endpoints] == [0x81]


def test_irregular_configuration_lets_only_endpoint_zero_through() -> None:
    trio = imported_trio(enumerate=False)
    odd = config_descriptor(1, [(0, 0, [(0x81, BULK_IN)]), (0, 0, [(0x02, BULK_OUT)])])
    parsed = parse_configuration(odd)
    assert parsed is not None
    assert parsed.irregular is not None  # alt setting repeated
    control(trio, get_config_setup(len(odd)), odd)
    control(trio, setup_packet(0x00, 0x09, 1, 0, 0))
    assert types(trio, 1, Direction.IN) == {TransferType.UNKNOWN}
    assert types(trio, 0, Direction.OUT) == {TransferType.CONTROL}


def test_header_only_reply_learns_nothing() -> None:
    trio = imported_trio(enumerate=False)
    control(trio, get_config_setup(9), CONFIG[:9])
    assert types(trio, 1, Direction.IN) == {TransferType.UNKNOWN}


def test_configuration_reply_teaches_what_does_not_depend_on_alt_settings() -> None:
    trio = enumerated()
    assert types(trio, 1, Direction.IN) == {TransferType.BULK}
    assert types(trio, 2, Direction.OUT) == {TransferType.BULK}
    assert types(trio, 3, Direction.IN) == {TransferType.UNKNOWN}  # bulk or iso: which alt?
    assert types(trio, 4, Direction.OUT) == {TransferType.UNKNOWN}  # absent or iso
    assert types(trio, 5, Direction.IN) == {None}  # in no alt setting at all
    assert types(trio, 0, Direction.IN) == {TransferType.CONTROL}


def test_set_configuration_settles_alt_settings_to_zero() -> None:
    trio = configured()
    assert types(trio, 3, Direction.IN) == {TransferType.BULK}
    assert types(trio, 4, Direction.OUT) == {None}


def test_known_bulk_endpoint_refuses_a_packet_count() -> None:
    trio = configured()
    cmd = header_only(1, Direction.IN, 3)
    with pytest.raises(LocalProtocolError, match="number_of_packets 3 on bulk"):
        trio.client.send(cmd)
    trio.splice.receive_data(C, cmd.encode())
    with pytest.raises(RemoteProtocolError, match="number_of_packets 3 on bulk"):
        trio.splice.next_frame(C)


def test_absent_endpoint_is_refused_on_its_header_alone() -> None:
    """usbip-host reads no payload for an endpoint it does not find: the bytes after
    the header would be its next command. The header alone is enough to refuse."""
    trio = configured()
    hidden = CmdUnlink(999, 1, DEVID).encode()
    cmd = CmdSubmit(
        seqnum=41,
        devid=DEVID,
        direction=Direction.OUT,
        ep=4,
        transfer_buffer_length=48,
        data=hidden,
    )
    header = cmd.encode()[:48]
    trio.splice.receive_data(C, header)
    trio.server.receive_data(header)
    with pytest.raises(RemoteProtocolError, match="does not exist on the device"):
        trio.splice.next_frame(C)
    with pytest.raises(RemoteProtocolError, match="does not exist on the device"):
        trio.server.next_event()


def test_set_interface_in_flight_makes_its_endpoints_unknown_until_answered() -> None:
    trio = configured()
    seqnum = next(_seq)
    setup = set_interface_setup(1, 1)
    trio.exchange(C, CmdSubmit(seqnum, DEVID, Direction.OUT, 0, 0, setup=setup))
    assert types(trio, 3, Direction.IN) == {TransferType.UNKNOWN}  # bulk or iso now
    assert types(trio, 1, Direction.IN) == {TransferType.BULK}  # interface 0 untouched
    cmd = header_only(3, Direction.IN, 0)
    trio.splice.receive_data(C, cmd.encode())
    with pytest.raises(RemoteProtocolError, match="not known for certain"):
        trio.splice.next_frame(C)


def test_set_interface_switches_alt_setting_and_back() -> None:
    trio = configured()
    control(trio, set_interface_setup(1, 1))
    assert types(trio, 3, Direction.IN) == {TransferType.ISOCHRONOUS}
    assert types(trio, 4, Direction.OUT) == {TransferType.ISOCHRONOUS}
    assert types(trio, 1, Direction.IN) == {TransferType.BULK}  # interface 0 untouched
    assert parses_as_iso(trio, header_only(3, Direction.IN, 2))
    assert parses_as_iso(trio, header_only(3, Direction.IN, 1024))
    control(trio, set_interface_setup(1, 0))
    assert types(trio, 3, Direction.IN) == {TransferType.BULK}
    assert types(trio, 4, Direction.OUT) == {None}
    assert not parses_as_iso(trio, header_only(3, Direction.IN, 0))


def test_failed_set_interface_leaves_both_alt_settings_possible() -> None:
    """The stub runs usb_set_interface, and if that fails, passes the request on to the
    device: a failed reply does not say which alt setting usbcore has."""
    trio = configured()
    control(trio, set_interface_setup(1, 1), status=-32)
    assert types(trio, 3, Direction.IN) == {TransferType.UNKNOWN}
    assert types(trio, 1, Direction.IN) == {TransferType.BULK}
    control(trio, set_interface_setup(1, 1))
    assert types(trio, 3, Direction.IN) == {TransferType.ISOCHRONOUS}


def test_sysfs_confirmation_decides_after_a_change() -> None:
    """Where the exporting host can be asked (the server gateway's sysfs), it decides."""
    trio = configured()
    trio.splice.state.confirm_layout = lambda: (1, {0: 0, 1: 0})  # the switch did not happen
    control(trio, set_interface_setup(1, 1))
    assert trio.splice.state.transfer_type(3, Direction.IN) is TransferType.BULK
    assert trio.server.state.transfer_type(3, Direction.IN) is TransferType.ISOCHRONOUS


def test_set_configuration_zero_makes_endpoints_absent() -> None:
    trio = configured()
    control(trio, setup_packet(0x00, 0x09, 0, 0, 0))
    assert types(trio, 1, Direction.IN) == {None}
    control(trio, setup_packet(0x00, 0x09, 1, 0, 0))
    assert types(trio, 1, Direction.IN) == {TransferType.BULK}


def test_iso_endpoint_urb_carries_descriptors_end_to_end() -> None:
    trio = configured()
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


def test_iso_submit_with_actual_lengths_is_refused() -> None:
    """usbip_recv_iso: the packets' actual lengths must add up to the new URB's 0."""
    trio = configured()
    control(trio, set_interface_setup(1, 1))
    cmd = CmdSubmit(
        seqnum=78,
        devid=DEVID,
        direction=Direction.OUT,
        ep=4,
        transfer_buffer_length=4,
        number_of_packets=1,
        data=b"1234",
        iso_packets=(IsoPacket(0, 4, 4),),
    )
    trio.splice.receive_data(C, cmd.encode())
    with pytest.raises(RemoteProtocolError, match="report actual lengths"):
        trio.splice.next_frame(C)


def test_scatter_gather_without_buffer_is_refused() -> None:
    trio = configured()
    cmd = CmdSubmit(
        seqnum=79,
        devid=DEVID,
        direction=Direction.IN,
        ep=1,
        transfer_buffer_length=0,
        transfer_flags=0x00040000,
    )
    trio.splice.receive_data(C, cmd.encode())
    with pytest.raises(RemoteProtocolError, match="scatter-gather"):
        trio.splice.next_frame(C)


@pytest.mark.parametrize("number_of_packets", [0, NO_ISO_PACKETS, 1025])
def test_known_iso_endpoint_needs_a_packet_count(number_of_packets: int) -> None:
    trio = configured()
    control(trio, set_interface_setup(1, 1))
    cmd = header_only(3, Direction.IN, number_of_packets)
    with pytest.raises(LocalProtocolError, match=r"ISO packets on isochronous"):
        trio.client.send(cmd)
    trio.server.receive_data(cmd.encode())
    with pytest.raises(RemoteProtocolError, match=r"ISO packets on isochronous .* 1\.\.1024"):
        trio.server.next_event()


@pytest.mark.parametrize("number_of_packets", [0, NO_ISO_PACKETS, 1, 7, 1024])
def test_endpoints_not_yet_learned_are_refused(number_of_packets: int) -> None:
    trio = imported_trio(enumerate=False)
    cmd = header_only(5, Direction.IN, number_of_packets)
    trio.splice.receive_data(C, cmd.encode())
    with pytest.raises(RemoteProtocolError, match="not known for certain"):
        trio.splice.next_frame(C)


def test_endpoint_zero_passes_before_anything_is_learned() -> None:
    trio = imported_trio(enumerate=False)
    control(trio, get_config_setup(9), CONFIG[:9])


def test_malformed_configuration_is_ignored_not_fatal() -> None:
    trio = imported_trio(enumerate=False)
    broken = bytearray(CONFIG)
    broken[9] = 0  # a descriptor of length 0
    control(trio, get_config_setup(len(broken)), bytes(broken))
    assert types(trio, 1, Direction.IN) == {TransferType.UNKNOWN}
