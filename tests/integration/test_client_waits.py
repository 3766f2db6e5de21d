"""Waits that blame the right thing (issue 15): a broker that cannot be reached, a
request no worker takes, and resends that never pile up in a queue nobody consumes."""

from __future__ import annotations

import logging
import time

import pytest
import redis
from conftest import AMQP_URL, REDIS_URL
from integration.stack import Stack
from kombu.connection import Connection

from numbering import BrokerUnavailable, Client, ConfigurationError, RequestTimeout
from numbering.routing import kombu_queue, sequence_queue

pytestmark = pytest.mark.integration


def waiting(broker_url: str, sequence: str) -> int:
    """How many requests wait in ``sequence``'s queue on a Redis broker."""
    broker = redis.Redis.from_url(broker_url)
    try:
        return int(broker.llen(sequence_queue(sequence)))
    finally:
        broker.close()


def test_an_unreachable_broker_is_named_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    url = "redis://127.0.0.1:1/0"  # nothing listens there: every connection is refused
    client = Client(url, url, timeout=1.5, resend_after=0.05)
    caplog.set_level(logging.DEBUG, logger="numbering.client")
    try:
        with pytest.raises(BrokerUnavailable) as info:
            client.next_value("invoices", key="k1")
    finally:
        client.close()
    message = str(info.value)
    assert "could not send request key 'k1' on sequence 'invoices' to the broker" in message
    assert "Connection refused" in message
    assert "nothing was sent, so nothing was assigned" in message
    assert isinstance(info.value, RequestTimeout)  # code that resends on timeouts still works
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    repeats = [r for r in caplog.records if r.levelno == logging.DEBUG and "trying" in r.message]
    assert len(warnings) == 1, [r.message for r in warnings]
    assert repeats  # the later failures were seen, and kept quiet


def test_a_database_index_the_server_lacks_fails_at_once() -> None:
    url = f"{REDIS_URL}/99"
    client = Client(url, url, timeout=30)
    started = time.monotonic()
    try:
        with pytest.raises(ConfigurationError, match="DB index is out of range") as info:
            client.next_value("invoices", key="k1")
    finally:
        client.close()
    assert time.monotonic() - started < 20  # not the whole timeout
    assert "check NUMBERING_BROKER_URL" in str(info.value)


def test_resends_keep_one_copy_waiting_and_the_timeout_says_no_worker_took_it(
    redis_urls: tuple[str, str],
) -> None:
    broker_url, reply_url = redis_urls
    client = Client(broker_url, reply_url, timeout=1.5, resend_after=0.05)
    try:
        for key in ("a", "b", "c"):
            with pytest.raises(RequestTimeout) as info:
                client.next_value("orphans", key=key)
            assert info.value.detail is not None
            assert "no worker took it from queue numbering.orphans" in info.value.detail
            assert "numbering worker --sequence orphans" in str(info.value)
    finally:
        client.close()
    # Dozens of resends each, and one copy per key waits: a worker that starts later
    # does not wade through thousands of copies.
    assert waiting(broker_url, "orphans") == 3


def test_next_for_an_unknown_sequence_fails_at_once_and_queues_nothing(stack: Stack) -> None:
    stack.numbering("init-db")
    started = time.monotonic()
    done = stack.numbering("next", "nosuch", "--timeout", "30")
    assert done.returncode == 1
    assert done.stderr == (
        "error: sequence 'nosuch' does not exist; create it first "
        "(numbering sequence create nosuch)\n"
    )
    assert time.monotonic() - started < 25
    assert waiting(stack.settings.broker_url, "nosuch") == 0


def test_the_cli_says_at_once_that_the_broker_cannot_be_reached(stack: Stack) -> None:
    stack.numbering("init-db")
    stack.numbering("sequence", "create", "invoices")
    stack.env["NUMBERING_BROKER_URL"] = "redis://127.0.0.1:1/9"
    stack.env["NUMBERING_RESULT_BACKEND"] = "redis://127.0.0.1:1/9"
    done = stack.numbering("next", "invoices", "--timeout", "1")
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert len(lines) == 2, done.stderr  # one warning while it waits, then the error
    assert lines[0].startswith("warning: sending requests to redis://127.0.0.1:1/9: ")
    assert "Connection refused" in lines[0]
    assert lines[1].startswith("error: could not send request key")
    assert "is a worker running" not in done.stderr


def test_resent_copies_on_rabbitmq_expire_with_their_caller(redis_urls: tuple[str, str]) -> None:
    queue = sequence_queue("orphans-amqp")
    try:
        with Connection(AMQP_URL, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        pytest.fail(f"RabbitMQ is not available: {exc}")
    client = Client(AMQP_URL, redis_urls[1], timeout=1.0, resend_after=0.05)
    try:
        with pytest.raises(RequestTimeout) as info:
            client.next_value("orphans-amqp", key="a")
        assert info.value.detail is not None
        assert "no worker took it from queue numbering.orphans-amqp" in info.value.detail
    finally:
        client.close()
    try:
        with Connection(AMQP_URL) as conn:
            channel = conn.channel()
            bound = kombu_queue(queue)(channel)
            delivered = []
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                message = bound.get(no_ack=True)
                if message is None:
                    break
                delivered.append(message.headers.get("id"))
        # The first copy waits for a worker however long; the resends expired with the
        # caller's wait, and RabbitMQ dropped them unread.
        assert len(delivered) == 1
    finally:
        with Connection(AMQP_URL) as conn:
            kombu_queue(queue)(conn.channel()).delete()
