"""What one read forwards: exactly the frames that passed, uncopied where it can."""

from __future__ import annotations

from gateway.protocol import CmdSubmit, Direction, Frame, ProtocolError, Role
from gateway.relay.pumps import cut_frames

from ..protocol.helpers import DEVID, imported_trio

C = Role.CLIENT


def _out(seqnum: int, size: int) -> bytes:
    return CmdSubmit(seqnum, DEVID, Direction.OUT, 1, size, data=bytes(size)).encode()


def _cut(splice_data: list[bytes]) -> tuple[list[bytes], list[Frame], ProtocolError | None]:
    trio = imported_trio(cut_through=True)
    seen: list[Frame] = []
    passed: list[bytes] = []
    error = None
    for data in splice_data:
        out, closed, error, _held = cut_frames(
            trio.splice, C, data, lambda _s, frame, _t: seen.append(frame), 0.0
        )
        assert not closed
        passed.append(bytes(out))
        if error is not None:
            break
    return passed, seen, error


def test_a_frame_refused_by_the_state_is_not_passed_on() -> None:
    """The second frame reuses an in-flight seqnum: its header parses, the state refuses
    it, and of the read only the first frame goes through."""
    good, dup = _out(1, 100), _out(1, 100)
    passed, seen, error = _cut([good + dup])
    assert error is not None
    assert "already in flight" in str(error)
    assert passed == [good]
    assert len(seen) == 1


def test_whole_reads_are_passed_on_uncopied_and_pieces_in_order() -> None:
    first, second = _out(1, 70_000), _out(2, 10)
    stream = first + second
    reads = [stream[:30], stream[30:50_000], stream[50_000:]]
    passed, seen, error = _cut(reads)
    assert error is None
    assert b"".join(passed) == stream
    # A header cut in two is held until whole; everything after it passes as it comes.
    assert passed == [b"", stream[:50_000], stream[50_000:]]
    assert sum(len(f.raw) for f in seen) == len(stream)


def test_the_read_itself_is_forwarded_when_all_of_it_passed() -> None:
    trio = imported_trio(cut_through=True)
    data = _out(5, 4096) + _out(6, 4096)
    out, _, error, held = cut_frames(trio.splice, C, data, lambda *_: None, 0.0)
    assert error is None
    assert out is data
    assert held == 0
