"""IS-05 staging and activation of one Sender or Receiver, with the time given."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.nmos.connection import PatchError, Port, receiver_params, sender_params
from gateway.nmos.sdp import Leg, make_sdp

NOW = (1_000_000, 500_000_000)
SENDER = "13253891-87e2-5d34-aea7-4369d507b9cc"


def receiver(legs: int = 1) -> Port:
    params = receiver_params(["192.0.2.2", "127.0.0.1"], 3240)
    initial = {"source_ip": None, "source_port": None, "interface_ip": "192.0.2.2"}
    return Port("receiver", [params] * legs, [dict(initial) for _ in range(legs)])


def sender() -> Port:
    leg = Leg("192.0.2.10", 3240)
    return Port("sender", [sender_params(leg)], [{"source_ip": "192.0.2.10", "source_port": 3240}])


def test_immediate_activation_moves_staged_to_active() -> None:
    port = receiver()
    answer = port.patch(
        {
            "sender_id": SENDER,
            "master_enable": True,
            "transport_params": [{"source_ip": "192.0.2.10", "source_port": 3240}],
            "activation": {"mode": "activate_immediate"},
        },
        NOW,
    )
    assert answer.status == 200
    assert answer.activated
    assert answer.body["activation"]["activation_time"] == "1000000:500000000"
    assert port.active["sender_id"] == SENDER
    assert port.active["transport_params"][0]["source_ip"] == "192.0.2.10"
    assert port.staged["activation"]["mode"] is None  # cleared once done


def test_staging_alone_changes_nothing_active() -> None:
    port = receiver()
    answer = port.patch({"transport_params": [{"source_ip": "192.0.2.10"}]}, NOW)
    assert (answer.status, answer.activated) == (200, False)
    assert port.active["transport_params"][0]["source_ip"] is None


def test_a_transport_file_sets_the_source() -> None:
    port = receiver(legs=2)
    sdp = make_sdp(
        [Leg("192.0.2.10", 4000), Leg("198.51.100.10", 4000)], session_id=1, version=1, label=""
    )
    port.patch({"transport_file": {"data": sdp, "type": "application/sdp"}}, NOW)
    params = port.staged["transport_params"]
    assert [(p["source_ip"], p["source_port"]) for p in params] == [
        ("192.0.2.10", 4000),
        ("198.51.100.10", 4000),
    ]


def test_auto_is_resolved_on_active() -> None:
    port = receiver()
    port.patch(
        {
            "transport_params": [{"source_port": "auto", "interface_ip": "auto"}],
            "activation": {"mode": "activate_immediate"},
        },
        NOW,
    )
    assert port.staged["transport_params"][0]["source_port"] == "auto"
    assert port.active["transport_params"][0]["source_port"] == 3240
    assert port.active["transport_params"][0]["interface_ip"] == "192.0.2.2"


def test_relative_and_absolute_activations_are_scheduled() -> None:
    port = receiver()
    relative = {"mode": "activate_scheduled_relative", "requested_time": "1:600000000"}
    answer = port.patch({"master_enable": True, "activation": relative}, NOW)
    assert answer.status == 202
    assert answer.due == (1_000_002, 100_000_000)
    assert port.active["master_enable"] is False
    with pytest.raises(PatchError) as locked:
        port.patch({"master_enable": False}, NOW)
    assert locked.value.status == 423
    # A null mode cancels it; an absolute one takes its place.
    port.patch({"activation": {"mode": None}}, NOW)
    assert port.pending is None
    absolute = {"mode": "activate_scheduled_absolute", "requested_time": "2000000:0"}
    assert port.patch({"activation": absolute}, NOW).due == (2_000_000, 0)
    port.activate((2_000_000, 0))
    assert port.active["master_enable"] is True
    assert port.active["activation"]["mode"] == "activate_scheduled_absolute"
    assert port.pending is None


@pytest.mark.parametrize(
    ("body", "status", "why"),
    [
        ({"bad": "data"}, 400, "unknown parameter"),
        ([], 400, "JSON object"),
        ({"master_enable": "yes"}, 400, "true or false"),
        ({"sender_id": "not-a-uuid"}, 400, "not a UUID"),
        ({"transport_params": []}, 400, "1 leg"),
        ({"transport_params": [{"destination_port": 5004}]}, 400, "unknown transport"),
        ({"transport_params": [{"source_ip": "server.example"}]}, 400, "not an IP"),
        ({"transport_params": [{"source_port": 0}]}, 400, "port 1..65535"),
        ({"transport_params": [{"interface_ip": "203.0.113.9"}]}, 400, "not one of"),
        ({"transport_params": [{"interface_ip": None}]}, 400, "may not be null"),
        ({"transport_params": [{"source_ip": "auto"}]}, 400, "does not take 'auto'"),
        ({"transport_file": {"data": "v=0\n", "type": "application/sdp"}}, 400, "refused"),
        ({"transport_file": {"data": "x", "type": "text/plain"}}, 400, "SDP"),
        ({"activation": {"mode": "now"}}, 400, "not one of"),
        ({"activation": {"mode": "activate_scheduled_relative"}}, 400, "TAI"),
        (
            {"activation": {"mode": "activate_immediate", "requested_time": "1:0"}},
            400,
            "no requested",
        ),
    ],
)
def test_bad_patches_are_refused_and_change_nothing(body: Any, status: int, why: str) -> None:
    port = receiver()
    before = (repr(port.staged), repr(port.active))
    with pytest.raises(PatchError, match=why) as refused:
        port.patch(body, NOW)
    assert refused.value.status == status
    assert (repr(port.staged), repr(port.active)) == before


def test_a_sender_offers_only_where_it_listens() -> None:
    port = sender()
    assert port.constraints() == [
        {"source_ip": {"enum": ["192.0.2.10"]}, "source_port": {"enum": [3240]}}
    ]
    with pytest.raises(PatchError, match="not one of"):
        port.patch({"transport_params": [{"source_port": 4000}]}, NOW)
    with pytest.raises(PatchError, match="unknown parameter"):
        port.patch({"transport_file": {"data": None}}, NOW)
    port.patch(
        {"transport_params": [{"source_ip": "auto"}], "activation": {"mode": "activate_immediate"}},
        NOW,
    )
    assert port.active["transport_params"][0]["source_ip"] == "192.0.2.10"
