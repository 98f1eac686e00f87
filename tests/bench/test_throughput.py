"""The path benchmark on a tiny grid: every path runs, every URB is verified, no errors.

No timing assertions: this checks that the harness works, not how fast anything is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench import throughput


def test_tiny_grid_runs_every_path(tmp_path: Path) -> None:
    missing = [tool for tool in ("stunnel", "socat") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: apt-get install stunnel4 socat (.ci/run does)")
    args = throughput.argparse.Namespace(
        full=False,
        paths=list(throughput.PATHS),
        sizes=[512, 65536],
        depths=[1, 4],
        runs=1,
        seconds=0.1,
        direction="mixed",
        latency_urbs=50,
        sessions=3,
        session_seconds=0.3,
        out=tmp_path,
    )
    assert throughput.run(args) == 0
    raw = json.loads((tmp_path / "results.json").read_text())
    paths = raw["paths"]
    assert len(paths) == len(throughput.PATHS)
    for name, fig in paths.items():
        assert fig["errors"] == 0, name
        assert fig["urbs"] > 0, name
        assert fig["verified"] >= fig["urbs"], name
        assert fig["unlinks_ok"] == 50, name
        assert fig["sessions"] == 3, name
        assert fig["session_failures"] == [], name
        assert fig["sessions_mib_s"] > 0, name
        for point in ("512/1", "512/4", "65536/1", "65536/4"):
            (speed,) = fig["throughput"][point]
            assert speed > 0, (name, point)
        assert fig["rtt_p50_us"][0] <= fig["rtt_p99_us"][0], name
    relays = [f for n, f in paths.items() if n != "direct"]
    assert all(len(f["peak_rss_mib"]) == 2 and min(f["peak_rss_mib"]) > 0 for f in relays)
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {name} |" in table for name in paths)
