"""The per-hop benchmark runs every path, the floor relay included (no timing asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from bench import hops


def test_every_path_answers_and_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trio.run(hops.hops, 20, 1, tmp_path)
    table = capsys.readouterr().out
    for name in ("direct", "python floor", "gateway plain", "gateway mTLS", "stunnel", "socat"):
        assert f"| {name}" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and "µs |" not in line]
    assert len(rows) == 6
