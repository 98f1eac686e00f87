"""How a session ended: kinds are the sessions_total labels the dashboards know."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.accounting.outcome import OPEN, Outcome, OutcomeKind, protocol_error
from gateway.accounting.session import Session
from gateway.observability.metrics import GatewayMetrics
from gateway.protocol import Role

from ..observability.helpers import new_metrics

ROOT = Path(__file__).resolve().parents[2]
LABELS = {kind.label for kind in OutcomeKind}


def _documented_labels() -> set[str]:
    """The outcome values of sessions_total in grafana/README.md's metric table."""
    text = (ROOT / "grafana" / "README.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `sessions_total` |"))
    values = row.strip(" |").split("|")[-1]
    return {re.sub(r"\(.*?\)", "", v).strip() for v in values.split(",")}


def _of(kind: OutcomeKind, side: Role = Role.CLIENT) -> Outcome:
    return Outcome(kind, kind.label, side if kind is OutcomeKind.PROTOCOL_ERROR else None)


def _labels_in(metrics: GatewayMetrics) -> dict[str, float]:
    return {
        s.labels["outcome"]: s.value
        for family in metrics.registry.collect()
        if family.name == "usbip_gateway_sessions"
        for s in family.samples
        if s.name == "usbip_gateway_sessions_total"
    }


def test_every_kind_is_a_label_the_dashboard_knows() -> None:
    assert _documented_labels() == LABELS


def test_outcome_labels_named_by_dashboards_alerts_and_docs_exist() -> None:
    """Any `outcome="..."` selector in grafana/ or docs/ names a kind (none goes stale)."""
    named: set[str] = set()
    for path in [*(ROOT / "grafana").iterdir(), *(ROOT / "docs").glob("*.md")]:
        text = path.read_text()
        named |= set(re.findall(r'outcome=~?\\?"([a-z_|]+)\\?"', text))
    assert "connection_lost" in named  # the pattern does find them
    assert {label for value in named for label in value.split("|")} <= LABELS


def test_sessions_total_has_only_kind_labels_whatever_ends_the_sessions() -> None:
    metrics = new_metrics()
    assert _labels_in(metrics) == dict.fromkeys(LABELS, 0.0)  # bound up front
    outcomes = [OPEN, *map(_of, OutcomeKind), _of(OutcomeKind.PROTOCOL_ERROR, Role.SERVER)]
    for outcome in outcomes:
        session = Session("server", "peer", "127.0.0.1:1", 0.0)
        metrics.session_started(session)
        session.outcome = outcome
        metrics.session_ended(session)
    ended = _labels_in(metrics)
    assert set(ended) == LABELS
    assert sum(ended.values()) == len(outcomes)
    assert ended["other"] == 2  # OPEN: a session nothing ended explicitly
    assert ended["protocol_error"] == 2


@pytest.mark.parametrize("kind", ["closed", "connection lost: reset", None])
def test_a_kind_must_be_a_member(kind: object) -> None:
    with pytest.raises(TypeError, match="not an OutcomeKind"):
        Outcome(kind, "text")  # type: ignore[arg-type]


def test_a_side_goes_with_a_protocol_error_and_only_with_one() -> None:
    with pytest.raises(ValueError, match="only for one"):
        Outcome(OutcomeKind.PROTOCOL_ERROR, "protocol error")
    with pytest.raises(ValueError, match="only for one"):
        Outcome(OutcomeKind.CLOSED, "closed by client", Role.CLIENT)


def test_text_is_the_detail_and_normal_follows_the_kind() -> None:
    upstream = protocol_error(Role.SERVER, "short reply", sender="usbipd")
    assert str(upstream) == upstream.detail == "protocol error from usbipd: short reply"
    assert upstream.side is Role.SERVER
    assert str(protocol_error(Role.CLIENT, "x")) == "protocol error from client: x"
    normal = {kind for kind in OutcomeKind if _of(kind).normal}
    assert normal == {OutcomeKind.CLOSED, OutcomeKind.LISTED, OutcomeKind.CANCELLED}
    assert not OPEN.normal


def test_the_session_summary_keeps_the_text() -> None:
    session = Session("server", "peer", "127.0.0.1:1", 0.0)
    assert session.summary()["outcome"] == "open"
    session.outcome = Outcome(OutcomeKind.CLOSED, "closed by client")
    assert session.summary()["outcome"] == "closed by client"
    assert session.ended_normally
