"""The relay-thread benchmark runs its three variants and reports each (no timing asserted)."""

from __future__ import annotations

import sys

import pytest

from bench import relay_thread


def test_every_variant_relays_and_is_reported(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["relay_thread", "--urbs", "200", "--runs", "1"])
    relay_thread.main()
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| ") and "µs |" not in line]
    assert len(rows) == 3
    for row in rows:
        cpu, rtt = (float(cell) for cell in row.strip("| ").split(" | ")[1:])
        assert cpu > 0
        assert rtt > 0
    # The variant without parsing is restored afterwards: the real cut_frames is back.
    assert relay_thread.pumps.cut_frames.__module__ == "gateway.relay.pumps"
