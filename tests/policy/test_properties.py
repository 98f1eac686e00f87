"""Properties over generated policies: early decisions are never contradicted, explain
agrees with decide, and device specs round-trip."""

from __future__ import annotations

from hypothesis import event, given
from hypothesis import strategies as st

from gateway.policy import ClientFacts, DeviceFacts, Policy, Target, parse_device_spec

from .strategies import BUSIDS, clients, devices, policies


@given(policies(), clients, st.sampled_from((*BUSIDS, "")), st.data())
def test_an_early_decision_holds_for_every_device_on_that_busid(
    text: str, client: ClientFacts, busid: str, data: st.DataObject
) -> None:
    policy = Policy.parse(text)
    early = policy.decide_early(client, busid)
    event("early decision" if early is not None else "needs the device")
    if early is None:
        return
    for _ in range(5):
        device = data.draw(devices(busid))
        assert policy.decide(client, device) == early


@given(policies(), clients, devices())
def test_explain_agrees_with_decide(text: str, client: ClientFacts, device: DeviceFacts) -> None:
    policy = Policy.parse(text)
    decision = policy.decide(client, device)
    explanation = policy.explain(client, device)
    assert explanation.decision == decision
    *failed, last = explanation.steps or (None,)
    assert all(step is not None and not step.matched for step in failed)
    if decision.rule is None:
        assert len(explanation.steps) == len(policy.rules)
        assert last is None or not last.matched
        assert decision.target is policy.default
    else:
        assert last is not None
        assert last.matched
        assert last.rule is decision.rule
    assert str(explanation).endswith(f"decision: {decision.target.value} ({decision.reason})")


@given(devices())
def test_device_spec_round_trips(device: DeviceFacts) -> None:
    assert parse_device_spec(device.to_spec()) == device


@given(policies())
def test_counts_add_up(text: str) -> None:
    policy = Policy.parse(text)
    counts = policy.target_counts()
    assert set(counts) == set(Target)
    assert sum(counts.values()) == len(policy.rules)
