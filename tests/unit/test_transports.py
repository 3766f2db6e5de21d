"""The transports' own rules, without a broker: what comes back redelivered, the one
dead-letter format, the redelivery policy's count."""

from __future__ import annotations

import json
import uuid

import pytest
import redis
from kombu.message import Message

from numbering import Request
from numbering.errors import (
    InvalidRequestError,
    InvalidSequenceNameError,
    InvalidValueError,
    QuarantinedError,
)
from numbering.messages import BadMessage, Job, decode_redis_message, encode_redis_message
from numbering.routing import (
    DEAD_LETTER_EXCHANGE,
    DEAD_LETTER_QUEUE,
    DELIVERY_LIMIT,
    dead_letter_queue,
    kombu_queue,
    sequence_queue,
)
from numbering.tasks.amqp_transport import AmqpTransport, parse_amqp
from numbering.tasks.memory import MemoryAttempts, MemoryBroker, MemoryTransport
from numbering.tasks.quarantine import _describe
from numbering.tasks.redelivery import MAX_DELIVERIES, Redelivery
from numbering.tasks.transport import Delivery, consumer_name

QUEUE = sequence_queue("invoices")


def job(key: str) -> Job:
    return Job(uuid.uuid4().hex, "invoices", Request(key), "numbering.reply.x")


def test_what_a_consumer_did_not_acknowledge_comes_back_redelivered_first() -> None:
    broker = MemoryBroker()
    transport = MemoryTransport(broker, [QUEUE], poll_seconds=0.01)
    for key in ("a", "b", "c"):
        broker.publish(QUEUE, job(key))
    transport.open()
    first = transport.receive(2)
    assert [d.item.request.key for d in first] == ["a", "b"]  # type: ignore[union-attr]
    assert not any(d.redelivered for d in first)
    transport.ack(first[:1])
    transport.close(stopping=False)
    transport.open()  # as after a failed turn: "b" was in hand and not acknowledged
    again = transport.receive(10)
    assert [(d.item.request.key, d.redelivered) for d in again] == [  # type: ignore[union-attr]
        ("b", True),
        ("c", False),
    ]
    transport.ack(again)
    assert transport.unacknowledged == 0
    assert broker.waiting(QUEUE) == 0
    assert transport.receive(10) == []


def test_a_stopping_consumer_gives_back_what_it_holds() -> None:
    broker = MemoryBroker()
    transport = MemoryTransport(broker, [QUEUE], poll_seconds=0.01)
    broker.publish(QUEUE, job("a"))
    transport.open()
    assert len(transport.receive(10)) == 1
    transport.close(stopping=True)
    assert broker.waiting(QUEUE) == 1


def test_a_consumer_needs_a_queue() -> None:
    assert consumer_name(["numbering.a", "numbering.b"]) == "numbering.a,numbering.b"
    with pytest.raises(ValueError, match="at least one queue"):
        MemoryTransport(MemoryBroker(), [])


def amqp_message(item: Job) -> Message:
    """What kombu hands the RabbitMQ transport for a request the client sent."""
    headers, body = decode_redis_message(
        encode_redis_message(QUEUE, {"sequence": item.sequence, "key": item.request.key}, None)
    )
    return Message(
        body=json.dumps(body).encode(),
        content_type="application/json",
        content_encoding="utf-8",
        headers=headers,
        properties={"correlation_id": headers["id"]},
        delivery_info={"redelivered": True, "routing_key": QUEUE},
    )


def test_a_rabbitmq_dead_letter_is_kept_in_the_redis_format() -> None:
    transport = AmqpTransport(
        "amqp://guest:guest@127.0.0.1:1//", [QUEUE], replies=redis.Redis(), batch_size=10
    )  # nothing connects: kombu and redis-py connect on first use
    message = amqp_message(job("poison"))
    item = parse_amqp(message)
    assert isinstance(item, Job)
    kept = transport.dead_letter(Delivery(QUEUE, item, True, message))
    # `numbering quarantine list` reads it as it reads a Redis one, and a Redis queue
    # would take it back as it is.
    described = _describe(QUEUE, kept)
    assert (described.sequence, described.key, described.problem) == ("invoices", "poison", None)
    assert described.task_id == item.task_id
    headers, body = decode_redis_message(kept)
    assert headers == message.headers
    assert body == json.loads(message.body)


def test_a_message_that_is_not_json_is_kept_as_it_came_and_listed_as_unreadable() -> None:
    transport = AmqpTransport(
        "amqp://guest:guest@127.0.0.1:1//", [QUEUE], replies=redis.Redis(), batch_size=10
    )
    message = Message(body=b"\x80\x04pickle", content_type="application/x-python-serialize")
    item = parse_amqp(message)
    assert isinstance(item, BadMessage)
    assert isinstance(item.error, InvalidRequestError)
    described = _describe(QUEUE, transport.dead_letter(Delivery(QUEUE, item, True, message)))
    assert described.problem is not None
    assert "JSON only" in described.problem


def test_the_policy_quarantines_on_the_try_after_max_deliveries() -> None:
    attempts = MemoryAttempts()
    policy = Redelivery(attempts)
    tries = [policy.count(QUEUE, "tag") for _ in range(MAX_DELIVERIES + 1)]
    assert tries == list(range(1, MAX_DELIVERIES + 2))
    assert [policy.exhausted(n) for n in tries] == [False] * MAX_DELIVERIES + [True]
    item = job("poison")
    answer = policy.quarantine(QUEUE, item, "stored", tries[-1])
    assert isinstance(answer.error, QuarantinedError)
    assert (answer.task_id, answer.key, answer.reply_to) == (
        item.task_id,
        "poison",
        item.reply_to,
    )
    assert f"stopped the worker {MAX_DELIVERIES} times" in str(answer.error)
    assert attempts.dead[QUEUE] == ["stored"]
    attempts.forget(QUEUE, "tag")
    assert policy.count(QUEUE, "tag") == 1  # an answered request starts over


def test_a_broker_s_own_count_decides_where_it_keeps_one() -> None:
    """Quorum queues count redeliveries (x-delivery-count, 1 on the first): the policy
    takes that count as the store's would be, and asks its store nothing."""
    attempts = MemoryAttempts()
    policy = Redelivery(attempts)
    assert [policy.count(QUEUE, "tag", n) for n in range(1, 5)] == [1, 2, 3, 4]
    assert not policy.exhausted(policy.count(QUEUE, "tag", MAX_DELIVERIES))
    assert policy.exhausted(policy.count(QUEUE, "tag", MAX_DELIVERIES + 1))
    assert dict(attempts.counts) == {}


def test_quorum_queues_dead_letter_above_the_worker_s_own_limit() -> None:
    """A quorum queue's delivery limit is a backstop: the worker quarantines first (and
    answers the caller); RabbitMQ dead-letters only what the worker could not count."""
    assert DELIVERY_LIMIT > MAX_DELIVERIES + 1
    classic = kombu_queue(QUEUE).queue_arguments
    assert classic == {"x-single-active-consumer": True}
    quorum = kombu_queue(QUEUE, "quorum").queue_arguments
    assert quorum["x-queue-type"] == "quorum"
    assert quorum["x-single-active-consumer"] is True
    assert quorum["x-delivery-limit"] == DELIVERY_LIMIT
    assert quorum["x-dead-letter-exchange"] == DEAD_LETTER_EXCHANGE
    assert quorum["x-dead-letter-strategy"] == "at-least-once"
    assert dead_letter_queue().name == DEAD_LETTER_QUEUE
    # No sequence's queue can take the dead-letter queue's name ("/" is never in one).
    with pytest.raises(InvalidSequenceNameError):
        sequence_queue(DEAD_LETTER_QUEUE.removeprefix("numbering."))
    with pytest.raises(InvalidValueError, match="classic or quorum"):
        kombu_queue(QUEUE, "stream")
