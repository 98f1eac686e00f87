"""libFuzzer entry point: `python -m fuzz.run HARNESS [libFuzzer flags] [CORPUS_DIR...]`.

HARNESS is one of fuzz.targets.HARNESSES. The codec (`gateway.protocol`) is instrumented
for coverage. Any exception other than the codec's RemoteProtocolError (handled inside
the targets) is a finding: libFuzzer stops and writes the input to `crash-*`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def main(argv: list[str]) -> None:
    try:
        atheris = importlib.import_module("atheris")
    except ImportError:
        sys.exit("fuzz.run needs atheris: python3 -m pip install atheris")
    if len(argv) < 2 or argv[1].startswith("-"):
        sys.exit("usage: python -m fuzz.run HARNESS [libFuzzer flags] [CORPUS_DIR...]")
    name = argv[1]
    # Imported here, inside the hook, so the codec is instrumented for coverage.
    with atheris.instrument_imports(include=["gateway"]):
        targets = importlib.import_module("fuzz.targets")
    harnesses: dict[str, Callable[[bytes], None]] = targets.HARNESSES
    if name not in harnesses:
        sys.exit(f"unknown harness {name!r}; one of: {', '.join(harnesses)}")
    target = harnesses[name]
    atheris.Setup([argv[0], *argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
