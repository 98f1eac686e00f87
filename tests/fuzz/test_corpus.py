"""The committed seed corpus: up to date, clean under every invariant, and complete.

Runs without atheris: the targets are plain functions (fuzz/targets.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz.make_corpus import SEEDS, write_corpus
from fuzz.targets import (
    HARNESSES,
    LIMITS,
    FuzzFailure,
    check_bounds,
    frame_bound,
    trace_splice,
)
from gateway.protocol import (
    CmdSubmit,
    CmdUnlink,
    OpReplyDevlist,
    OpReplyImport,
    OpRequestDevlist,
    OpRequestImport,
    Phase,
    RetSubmit,
    RetUnlink,
    Role,
)

CORPUS = Path(__file__).parents[2] / "fuzz" / "corpus"


def test_committed_corpus_has_every_generated_seed(tmp_path: Path) -> None:
    # Other files may sit beside them: inputs from findings, kept as regressions.
    write_corpus(tmp_path)
    for harness in SEEDS:
        for seed in (tmp_path / harness).iterdir():
            committed = CORPUS / harness / seed.name
            assert committed.exists(), f"run `python -m fuzz.make_corpus` ({committed} missing)"
            assert committed.read_bytes() == seed.read_bytes(), f"{committed} is stale"


@pytest.mark.parametrize("harness", sorted(HARNESSES))
def test_every_seed_passes_its_target(harness: str) -> None:
    seeds = sorted((CORPUS / harness).iterdir())
    assert seeds, f"no seeds in {CORPUS / harness}"
    for seed in seeds:
        HARNESSES[harness](seed.read_bytes())


def test_splice_seeds_cover_every_message_iso_and_unlinks() -> None:
    seen: set[str] = set()
    for seed in (CORPUS / "splice").iterdir():
        for _, event in trace_splice(seed.read_bytes()):
            seen.add(event if isinstance(event, str) else type(event).__name__)
            if isinstance(event, CmdSubmit | RetSubmit) and event.iso_packets:
                seen.add(f"iso-{type(event).__name__}")
            if isinstance(event, RetUnlink):
                seen.add(f"RetUnlink{event.status}")
    expected = {
        t.__name__
        for t in (
            OpRequestDevlist,
            OpReplyDevlist,
            OpRequestImport,
            OpReplyImport,
            CmdSubmit,
            RetSubmit,
            CmdUnlink,
            RetUnlink,
        )
    }
    expected |= {"iso-CmdSubmit", "iso-RetSubmit", "RetUnlink0", "RetUnlink-104", "closed", "error"}
    assert expected <= seen, f"corpus lacks {expected - seen}"


def test_the_invariants_can_fire() -> None:
    # A check that cannot fail proves nothing: a reader holding a whole URB frame's
    # worth at NEED_DATA, or one URB over the pending limit, is reported.
    bound = frame_bound(Phase.URB, Role.CLIENT, LIMITS)
    check_bounds(Phase.URB, Role.CLIENT, bound - 1, LIMITS.max_pending_urbs)
    with pytest.raises(FuzzFailure, match="reader holds"):
        check_bounds(Phase.URB, Role.CLIENT, bound, 0)
    with pytest.raises(FuzzFailure, match="reader holds"):
        check_bounds(Phase.DONE, Role.SERVER, 1, 0)
    with pytest.raises(FuzzFailure, match="in flight"):
        check_bounds(Phase.URB, Role.SERVER, 0, LIMITS.max_pending_urbs + 1)
