"""Set-operator semantics on single- and multi-valued attributes, globbing, missing facts."""

from __future__ import annotations

import pytest

from gateway.policy import ClientFacts

from .helpers import ALICE, device, holds

STORAGE = (0x08, 0x06, 0x50)
KEYBOARD = (0x03, 0x01, 0x01)
COMBO = device(interfaces=(STORAGE, KEYBOARD))  # a flash disk that also types
DISK = device(interfaces=(STORAGE,))
TWO_LUNS = device(interfaces=(STORAGE, (0x08, 0x06, 0x62)))


@pytest.mark.parametrize(
    ("condition", "dev", "expected"),
    [
        # single value = equals { value }: every interface must match it (USBGuard)
        ("with-interface 08:*:*", DISK, True),
        ("with-interface 08:*:*", TWO_LUNS, True),
        ("with-interface 08:*:*", COMBO, False),
        ("with-interface 08:06:50", TWO_LUNS, False),
        # equals: each listed value matches an interface and each interface is listed
        ("with-interface equals { 08:*:* }", COMBO, False),
        ("with-interface { 08:*:* 03:*:* }", COMBO, True),
        ("with-interface { 08:*:* 03:*:* }", DISK, False),
        ("with-interface equals { 03:01:01 08:06:50 }", COMBO, True),
        ("with-interface equals { 03:*:* 03:01:* }", COMBO, False),  # 08:06:50 not listed
        # all-of: each listed value matches some interface; others may exist
        ("with-interface all-of { 08:*:* 03:01:* }", COMBO, True),
        ("with-interface all-of { 08:*:* }", COMBO, True),
        ("with-interface all-of { 08:*:* 03:01:* }", DISK, False),
        # one-of: some listed value matches some interface
        ("with-interface one-of { 03:*:* e0:*:* }", COMBO, True),
        ("with-interface one-of { 03:*:* e0:*:* }", DISK, False),
        # none-of: no listed value matches any interface
        ("with-interface none-of { 03:*:* 02:*:* }", DISK, True),
        ("with-interface none-of { 03:*:* 02:*:* }", COMBO, False),
        # match-all: every interface is among the listed ones (a subset)
        ("with-interface match-all { 08:*:* 03:*:* e0:*:* }", DISK, True),
        ("with-interface match-all { 08:*:* 03:*:* e0:*:* }", COMBO, True),
        ("with-interface match-all { 03:*:* }", COMBO, False),
        # equals-ordered: same length, position by position
        ("with-interface equals-ordered { 08:*:* 03:*:* }", COMBO, True),
        ("with-interface equals-ordered { 03:*:* 08:*:* }", COMBO, False),
        ("with-interface equals-ordered { 08:*:* }", COMBO, False),
        ("with-interface equals-ordered { *:*:* *:*:* }", TWO_LUNS, True),
    ],
)
def test_interface_operators(condition: str, dev: object, expected: bool) -> None:
    assert holds(condition, dev=dev) is expected  # type: ignore[arg-type]


GZ = device()  # 0525:a4a0, serial "0123"


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("id 0525:a4a0", True),
        ("id 0525:*", True),
        ("id *:*", True),
        ("id 046d:*", False),
        ("id 0525:a4a1", False),
        ("id one-of { 046d:* 0525:a4a0 }", True),
        ("id one-of { 046d:* 1d6b:* }", False),
        ("id none-of { 046d:* 1d6b:* }", True),
        ("id none-of { 046d:* 0525:* }", False),
        ("id all-of { 0525:* 0525:a4a0 }", True),
        ("id all-of { 0525:* 046d:* }", False),
        ("id { 0525:* *:* }", True),
        ("id equals { 0525:a4a0 046d:* }", False),  # 046d:* matches nothing
        ("id match-all { 046d:* 0525:* }", True),
        ("id equals-ordered { 0525:* }", True),
        ("id equals-ordered { 0525:* 0525:* }", False),
        ('serial "0123"', True),
        ('serial "01*"', True),
        ('serial "*"', True),
        ('serial "0124"', False),
        ('serial one-of { "x" "0*" }', True),
        ('serial none-of { "x" "0*" }', False),
        ('name "Gadget Zero"', True),
        ('name "gadget zero"', False),  # device strings are case-sensitive
        ('manufacturer "Linux *"', True),
        ('busid "1-1"', True),
        ("busid 1-*", True),
        ('busid "1-1.*"', False),
        ("class ff", True),
        ("class { 03 ff }", False),  # a single value cannot equal two
        ("class one-of { 03 ff }", True),
        ("class none-of { 03 09 }", True),
    ],
)
def test_single_valued_device_attributes(condition: str, expected: bool) -> None:
    assert holds(condition, dev=GZ) is expected


MULTI = ClientFacts(
    common_name="alice",
    uris=("spiffe://example.org/ns/lab/alice", "urn:example:badge:42"),
    dns_names=("alice.lab.example.org", "ws7.example.org"),
)


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ('client-cn "alice"', True),
        ('client-cn "al*"', True),
        ('client-cn "Alice"', False),
        ('client-cn one-of { "bob" "alice" }', True),
        ('client-cn none-of { "bob" "mallory" }', True),
        # a single value: any of the certificate's values matches
        ('client-uri "spiffe://example.org/ns/lab/*"', True),
        ('client-uri "urn:example:badge:*"', True),
        ('client-uri "spiffe://example.org/ns/ops/*"', False),
        ('client-uri "spiffe://example.org/*"', True),  # '*' crosses '/'
        ('client-dns "*.lab.example.org"', True),
        ('client-dns "*.example.org"', True),  # '*' crosses '.'
        ('client-dns "WS7.Example.ORG"', True),  # DNS names compare case-insensitively
        ('client-dns "*.ops.example.org"', False),
        # sets: the same operators as for interfaces
        ('client-uri all-of { "spiffe://*" "urn:*" }', True),
        ('client-uri all-of { "spiffe://*" "https://*" }', False),
        ('client-uri { "spiffe://*" }', False),  # equals: the urn is not listed
        ('client-uri { "spiffe://*" "urn:*" }', True),
        ('client-uri match-all { "spiffe://*" "urn:*" "https://*" }', True),
        ('client-uri none-of { "https://*" }', True),
        ('client-uri none-of { "urn:*" }', False),
        ('client-uri equals-ordered { "urn:*" "spiffe://*" }', False),
        ('client-uri equals-ordered { "spiffe://*" "urn:*" }', True),
        ('client-dns one-of { "x.example.org" "ws7.*" }', True),
    ],
)
def test_client_attributes(condition: str, expected: bool) -> None:
    assert holds(condition, client=MULTI) is expected


def test_literal_asterisk_needs_escaping() -> None:
    starred = device(serial="a*b")
    assert holds(r'serial "a\*b"', dev=starred)
    assert not holds(r'serial "a\*b"', dev=device(serial="axxb"))
    assert holds('serial "a*b"', dev=device(serial="axxb"))


MISSING_DEVICE = device(
    serial=None, product=None, manufacturer=None, device_class=None, interfaces=(), busid=""
)
EMPTY_STRINGS = device(serial="", product="", manufacturer="")


@pytest.mark.parametrize(
    "op", ["", "one-of", "all-of", "none-of", "equals", "equals-ordered", "match-all"]
)
@pytest.mark.parametrize(
    ("attribute", "value"),
    [
        ("serial", '"*"'),
        ("name", '"*"'),
        ("manufacturer", '"*"'),
        ("class", "ff"),
        ("with-interface", "*:*:*"),
        ("busid", '"*"'),
    ],
)
def test_missing_device_facts_never_match(attribute: str, value: str, op: str) -> None:
    condition = f"{attribute} {op} {{ {value} }}" if op else f"{attribute} {value}"
    assert holds(f"{attribute} one-of {{ {value} }}", dev=device())  # the fact does match
    assert not holds(condition, dev=MISSING_DEVICE)


@pytest.mark.parametrize("op", ["", "none-of", "match-all"])
def test_empty_strings_count_as_missing(op: str) -> None:
    condition = f'serial {op} {{ "x" }}' if op else 'serial "*"'
    assert not holds(condition, dev=EMPTY_STRINGS)


@pytest.mark.parametrize(
    "op", ["one-of", "all-of", "none-of", "equals", "equals-ordered", "match-all"]
)
@pytest.mark.parametrize("attribute", ["client-cn", "client-uri", "client-dns"])
def test_missing_client_facts_never_match(attribute: str, op: str) -> None:
    assert not holds(f'{attribute} "*"', client=ClientFacts())
    assert not holds(f'{attribute} {op} {{ "nobody" }}', client=ClientFacts())
    assert holds(f'{attribute} one-of {{ "*" }}', client=ALICE)


def test_conditions_are_anded() -> None:
    assert holds('id 0525:* serial "0123" client-cn "alice"')
    assert not holds('id 0525:* serial "0123" client-cn "bob"')
    assert not holds('id 046d:* serial "0123" client-cn "alice"')
