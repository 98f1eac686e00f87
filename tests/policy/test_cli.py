"""`policy check` and `policy explain`: parsed namespaces in, exit status and output out."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from gateway.pki.ca import create_ca, issue_client_cert
from gateway.policy.cli import add_policy_parser, client_from_args

LAB = """\
# lab policy
reject with-interface one-of { 03:01:* }
allow client-cn "alice" serial "0123"
reject serial "0123"
allow client-uri "spiffe://example.org/ns/lab/*" with-interface { 08:*:* }
block client-uri "spiffe://example.org/ns/lab/*"
"""


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="usbip-gateway")
    add_policy_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["policy", *argv])
    status: int = args.func(args)
    return status


@pytest.fixture
def rules(tmp_path: Path) -> Path:
    path = tmp_path / "lab.rules"
    path.write_text(LAB)
    return path


def test_check_ok(rules: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("check", str(rules)) == 0
    out, err = capsys.readouterr()
    assert out == f"{rules}: ok, 5 rules, default reject\n"
    assert err == ""


def test_check_reports_located_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.rules"
    path.write_text("allow\nallow\nallow id 0525\n")
    assert run("check", str(path)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"{path}:3:10: expected VID:PID after 'id', got '0525'\n"


def test_check_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("check", str(tmp_path / "nope.rules")) == 2
    assert "nope.rules: cannot read:" in capsys.readouterr().err


def test_explain_allow_exits_0(rules: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = run(
        "explain",
        str(rules),
        "--client",
        "cn:alice",
        "--device",
        'id 0525:a4a0 serial "0123" busid 1-1',
    )
    assert status == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-2:] == [
        'line 3: matches: allow client-cn "alice" serial "0123"',
        f"decision: allow ({rules}:3)",
    ]


def test_explain_reject_exits_1(rules: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = run("explain", str(rules), "--client", "bob", "--id", "0525:a4a0", "--serial", "0123")
    assert status == 1
    out = capsys.readouterr().out
    assert 'client: client-cn "bob"' in out
    assert 'line 3: client-cn "alice" does not match "bob"' in out
    assert out.endswith(f"decision: reject ({rules}:4)\n")


def test_explain_block_exits_1(rules: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = run(
        "explain",
        str(rules),
        "--client",
        "spiffe://example.org/ns/lab/bob",
        "--id",
        "0525:a4a0",
        "--interface",
        "ff:00:00",
        "--class",
        "ff",
        "--busid",
        "1-1",
    )
    assert status == 1
    out = capsys.readouterr().out
    assert 'device: id 0525:a4a0 busid "1-1" class ff with-interface { ff:00:00 }' in out
    assert "line 5: with-interface { 08:*:* } does not match ff:00:00" in out
    assert out.endswith(f"decision: block ({rules}:6)\n")


def test_explain_default(rules: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("explain", str(rules), "--client", "dns:h.example.org", "--id", "046d:c52b") == 1
    out = capsys.readouterr().out
    assert 'client: client-dns "h.example.org"' in out
    assert out.endswith("decision: reject (no rule matched, implicit default)\n")


def test_explain_storage_for_lab(rules: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = run(
        "explain",
        str(rules),
        "--client",
        "uri:spiffe://example.org/ns/lab/bob",
        "--id",
        "0781:5581",
        "--interface",
        "08:06:50",
        "--name",
        "Ultra",
        "--manufacturer",
        "SanDisk",
    )
    assert status == 0
    assert capsys.readouterr().out.endswith(f"decision: allow ({rules}:5)\n")


def test_explain_client_from_certificate(
    rules: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = create_ca()
    leaf = issue_client_cert(ca, common_name="alice", uris=["spiffe://example.org/ns/lab/alice"])
    pem = tmp_path / "alice.pem"
    pem.write_bytes(leaf.cert_pem())
    status = run("explain", str(rules), "--cert", str(pem), "--id", "0525:a4a0", "--serial", "0123")
    assert status == 0
    out = capsys.readouterr().out
    assert out.startswith(
        'client: client-cn "alice" client-uri "spiffe://example.org/ns/lab/alice"\n'
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--id", "0525:a4a0"], "explain needs --client or --cert"),
        (
            ["--client", "a", "--id", "0525"],
            "explain: expected VID:PID after 'id', got '0525'",
        ),
        (
            ["--client", "a", "--device", "id 0525:*"],
            "--device:1:4: a device spec takes no wildcards",
        ),
        (
            ["--client", "a", "--device", "busid 1-1"],
            "--device:1:10: a device spec needs 'id VID:PID'",
        ),
        (["--client", "a", "--device", "id 0525:a4a0", "--serial", "x"], "--serial goes with --id"),
        (["--client", "a", "--device", "id 0525:a4a0", "--class", "ff"], "--class goes with --id"),
        (
            ["--client", "cn:a", "--client", "cn:b", "--id", "0525:a4a0"],
            'two common names: "a" and "b"',
        ),
        (
            ["--client", "a", "--id", "0525:a4a0", "--interface", "08:*:*"],
            "takes no wildcards: 08:*:*",
        ),
    ],
)
def test_explain_argument_errors_exit_2(
    rules: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("explain", str(rules), *argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert message in err


def test_explain_bad_policy_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.rules"
    path.write_text("allow serial x\n")
    assert run("explain", str(path), "--client", "a", "--id", "0525:a4a0") == 2
    assert (
        capsys.readouterr().err
        == f"{path}:1:14: expected a quoted string after 'serial', got 'x'\n"
    )


def test_device_and_id_are_exclusive(rules: Path) -> None:
    with pytest.raises(SystemExit):
        run("explain", str(rules), "--client", "a", "--device", "id 0525:a4a0", "--id", "0525:a4a0")


@pytest.mark.parametrize(
    ("value", "field", "expected"),
    [
        ("cn:alice", "common_name", "alice"),
        ("alice", "common_name", "alice"),
        ("uri:urn:x:y", "uris", ("urn:x:y",)),
        ("spiffe://example.org/a", "uris", ("spiffe://example.org/a",)),
        ("dns:h.example.org", "dns_names", ("h.example.org",)),
        ("cn://odd", "uris", ("cn://odd",)),  # "://" after a prefix is still a URI
    ],
)
def test_client_value_forms(value: str, field: str, expected: object) -> None:
    assert getattr(client_from_args([value], None), field) == expected
