"""A bounded coverage-guided run of every harness, as CI does; any finding fails.

Each harness runs in its own process (libFuzzer exits the process on a finding), from
the committed seed corpus, for FUZZ_SECONDS seconds. New inputs go to a temporary
directory, never into the committed corpus. Longer runs: docs/fuzzing.md.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz.targets import HARNESSES

ROOT = Path(__file__).parents[2]
CORPUS = ROOT / "fuzz" / "corpus"
FUZZ_SECONDS = int(os.environ.get("USBIP_GW_FUZZ_SECONDS", "20"))


@pytest.fixture(scope="module")
def atheris_installed() -> None:
    if importlib.util.find_spec("atheris") is None:
        pytest.fail("the fuzzing tests need atheris: python3 -m pip install atheris")


@pytest.mark.parametrize("harness", sorted(HARNESSES))
def test_bounded_fuzz_run_finds_nothing(
    harness: str, tmp_path: Path, atheris_installed: None
) -> None:
    new_inputs = tmp_path / "new"
    new_inputs.mkdir()
    command = [
        sys.executable,
        "-m",
        "fuzz.run",
        harness,
        f"-max_total_time={FUZZ_SECONDS}",
        "-rss_limit_mb=1024",
        "-timeout=10",
        "-print_final_stats=1",
        f"-artifact_prefix={tmp_path}/",
        str(new_inputs),
        str(CORPUS / harness),
    ]
    result = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=FUZZ_SECONDS + 120,
        check=False,
    )
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    report = f"{harness}: exit {result.returncode}, artifacts {crashes}\n{result.stderr[-6000:]}"
    assert not crashes, report
    assert result.returncode == 0, report
    stats = [line for line in result.stderr.splitlines() if line.startswith("stat::")]
    runs = next(int(line.split()[-1]) for line in stats if "number_of_executed_units" in line)
    print(f"{harness}: {runs} executions in {FUZZ_SECONDS}s, no findings")
    assert runs > 100, f"{harness} hardly ran:\n{result.stderr[-3000:]}"
