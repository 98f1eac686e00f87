"""The `[nmos]` table: read from TOML like every other, off by default, checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import Address, ConfigError, load

from ..pkitools import PKI


def _config(pki: PKI, tmp_path: Path, nmos: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(
        f'[tls]\ncert = "{pki.server_cert}"\nkey = "{pki.server_key}"\nca = "{pki.ca_pem}"\n'
        f"[nmos]\n{nmos}"
    )
    return path


def test_off_by_default_and_read_when_set(pki: PKI, tmp_path: Path) -> None:
    assert not load("server", _config(pki, tmp_path, ""), {}).nmos.enabled
    text = 'enabled = true\nlegs = ["192.0.2.10", "198.51.100.10:4000"]\nusb_classes = [3, 8]\n'
    nmos = load("server", _config(pki, tmp_path, text), {}).nmos
    assert nmos.enabled
    assert nmos.legs == (Address("192.0.2.10", 3240), Address("198.51.100.10", 4000))
    assert nmos.usb_classes == (3, 8)
    assert nmos.listen == Address("127.0.0.1", 3212)  # loopback unless told


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("usb_classes = [3, 300]", "300 is outside 0..255"),
        ('usb_classes = "03"', "list of integers"),
        ("usb_classes = [true]", "must be an integer"),
        ("nonsense = 1", "nonsense"),
    ],
)
def test_bad_values_are_refused(pki: PKI, tmp_path: Path, text: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        load("server", _config(pki, tmp_path, text + "\n"), {})
