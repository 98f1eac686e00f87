"""The worked example and the explain transcript in docs/policy.md say what the code does."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import pytest

from gateway.policy import ClientFacts, Policy, Target, parse_device_spec
from gateway.policy.cli import add_policy_parser

DOC = (Path(__file__).parents[2] / "docs" / "policy.md").read_text()


def _example() -> Policy:
    block = DOC.split("## Worked example", 1)[1].split("```\n")[1]
    return Policy.parse(block, "policy.rules")


BOB = ClientFacts(uris=("spiffe://example.org/ns/lab/bob",))
ALICE = ClientFacts(common_name="alice", uris=("spiffe://example.org/ns/lab/alice",))
OUTSIDER = ClientFacts(uris=("spiffe://example.org/ns/ops/carol",))
LOGGER = 'id 0403:6001 serial "FT4XK2Q1" busid 2-1'


@pytest.mark.parametrize(
    ("client", "spec", "target", "line"),
    [
        (BOB, "id 0781:5581 busid 1-1 with-interface 08:06:50", Target.ALLOW, 12),
        (BOB, "id 0781:5581 busid 1-1 with-interface { 08:06:50 03:01:01 }", Target.REJECT, 5),
        (BOB, LOGGER, Target.BLOCK, 9),
        (ALICE, LOGGER, Target.ALLOW, 8),
        (OUTSIDER, LOGGER, Target.BLOCK, 9),
        (OUTSIDER, "id 0781:5581 busid 1-1 with-interface 08:06:50", Target.REJECT, None),
    ],
)
def test_worked_example(client: ClientFacts, spec: str, target: Target, line: int | None) -> None:
    policy = _example()
    assert policy.default_line == 17
    decision = policy.decide(client, parse_device_spec(spec))
    assert decision.target is target
    assert (decision.rule.line if decision.rule else None) == line


def test_explain_transcript(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = DOC.split("$ usbip-gateway ", 1)[1].split("```", 1)[0].splitlines()
    command = [lines.pop(0)]
    while command[-1].endswith("\\"):
        command.append(lines.pop(0))
    argv = shlex.split(" ".join(part.rstrip("\\") for part in command))
    rules = tmp_path / "policy.rules"
    rules.write_text(DOC.split("## Worked example", 1)[1].split("```\n")[1])
    parser = argparse.ArgumentParser()
    add_policy_parser(parser.add_subparsers())
    args = parser.parse_args([str(rules) if arg == "policy.rules" else arg for arg in argv])
    assert args.func(args) == 1
    expected = "\n".join(lines).replace("policy.rules", str(rules)) + "\n"
    assert capsys.readouterr().out == expected
