"""The real-kernel storage benchmark (bench/kernel_storage.py) on a small disk, one run:
every path (direct, stunnel pair, gateway pair) attaches the guest's stick, writes its
slot and reads the random region back, and every checksum matches. No timing assertion:
timings are for the benchmark."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench import kernel_storage

from .conftest import Timings
from .image import GuestImage

pytestmark = pytest.mark.realkernel


def test_plan_rotates_the_path_order() -> None:
    assert kernel_storage.plan(3, ("a", "b", "c")) == [
        (0, "a"), (0, "b"), (0, "c"),
        (1, "b"), (1, "c"), (1, "a"),
        (2, "c"), (2, "a"), (2, "b"),
    ]  # fmt: skip


async def test_every_path_reads_and_writes_the_stick(
    guest_image: GuestImage, tmp_path: Path, timings: Timings
) -> None:
    if shutil.which("stunnel") is None:
        pytest.fail("missing stunnel: apt-get install stunnel4 (.ci/run does)", pytrace=False)
    m = await kernel_storage.measure(guest_image, tmp_path, runs=1, read_mb=24, write_mb=4)
    assert [(p.run, p.path) for p in m.passes] == [(0, "direct"), (0, "stunnel"), (0, "gateway")]
    assert not m.relay_problems, m.relay_problems
    for p in m.passes:
        assert p.problem == "", f"{p.path}: {p.problem}\n{m.guest.diagnosis()}"
        assert p.read_ok, f"{p.path}: read checksum differs\n{m.guest.diagnosis()}"
        assert p.write_ok, f"{p.path}: write slot differs in the image\n{m.guest.diagnosis()}"
        assert p.read_s is not None
        assert p.read_s > 0
        assert p.write_s is not None
        assert p.write_s > 0
    m.guest.check()
    assert m.ok
    text = kernel_storage.table(m)
    assert "| gateway |" in text, text
    assert text.count("| 1/1 |") == 3, text
    assert m.host_load, "the host's load average was not sampled"
    print(text)
    print(m.load_summary())
    for p in m.passes:
        timings(f"{p.path}: read {m.read_mb} MiB", p.read_s)
        timings(f"{p.path}: write {m.write_mb} MiB", p.write_s)
