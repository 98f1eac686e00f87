"""Decisions: first match wins, defaults, early decisions, explanations, facts adapters."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gateway.policy import ClientFacts, DeviceFacts, Policy, Target
from gateway.protocol import DeviceInfo, InterfaceInfo

from .helpers import ALICE, NOBODY, device

BOB = ClientFacts(common_name="bob", uris=("spiffe://example.org/ns/ops/bob",))


def test_first_match_wins() -> None:
    policy = Policy.parse("block id 0525:*\nallow id 0525:a4a0\nreject")
    decision = policy.decide(ALICE, device())
    assert decision.target is Target.BLOCK
    assert decision.rule is policy.rules[0]
    assert decision.reason == "<policy>:1"
    assert decision.listed
    assert not decision.allowed


def test_later_rule_decides_when_earlier_ones_fail() -> None:
    policy = Policy.parse("block id 046d:*\nallow id 0525:a4a0", "p.rules")
    decision = policy.decide(ALICE, device())
    assert (decision.target, decision.rule, decision.reason) == (
        Target.ALLOW,
        policy.rules[1],
        "p.rules:2",
    )
    assert decision.allowed
    assert decision.listed


def test_implicit_default_rejects() -> None:
    decision = Policy.parse("allow id 046d:*").decide(ALICE, device())
    assert (decision.target, decision.rule) == (Target.REJECT, None)
    assert decision.reason == "no rule matched, implicit default"
    assert not decision.listed


@pytest.mark.parametrize("target", list(Target))
def test_explicit_default(target: Target) -> None:
    policy = Policy.parse(f"allow id 046d:*\ndefault {target.value}", "p.rules")
    decision = policy.decide(ALICE, device())
    assert (decision.target, decision.rule) == (target, None)
    assert decision.reason == "no rule matched, default at p.rules:2"


def test_default_applies_after_every_rule_wherever_it_is_written() -> None:
    policy = Policy.parse("default allow\nreject id 0525:*")
    assert policy.decide(ALICE, device()).target is Target.REJECT
    assert policy.decide(ALICE, device(vendor_id=0x046D)).target is Target.ALLOW


def test_label_does_not_affect_matching() -> None:
    policy = Policy.parse('allow label "anything at all"')
    assert policy.decide(NOBODY, device()).target is Target.ALLOW


def test_summary_and_counts() -> None:
    policy = Policy.parse("allow\nblock\nblock\ndefault block")
    assert policy.summary() == "3 rules, default block"
    assert policy.target_counts() == {Target.ALLOW: 1, Target.BLOCK: 2, Target.REJECT: 0}
    assert Policy.parse("allow").summary() == "1 rule, default reject"


LAB = """\
reject with-interface one-of { 03:01:* }               # keyboards never leave the host
allow client-cn "alice" serial "0123"
reject serial "0123"                                   # only alice gets that one
allow client-uri "spiffe://example.org/ns/lab/*" busid 1-*
block busid "2-*" client-dns "*.lab.example.org"
"""


def test_early_decision_when_client_and_busid_settle_it() -> None:
    policy = Policy.parse(LAB)
    # BOB matches no client condition; the reject / serial rules still need the device.
    assert policy.decide_early(BOB, "1-1") is None
    # Once nothing before a decisive rule can depend on the device:
    early = Policy.parse('allow client-cn "alice" busid 1-*\nreject').decide_early(ALICE, "1-1")
    assert early is not None
    assert (early.target, early.reason) == (Target.ALLOW, "<policy>:1")


def test_early_default_when_no_rule_can_match() -> None:
    policy = Policy.parse('allow client-cn "alice" id 0525:*\nblock client-cn "carol"')
    early = policy.decide_early(BOB, "1-1")
    assert early is not None
    assert (early.target, early.rule) == (Target.REJECT, None)


def test_early_is_undecided_when_the_device_matters() -> None:
    policy = Policy.parse('allow client-cn "alice" id 0525:*\nreject')
    assert policy.decide_early(ALICE, "1-1") is None


def test_early_busid_mismatch_skips_rule() -> None:
    policy = Policy.parse('allow busid "2-*" serial "x"\nblock client-cn "alice"')
    early = policy.decide_early(ALICE, "1-1")
    assert early is not None
    assert early.target is Target.BLOCK


def test_early_none_of_on_missing_client_fact_is_false() -> None:
    policy = Policy.parse('allow client-uri none-of { "spiffe://evil/*" }\nblock')
    early = policy.decide_early(NOBODY, "1-1")
    assert early is not None
    assert early.target is Target.BLOCK


def test_explain_text() -> None:
    policy = Policy.parse(LAB, "lab.rules")
    explanation = policy.explain(BOB, device(busid="1-4", serial="0123"))
    assert str(explanation) == "\n".join(
        [
            'client: client-cn "bob" client-uri "spiffe://example.org/ns/ops/bob"',
            'device: id 0525:a4a0 busid "1-4" class ff with-interface { ff:00:00 } '
            'serial "0123" name "Gadget Zero" manufacturer "Linux Foundation"',
            "line 1: with-interface one-of { 03:01:* } does not match ff:00:00",
            'line 2: client-cn "alice" does not match "bob"',
            'line 3: matches: reject serial "0123"',
            "decision: reject (lab.rules:3)",
        ]
    )
    assert [step.matched for step in explanation.steps] == [False, False, True]
    assert explanation.steps[1].failed is policy.rules[1].conditions[0]


def test_explain_by_default_lists_every_rule() -> None:
    policy = Policy.parse('allow id 046d:*\nallow serial "x"\ndefault block', "p")
    explanation = policy.explain(NOBODY, device(serial=None))
    assert str(explanation).splitlines()[2:] == [
        "line 1: id 046d:* does not match 0525:a4a0",
        'line 2: serial "x" cannot match: device has no serial',
        "decision: block (no rule matched, default at p:3)",
    ]
    assert str(explanation).splitlines()[0] == "client: (no identity)"


@pytest.mark.parametrize(
    ("rule", "why"),
    [
        ("with-interface none-of { 03:*:* }", "fails: 03:01:01 matches 03:*:*"),
        (
            "with-interface all-of { 08:*:* 02:*:* }",
            "fails: 02:*:* matches nothing in { 08:06:50 03:01:01 }",
        ),
        ("with-interface { 08:*:* }", "fails: 03:01:01 is not matched by any listed value"),
        (
            "with-interface match-all { 08:*:* }",
            "fails: 03:01:01 is not matched by any listed value",
        ),
        (
            "with-interface equals-ordered { 03:*:* 08:*:* }",
            "fails: 08:06:50 (position 1) does not match 03:*:*",
        ),
        (
            "with-interface equals-ordered { 08:*:* }",
            "does not match { 08:06:50 03:01:01 }: 2 values, the rule lists 1",
        ),
        ("with-interface one-of { 02:*:* e0:*:* }", "does not match { 08:06:50 03:01:01 }"),
        ('client-uri "x"', "cannot match: certificate has no URI"),
        ('client-dns "x"', "cannot match: certificate has no DNS name"),
    ],
)
def test_failure_reasons(rule: str, why: str) -> None:
    explanation = Policy.parse(f"allow {rule}").explain(
        NOBODY, device(interfaces=((8, 6, 0x50), (3, 1, 1)))
    )
    assert explanation.steps[0].why == why


@dataclass(frozen=True)
class FakeIdentity:
    common_name: str | None
    uris: tuple[str, ...]
    dns_names: tuple[str, ...]


def test_client_facts_from_identity() -> None:
    facts = ClientFacts.from_identity(FakeIdentity("alice", ("spiffe://a",), ("a.example",)))
    assert facts == ClientFacts("alice", ("spiffe://a",), ("a.example",))


def test_device_facts_from_record() -> None:
    info = DeviceInfo(
        path="/sys/devices/platform/vhci/usb1/1-1",
        busid="1-1",
        busnum=1,
        devnum=2,
        speed=3,
        id_vendor=0x0525,
        id_product=0xA4A0,
        bcd_device=0x0100,
        device_class=0xFF,
        device_subclass=1,
        device_protocol=2,
        configuration_value=1,
        num_configurations=1,
        num_interfaces=2,
    )
    facts = DeviceFacts.from_record(
        info, (InterfaceInfo(0xFF, 0, 0), InterfaceInfo(8, 6, 0x50)), serial="0123"
    )
    assert facts == DeviceFacts(
        busid="1-1",
        vendor_id=0x0525,
        product_id=0xA4A0,
        device_class=0xFF,
        interfaces=((0xFF, 0, 0), (8, 6, 0x50)),
        serial="0123",
        device_subclass=1,
        device_protocol=2,
        bcd_device=0x0100,
    )
    # An IMPORT reply carries no interfaces: interface rules cannot match then.
    bare = DeviceFacts.from_record(info)
    assert bare.interfaces == ()
    assert Policy.parse("allow with-interface none-of { 03:*:* }").decide(ALICE, bare).target is (
        Target.REJECT
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"vendor_id": 0x10000},
        {"product_id": -1},
        {"device_class": 256},
        {"interfaces": ((1, 2),)},
        {"interfaces": ((1, 2, 300),)},
    ],
)
def test_device_facts_validate(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="not"):
        device(**kwargs)
