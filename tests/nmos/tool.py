"""AMWA's NMOS test tool (nmos-testing), laid out offline from the bundle beside the
repository (`../shared/vendor/nmos`) and run as a subprocess against a gateway's Node."""

from __future__ import annotations

import json
import random
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO.parent / "shared" / "vendor" / "nmos"
SUITE_TIMEOUT = 600


@dataclass(frozen=True)
class Result:
    suite: str
    name: str
    state: str
    detail: str


def prepare(work: Path) -> Path:
    """The tool's directory, ready to run; raises if the bundle is missing."""
    if not (BUNDLE / "setup.sh").is_file():
        raise FileNotFoundError(f"the NMOS test tool bundle is not at {BUNDLE}")
    # A copy of the bundle: its bare mirrors may lack the empty refs/ directories git
    # needs to recognise them (empty directories do not survive every copy).
    vendor = work / "vendor"
    shutil.copytree(BUNDLE, vendor)
    for mirror in vendor.glob("*.git"):
        mirror.chmod(0o755)
        (mirror / "refs" / "heads").mkdir(parents=True, exist_ok=True)
        (mirror / "refs" / "tags").mkdir(parents=True, exist_ok=True)
    (vendor / "setup.sh").chmod(0o755)
    subprocess.run(
        ["bash", str(vendor / "setup.sh"), str(work / "nmos"), sys.executable],
        check=True,
        capture_output=True,
        timeout=900,
    )
    return work / "nmos" / "nmos-testing"


def _free_base() -> int:
    """A port base whose mock services' ports (base .. base+110) look free."""
    for _ in range(50):
        base = random.randrange(20000, 40000, 200)
        try:
            for offset in (0, 100, 101, 102, 103, 104, 105, 106, 107, 108):
                with socket.socket() as probe:
                    probe.bind(("0.0.0.0", base + offset))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port range for the test tool's mock services")


def configure(tool: Path, **settings: Any) -> None:
    """The tool's UserConfig: the bundle's, then `settings` (CONFIG.<name> = value)."""
    user = tool / "nmostesting" / "UserConfig.py"
    text = user.read_text().split("# -- per run\n")[0]
    lines = [f"CONFIG.{name} = {value!r}" for name, value in settings.items()]
    user.write_text(text + "# -- per run\n" + "\n".join(lines) + "\n")


async def run_suite(
    tool: Path, suite: str, hosts: list[str], ports: list[int], versions: list[str]
) -> list[Result]:
    """The suite's results (its JSON output)."""
    configure(tool, ENABLE_DNS_SD=True, DNS_SD_MODE="multicast", PORT_BASE=_free_base())
    output = tool / f"{suite}.json"
    output.unlink(missing_ok=True)
    command = [
        str(tool.parent / "venv" / "bin" / "python"),
        "nmos-test.py",
        "suite",
        suite,
        "--host",
        *hosts,
        "--port",
        *map(str, ports),
        "--version",
        *versions,
        "--output",
        str(output),
    ]
    with trio.fail_after(SUITE_TIMEOUT):
        done = await trio.run_process(
            command, cwd=tool, capture_stdout=True, capture_stderr=True, check=False
        )
    if not output.is_file():
        out, err = done.stdout.decode()[-3000:], done.stderr.decode()[-3000:]
        raise AssertionError(f"{suite} wrote no results:\n{out}\n{err}")
    data = json.loads(output.read_text())
    return [Result(suite, r["name"], r["state"], r["detail"]) for r in data["results"]]
