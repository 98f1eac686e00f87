"""Round-trip-time buckets shared by the Prometheus histogram and the per-session sketch.

One `bisect` per completed URB places the RTT in a fine log bucket (a quarter octave,
about 19 % wide) from 20 µs to 10.49 s; the Prometheus bucket (one octave) follows from
that index by arithmetic, so the hot path pays for one lookup, not two.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

RTT_BASE = 20e-6  # seconds: the first bucket's upper bound
FINE_PER_OCTAVE = 4
OCTAVES = 19  # 20 µs * 2**19 = 10.48576 s

#: Upper bounds ("le") of the fine buckets; a last, open bucket holds anything longer.
FINE_BOUNDS: tuple[float, ...] = tuple(
    RTT_BASE * 2.0 ** (k / FINE_PER_OCTAVE) for k in range(OCTAVES * FINE_PER_OCTAVE + 1)
)
#: Upper bounds of the Prometheus histogram buckets: every fourth fine bound.
BUCKETS: tuple[float, ...] = FINE_BOUNDS[::FINE_PER_OCTAVE]
FINE_SLOTS = len(FINE_BOUNDS) + 1
SLOTS = len(BUCKETS) + 1


def fine_index(rtt: float) -> int:
    """The fine bucket of `rtt`: bucket k holds FINE_BOUNDS[k-1] < rtt <= FINE_BOUNDS[k]."""
    return bisect_left(FINE_BOUNDS, rtt)


def coarse_index(fine: int) -> int:
    """The Prometheus bucket holding everything in fine bucket `fine`."""
    return (fine + FINE_PER_OCTAVE - 1) // FINE_PER_OCTAVE


def quantile(counts: Sequence[int], q: float) -> float | None:
    """Estimate the `q` quantile from fine-bucket counts; None without samples.

    Within a bucket the estimate is interpolated geometrically, so its error is under
    one bucket width (about 19 %). Past the last bound the last bound is returned.
    """
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for k, n in enumerate(counts):
        if n and seen + n >= rank:
            if k >= len(FINE_BOUNDS):
                return FINE_BOUNDS[-1]
            upper = FINE_BOUNDS[k]
            lower = FINE_BOUNDS[k - 1] if k else upper / 2.0 ** (1 / FINE_PER_OCTAVE)
            fraction = max(0.0, min(1.0, (rank - seen) / n))
            return float(lower * (upper / lower) ** fraction)
        seen += n
    return FINE_BOUNDS[-1]  # pragma: no cover - rank <= total always lands above


class RttSketch:
    """A fixed-size RTT histogram for one session: percentiles without keeping samples."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts = [0] * FINE_SLOTS

    @property
    def samples(self) -> int:
        return sum(self.counts)

    def quantile(self, q: float) -> float | None:
        return quantile(self.counts, q)
