"""Device strings from a sysfs-shaped directory."""

from __future__ import annotations

from pathlib import Path

from gateway.policy.sysfs import read_device_strings


def test_reads_strings_and_strips_the_newline(tmp_path: Path) -> None:
    dev = tmp_path / "1-1.2"
    dev.mkdir()
    (dev / "serial").write_text("0123\n")
    (dev / "product").write_bytes("Gadget Zéro\n".encode())
    assert read_device_strings("1-1.2", tmp_path) == {
        "serial": "0123",
        "manufacturer": None,
        "product": "Gadget Zéro",
    }


def test_unknown_device_gives_nothing(tmp_path: Path) -> None:
    assert read_device_strings("9-9", tmp_path) == dict.fromkeys(
        ("serial", "manufacturer", "product")
    )


def test_busid_that_could_escape_is_refused(tmp_path: Path) -> None:
    (tmp_path / "serial").write_text("outside\n")
    inner = tmp_path / "devices"
    inner.mkdir()
    assert read_device_strings("..", inner)["serial"] is None
    assert read_device_strings("../", inner)["serial"] is None
