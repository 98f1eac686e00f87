"""What the README shows must work as shown."""

from __future__ import annotations

from pathlib import Path

from gateway.policy import ClientFacts, Policy, Target, parse_device_spec

README = Path(__file__).parent.parent / "README.md"


def _block_after(marker: str) -> str:
    text = README.read_text()
    return text.split(marker, 1)[1].split("```", 1)[0]


def test_readme_policy_example_parses_and_decides() -> None:
    policy = Policy.parse(_block_after("# policy.rules\n"), "README.md")
    assert len(policy.rules) == 4
    alice = ClientFacts(common_name="alice")
    mouse = parse_device_spec("id 046d:c52b busid 1-3 with-interface { 03:01:02 }")
    assert policy.decide(alice, mouse).target is Target.REJECT
    lab = ClientFacts(common_name="x", uris=("spiffe://example.org/ns/lab/sa/ci",))
    stick = parse_device_spec("id 0781:5583 busid 1-2 with-interface { 08:06:50 }")
    assert policy.decide(lab, stick).target is Target.ALLOW
    logi = parse_device_spec("id 046d:0825 busid 1-4 with-interface { 0e:01:00 }")
    assert policy.decide(ClientFacts(dns_names=("cam.lab.example.org",)), logi).listed


def test_readme_names_the_test_command_ci_runs() -> None:
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert "python3 -m pytest" in README.read_text()
    assert "\npython3 -m pytest" in ci


def test_readme_installs_where_debian_lets_it() -> None:
    # PEP 668: Debian's and Ubuntu's system Python refuses a bare `pip install .`.
    first = _block_after("```sh\n").strip()
    assert first == (
        "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/usbip-gateway demo"
    )
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert 'requires-python = ">=3.11"' in pyproject
    assert "Python 3.11 or newer" in README.read_text()


def test_readme_lists_every_command() -> None:
    from gateway.cli import COMMANDS  # noqa: PLC0415

    text = README.read_text()
    for name in COMMANDS:
        assert f"| `usbip-gateway {name}" in text, name
    assert "| `usbip-gateway certs revoke / crl`" in text
