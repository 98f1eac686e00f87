"""Which connection gives way when the HTTP endpoint's table is full."""

from __future__ import annotations

import pytest

from gateway.observability.connections import ConnectionTable


async def test_the_oldest_waiting_connection_gives_way() -> None:
    table = ConnectionTable(3)
    first, second, third = table.admit(), table.admit(), table.admit()
    first.answering = True  # busy with a request: spared while others wait
    fourth = table.admit()
    assert len(table) == 3
    assert [s.evicted for s in (first, second, third, fourth)] == [False, True, False, False]
    assert second.scope.cancel_called
    assert not first.scope.cancel_called


async def test_when_every_connection_is_answering_the_oldest_gives_way() -> None:
    table = ConnectionTable(2)
    first, second = table.admit(), table.admit()
    first.answering = second.answering = True
    table.admit()
    assert (first.evicted, second.evicted) == (True, False)
    assert len(table) == 2


async def test_a_released_connection_frees_its_place() -> None:
    table = ConnectionTable(1)
    first = table.admit()
    table.release(first)
    second = table.admit()
    assert not first.evicted
    assert len(table) == 1
    table.release(second)
    table.release(second)  # idempotent: a slot evicted earlier is released again by its task
    assert len(table) == 0


def test_the_limit_is_positive() -> None:
    with pytest.raises(ValueError, match="not positive"):
        ConnectionTable(0)
