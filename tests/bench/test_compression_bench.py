"""The compression benchmark runs both pairs end to end (no timing asserted)."""

from __future__ import annotations

import trio

from bench import compression


def test_both_pairs_move_the_mix_and_zstd_shrinks_it() -> None:
    results = trio.run(compression.bench, 1, 2, 3)
    assert set(results) == {"none", "zstd"}
    assert [len(runs) for runs in results.values()] == [1, 1]
    assert results["none"][0].ratio == 1.0
    # 1/2 text and 1/8 zeros compress; the random 3/8 go out raw.
    assert 1.3 < results["zstd"][0].ratio < 3.0
    report = compression.report(results, 1, 2, 3)
    assert "none" in report
    assert "zstd" in report
