"""Small builders shared by the policy tests."""

from __future__ import annotations

from gateway.policy import ClientFacts, DeviceFacts, Policy, PolicyError, Target


def device(**kwargs: object) -> DeviceFacts:
    """A Gadget Zero on 1-1 unless told otherwise."""
    fields: dict[str, object] = {
        "busid": "1-1",
        "vendor_id": 0x0525,
        "product_id": 0xA4A0,
        "device_class": 0xFF,
        "interfaces": ((0xFF, 0, 0),),
        "serial": "0123",
        "manufacturer": "Linux Foundation",
        "product": "Gadget Zero",
    }
    fields.update(kwargs)
    return DeviceFacts(**fields)  # type: ignore[arg-type]


ALICE = ClientFacts(
    common_name="alice",
    uris=("spiffe://example.org/ns/lab/alice",),
    dns_names=("alice.lab.example.org",),
)
NOBODY = ClientFacts()


def target(rules: str, client: ClientFacts = ALICE, dev: DeviceFacts | None = None) -> Target:
    return Policy.parse(rules).decide(client, dev or device()).target


def holds(condition: str, client: ClientFacts = ALICE, dev: DeviceFacts | None = None) -> bool:
    """Whether `allow <condition>` matches (the default is reject)."""
    return target(f"allow {condition}", client, dev) is Target.ALLOW


def error(text: str) -> PolicyError:
    try:
        Policy.parse(text, "t.rules")
    except PolicyError as exc:
        return exc
    raise AssertionError(f"{text!r} parsed")
