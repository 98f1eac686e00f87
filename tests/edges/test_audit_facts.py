"""The audit log's writer and the sysfs string reader."""

from __future__ import annotations

import json
from pathlib import Path

import trio

from gateway.edges.audit import AuditLog
from gateway.edges.device_facts import DeviceStrings, SysfsStrings, publish_sysfs


async def test_audit_records_are_json_lines_in_order(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(audit.run)
        for i in range(5):
            audit.record("decision", n=i, client={"cn": "alice"})
        audit.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["n"] for r in records] == [0, 1, 2, 3, 4]
    assert all(r["event"] == "decision" and r["time"].endswith("Z") for r in records)
    assert audit.written == 5


async def test_a_full_audit_queue_drops_instead_of_blocking(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl", queue_size=2)
    # No writer running: the queue fills, and record() still returns at once.
    for i in range(5):
        audit.record("decision", n=i)
    assert audit.dropped == 3


async def test_disabled_audit_writes_nothing() -> None:
    audit = AuditLog(None)
    audit.record("decision", n=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(audit.run)
    assert audit.written == 0
    assert audit.dropped == 0


def test_sysfs_strings_round_trip_and_missing_ones(tmp_path: Path) -> None:
    publish_sysfs(tmp_path, "1-1.4", DeviceStrings("SN1", "ACME", "Widget"))
    publish_sysfs(tmp_path, "2-1", DeviceStrings(serial=None, manufacturer="X"))
    source = SysfsStrings(tmp_path)
    assert source.strings("1-1.4") == DeviceStrings("SN1", "ACME", "Widget")
    assert source.strings("2-1") == DeviceStrings(None, "X", None)
    assert source.strings("9-9") == DeviceStrings()


def test_sysfs_reader_refuses_paths_outside_its_root(tmp_path: Path) -> None:
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "serial").write_text("do not read\n")
    source = SysfsStrings(tmp_path / "devices")
    assert source.strings("../secret") == DeviceStrings()
