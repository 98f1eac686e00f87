"""Hypothesis strategies: policies, clients and devices over a small shared vocabulary,
so that rules match often enough for the interesting orderings to come up."""

from __future__ import annotations

from hypothesis import strategies as st

from gateway.policy import ClientFacts, DeviceFacts

BUSIDS = ("1-1", "1-2", "2-1.4")
IDS = ((0x0525, 0xA4A0), (0x0525, 0xA4A1), (0x046D, 0xC52B))
INTERFACES = ((8, 6, 0x50), (3, 1, 1), (3, 0, 0), (0xFF, 0, 0))
STRINGS = ("A", "B", "AB", "")

# Values a rule may list, per attribute, as written in a rule.
VALUES: dict[str, tuple[str, ...]] = {
    "id": ("*:*", "0525:*", "0525:a4a0", "046d:c52b", "046d:*"),
    "serial": ('"A"', '"B"', '"A*"', '"*"'),
    "name": ('"A"', '"*B"'),
    "manufacturer": ('"B"', '"*"'),
    "busid": ('"1-1"', "1-*", '"2-1.4"', '"*"'),
    "class": ("00", "03", "ff"),
    "with-interface": ("08:*:*", "03:01:01", "03:*:*", "ff:00:00", "*:*:*"),
    "client-cn": ('"alice"', '"bob"', '"a*"'),
    "client-uri": ('"spiffe://x/lab/*"', '"spiffe://x/lab/alice"', '"spiffe://x/ops/bob"'),
    "client-dns": ('"*.lab.x"', '"h1.lab.x"', '"H1.ops.x"'),
}
OPERATORS = ("all-of", "one-of", "none-of", "equals", "equals-ordered", "match-all")


@st.composite
def conditions(draw: st.DrawFn) -> str:
    attribute = draw(st.sampled_from(sorted(VALUES)))
    values = VALUES[attribute]
    form = draw(st.sampled_from(("single", "set", "operator")))
    if form == "single":
        return f"{attribute} {draw(st.sampled_from(values))}"
    listed = " ".join(draw(st.lists(st.sampled_from(values), min_size=1, max_size=3)))
    if form == "set":
        return f"{attribute} {{ {listed} }}"
    return f"{attribute} {draw(st.sampled_from(OPERATORS))} {{ {listed} }}"


@st.composite
def policies(draw: st.DrawFn) -> str:
    rules = [
        f"{draw(st.sampled_from(('allow', 'block', 'reject')))} "
        + " ".join(draw(st.lists(conditions(), max_size=3)))
        for _ in range(draw(st.integers(0, 5)))
    ]
    default = draw(st.sampled_from(("", "default allow", "default block", "default reject")))
    return "\n".join([*rules, default])


clients = st.builds(
    ClientFacts,
    common_name=st.sampled_from((None, "alice", "bob", "ab")),
    uris=st.lists(
        st.sampled_from(("spiffe://x/lab/alice", "spiffe://x/ops/bob", "urn:x")), max_size=2
    ).map(tuple),
    dns_names=st.lists(st.sampled_from(("h1.lab.x", "h1.ops.x", "H2.LAB.X")), max_size=2).map(
        tuple
    ),
)

optional_strings = st.sampled_from((None, *STRINGS))


def devices(busid: str | None = None) -> st.SearchStrategy[DeviceFacts]:
    return st.builds(
        lambda busid, ident, **kw: DeviceFacts(
            busid=busid, vendor_id=ident[0], product_id=ident[1], **kw
        ),
        busid=st.just(busid) if busid is not None else st.sampled_from(BUSIDS),
        ident=st.sampled_from(IDS),
        device_class=st.sampled_from((None, 0, 3, 0xFF)),
        interfaces=st.lists(st.sampled_from(INTERFACES), max_size=3).map(tuple),
        serial=optional_strings,
        manufacturer=optional_strings,
        product=optional_strings,
    )
