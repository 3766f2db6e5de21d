"""How the client reads broker errors: which ones mean nothing was sent, which ones no
wait can cure."""

from __future__ import annotations

import kombu.exceptions
import redis
from redis.sentinel import MasterNotFoundError

from numbering.client import _nothing_sent, _permanent


def test_only_a_failed_connect_or_a_refusal_proves_that_nothing_was_sent() -> None:
    refused = redis.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")
    assert _nothing_sent(refused)
    assert _nothing_sent(redis.TimeoutError("Timeout connecting to server"))
    assert _nothing_sent(ConnectionRefusedError(111, "Connection refused"))
    assert _nothing_sent(kombu.exceptions.OperationalError("[Errno 111] Connection refused"))
    # The server answered, refusing the write: nothing of it was kept.
    assert _nothing_sent(redis.ResponseError("NOREPLICAS Not enough good replicas to write."))
    assert _nothing_sent(redis.ReadOnlyError("You can't write against a read only replica."))
    assert _nothing_sent(redis.ConnectionError("The previous master is now a slave"))
    assert _nothing_sent(MasterNotFoundError("No master found for 'numbering'"))
    # Broken mid-way: the request may have reached the broker before the connection died.
    assert not _nothing_sent(redis.ConnectionError("Connection closed by server."))
    assert not _nothing_sent(redis.TimeoutError("Timeout reading from socket"))
    assert not _nothing_sent(kombu.exceptions.OperationalError("Socket closed"))


def test_errors_no_wait_can_cure_are_told_apart_from_passing_ones() -> None:
    assert _permanent(redis.ResponseError("DB index is out of range"))
    assert _permanent(redis.AuthenticationError("invalid username-password pair"))
    assert _permanent(redis.ResponseError("WRONGPASS invalid username-password pair"))
    assert not _permanent(redis.ReadOnlyError("You can't write against a read only replica."))
    assert not _permanent(redis.BusyLoadingError("Redis is loading the dataset in memory"))
    assert not _permanent(redis.ConnectionError("Error 111 connecting to x. Connection refused."))
    assert not _permanent(redis.ResponseError("MISCONF Redis is configured to save RDB"))
