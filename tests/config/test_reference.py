"""docs/configuration.md is what the declarations say, and the docs point to it."""

from __future__ import annotations

from pathlib import Path

from gateway.config.reference import DOCUMENT, reference
from gateway.config.schema import ROLES, role_keys

ROOT = Path(__file__).parent.parent.parent


def test_the_document_is_up_to_date() -> None:
    assert DOCUMENT == ROOT / "docs" / "configuration.md"
    assert DOCUMENT.read_text() == reference(), "run: python3 -m gateway.config.reference"


def test_every_key_has_a_row_in_its_table() -> None:
    text = reference()
    for role in ROLES:
        for d in role_keys(role):
            section = text.split(f"## `[{d.table}]`", 1)[1].split("\n## ", 1)[0]
            assert f"| `{d.name}` |" in section, d.dotted
            assert d.key.help in section, d.dotted


def test_the_readme_links_to_it_instead_of_a_table() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "(docs/configuration.md)" in readme
    assert "| key | flag | default |" not in readme
