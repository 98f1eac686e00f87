"""`usbip-gateway bench`: the side-by-side path benchmark (bench/throughput.py)."""

from __future__ import annotations

import argparse
from typing import Any

from bench import throughput


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `bench` command to an argparse subparsers object; it sets `func`."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "bench",
        help="throughput, round trip, CPU and memory: direct, gateway pair, stunnel, socat",
        description=throughput.__doc__.split("\n\n")[0] if throughput.__doc__ else None,
    )
    throughput.add_arguments(parser)
    parser.set_defaults(func=throughput.run)
    return parser
