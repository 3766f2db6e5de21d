"""The RabbitMQ transport.

kombu over AMQP already delivers thousands of messages a second to one consumer, so here
RabbitMQ pushes up to ``batch_size`` unacknowledged messages per queue (``basic.qos``
prefetch), and a turn takes everything already delivered from all of the worker's queues
as one batch. A consumer that dies leaves its messages unacknowledged and RabbitMQ
delivers them again, marked redelivered. Queues are declared single-active-consumer (see
:func:`numbering.routing.kombu_queue`): RabbitMQ itself keeps standby consumers idle and
hands the queue to one of them when the active consumer goes away.

Classic queues: attempt counts and dead letters live in the reply Redis. Quorum queues
(``NUMBERING_QUEUE_TYPE=quorum``) count deliveries themselves (``x-delivery-count``), and a
quarantined request is rejected into RabbitMQ's dead-letter queue ``numbering/quarantine``
(at least once: it leaves its queue only once the dead-letter queue has it), where
``numbering quarantine list`` reads it and ``replay`` takes it back.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import redis
from kombu.connection import Connection
from kombu.message import Message
from kombu.messaging import Consumer

from numbering.brokers import attempts_hash, dead_letter_list, redis_client
from numbering.errors import InvalidRequestError, NumberingError
from numbering.messages import MAX_MESSAGE_BYTES, BadMessage, Job, envelope, parse_task
from numbering.routing import (
    DEAD_LETTER_QUEUE,
    dead_letter_queue,
    declared_otherwise,
    kombu_queue,
)
from numbering.tasks.fleet import HOLDERS, Fleet, owner_of, read_holders
from numbering.tasks.guard import ConsumerLock
from numbering.tasks.redelivery import RedisAttempts, redis_dead_letters, redis_quarantined
from numbering.tasks.transport import AttemptStore, Delivery, QueueState, consumer_name

__all__ = ["AmqpBroker", "AmqpTransport", "parse_amqp"]

log = logging.getLogger("numbering.worker")

# Seconds a consumer waits for a delivery before checking its stop flag and heartbeats.
POLL_SECONDS = 1
# Seconds between a fleet member's looks at the fleet (well within MEMBER_TTL), and
# between its checks that its consumer locks' database sessions are alive.
FLEET_CHECK_SECONDS = 1.0
LOCK_CHECK_SECONDS = 5.0


def parse_amqp(message: Message) -> Job | BadMessage:
    """A delivered AMQP message as a :class:`Job`, or why it is refused."""
    try:
        if message.content_type != "application/json":
            raise InvalidRequestError(
                f"message content type {message.content_type!r} refused: JSON only"
            )
        body = message.body
        if len(body) > MAX_MESSAGE_BYTES:
            raise InvalidRequestError(
                f"message is {len(body)} bytes; the limit is {MAX_MESSAGE_BYTES}"
            )
        try:
            decoded = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise InvalidRequestError("message body is not JSON") from None
        headers = message.headers if isinstance(message.headers, dict) else {}
    except NumberingError as error:
        return BadMessage(None, None, None, error)
    item = parse_task(headers, decoded)
    # A plain Celery caller (no numbering reply list) names its reply queue as AMQP
    # properties; one on the rpc:// result backend waits there.
    reply_to = message.properties.get("reply_to")
    if item.reply_to is None and item.task_id and isinstance(reply_to, str) and reply_to:
        correlation = message.properties.get("correlation_id") or item.task_id
        item = dataclasses.replace(item, rpc=(reply_to, str(correlation)))
    return item


def _delivery_count(message: Message) -> int:
    """How many times a quorum queue handed ``message`` back to a consumer so far
    (``x-delivery-count``: absent on the first delivery, 1 on the first redelivery)."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    count = headers.get("x-delivery-count")
    # Read only for a redelivered message, which has come back at least once.
    return count if isinstance(count, int) and count >= 1 else 1


class RabbitMQKeeps:
    """The attempt store of quorum queues: RabbitMQ counts deliveries and keeps the dead
    letters (rejected into its dead-letter queue when acknowledged)."""

    def count(self, queue: str, tag: str) -> int:
        raise AssertionError("quorum queues count deliveries themselves")

    def forget(self, queue: str, tag: str) -> None:
        """Nothing to forget: the count goes with the message."""

    def keep(self, queue: str, stored: bytes | str) -> str:
        return f"RabbitMQ's dead-letter queue {DEAD_LETTER_QUEUE}"


def _body(message: Message) -> bytes:
    body = message.body
    return body if isinstance(body, bytes) else str(body).encode()


class AmqpTransport:
    """One connection, one channel, one kombu consumer per queue on it: what RabbitMQ has
    delivered from any of the queues is one batch. RabbitMQ picks the active consumer of
    each queue on its own, so a worker may be active on some of its queues and a standby
    on others.

    In a fleet (``fleet`` and ``locks``: :mod:`numbering.tasks.fleet`) a worker consumes
    only the queues it owns, each once it holds the queue's consumer lock in the database;
    a queue it no longer owns is cancelled, what RabbitMQ delivered meanwhile answered,
    and only then its lock released, so that its new owner starts after it."""

    def __init__(
        self,
        broker_url: str,
        queues: Sequence[str],
        *,
        replies: redis.Redis,
        batch_size: int,
        queue_type: str = "classic",
        fleet: Fleet | None = None,
        locks: Mapping[str, ConsumerLock] | None = None,
    ) -> None:
        self.name = consumer_name(queues)
        self.fleet = fleet
        self.locks = dict(locks or {})
        if fleet is not None and set(self.locks) != set(queues):
            raise ValueError("a fleet member needs a consumer lock for each of its queues")
        self.replies = replies
        self.broker_url = broker_url
        self.queues = list(queues)
        self.queue_type = queue_type
        self.quorum = queue_type == "quorum"
        self.attempts: AttemptStore = RabbitMQKeeps() if self.quorum else RedisAttempts(replies)
        self.batch_size = batch_size
        probe = Connection(broker_url)
        self.errors: tuple[type[BaseException], ...] = (
            OSError,
            *probe.connection_errors,
            *probe.channel_errors,
        )
        self._connection: Connection | None = None
        self._channel: Any = None
        self._subscribed: dict[str, Consumer] = {}
        self._leaving: list[str] = []  # cancelled; their locks go at the next receive
        self._delivered: list[tuple[str, Message]] = []
        self._active: set[str] = set()  # the queues that have delivered on this connection
        self._balanced = -float("inf")  # when the fleet was last looked at
        self._verified = -float("inf")  # when the held locks' sessions were last asked

    def open(self) -> None:
        connection = Connection(self.broker_url, heartbeat=30)
        self._connection = connection
        self._subscribed = {}
        self._delivered = []
        self._active = set()
        self._balanced = -float("inf")
        channel = connection.channel()
        self._channel = channel
        # Per consumer (a_global=False): each queue may have batch_size unacknowledged,
        # in all the batches in flight.
        channel.basic_qos(prefetch_size=0, prefetch_count=self.batch_size, a_global=False)
        if self.quorum:
            dead_letter_queue()(channel).declare()
        if self.fleet is not None:
            return  # the first receive takes the queues this member owns
        for queue in self.queues:
            self._subscribe(queue)
        log.info(
            "consuming %s; RabbitMQ's single-active-consumer decides which worker is active",
            self.name,
        )

    def _subscribe(self, queue: str) -> None:
        consumer = Consumer(
            self._channel,
            queues=[kombu_queue(queue, self.queue_type)],
            on_message=lambda message: self._delivered.append((queue, message)),
            no_ack=False,
        )
        consumer.consume()
        self._subscribed[queue] = consumer

    def _rebalance(self) -> None:
        """Say this member is alive; cancel the queues it no longer owns (their locks go
        at the next receive, once what was delivered meanwhile is answered); take the
        lock of, and consume, each queue it owns and does not serve yet."""
        fleet = self.fleet
        assert fleet is not None
        owned = fleet.look(self.queues)
        verify = time.monotonic() - self._verified > LOCK_CHECK_SECONDS
        if verify:
            self._verified = time.monotonic()
        for queue in self.queues:
            if queue in self._subscribed:
                if verify and not self.locks[queue].still_held():
                    # Its database session is gone (a failover): the lock with it.
                    log.warning("%s: lost the consumer lock; serving it no longer", queue)
                    self._subscribed.pop(queue).cancel()
                elif queue not in owned:
                    self._subscribed.pop(queue).cancel()
                    self._leaving.append(queue)
                continue
            if queue in owned and queue not in self._leaving and self.locks[queue].try_acquire():
                self._subscribe(queue)
                self.replies.hset(HOLDERS, queue, fleet.member)
                log.info("active consumer of %s (fleet)", queue)

    def receive(self, limit: int, more: bool = False) -> list[Delivery]:
        connection = self._connection
        assert connection is not None, "open() first"
        if more:
            # Batches in flight: what has arrived, unless a queue is to be handed over
            # or the fleet is due a look (a cancelled queue's lock goes only once what
            # it delivered is answered).
            if self._leaving or self._fleet_due():
                return []
            return self._take(limit)
        for queue in self._leaving:  # what it delivered before the cancel is answered
            self.locks[queue].release()
            log.info(
                "%s: handed over to %s",
                queue,
                owner_of(queue, self.fleet.members) if self.fleet else "another worker",
            )
        self._leaving = []
        if self._fleet_due():
            self._rebalance()
            self._balanced = time.monotonic()
        if not self._delivered:
            try:
                connection.drain_events(timeout=POLL_SECONDS)
            except TimeoutError:
                connection.heartbeat_check()
                return []
        return self._take(limit)

    def _fleet_due(self) -> bool:
        return self.fleet is not None and time.monotonic() - self._balanced > FLEET_CHECK_SECONDS

    def _take(self, limit: int) -> list[Delivery]:
        """What RabbitMQ has delivered (at least ``limit``, if it has that many), without
        waiting: all of it, so that nothing of a cancelled queue stays behind."""
        connection = self._connection
        assert connection is not None
        while len(self._delivered) < limit:
            try:  # take what has already arrived, without waiting for more
                connection.drain_events(timeout=0)
            except TimeoutError:
                break
        batch, self._delivered = self._delivered, []
        for queue in dict.fromkeys(queue for queue, _ in batch):
            if queue not in self._active:
                # RabbitMQ delivers only to a queue's active consumer: the first delivery
                # is how a standby learns that it took the queue over.
                self._active.add(queue)
                log.info("active consumer of %s (RabbitMQ delivers to this worker)", queue)
        return [
            Delivery(
                queue,
                parse_amqp(m),
                bool(m.delivery_info.get("redelivered")),
                m,
                redeliveries=_delivery_count(m) if self.quorum else None,
            )
            for queue, m in batch
        ]

    def tag(self, delivery: Delivery) -> str:
        return delivery.item.task_id or hashlib.sha256(_body(delivery.raw)).hexdigest()

    def dead_letter(self, delivery: Delivery) -> str:
        message: Message = delivery.raw
        headers = message.headers if isinstance(message.headers, dict) else {}
        return envelope(
            delivery.queue,
            headers,
            _body(message),
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            correlation_id=message.properties.get("correlation_id"),
        )

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            if delivery.quarantined and self.quorum:
                # Dead-lettered by RabbitMQ, at least once, into numbering/quarantine.
                delivery.raw.reject(requeue=False)
                continue
            delivery.raw.ack()
            if delivery.redelivered:
                self.attempts.forget(delivery.queue, self.tag(delivery))

    def flush(self) -> None:
        """Nothing is deferred: every ack is sent as it is made."""

    def recheck(self) -> None:
        """Outside a fleet RabbitMQ, not the database, picks the active consumer: nothing
        to check. A fleet member asks its locks' sessions at its next look at the fleet
        (the database failed over: the locks went with the old primary)."""
        self._balanced = self._verified = -float("inf")

    def close(self, stopping: bool) -> None:
        # Unacknowledged messages go back to their queue when the connection closes.
        connection, self._connection = self._connection, None
        subscribed, self._subscribed = self._subscribed, {}
        try:
            for consumer in subscribed.values():
                with contextlib.suppress(*self.errors):
                    consumer.cancel()
        finally:
            if connection is not None:
                connection.release()
            if stopping and self.fleet is not None:
                for lock in self.locks.values():
                    lock.release()
                with contextlib.suppress(redis.RedisError, OSError):
                    self.fleet.leave()  # the others take its queues at once


class AmqpBroker:
    """What the operator commands and the start-up check ask of RabbitMQ: its queues'
    counts (by passive declaration), the dead letters and their replay (publishing them
    back, confirmed). Classic queues keep dead letters and attempt counts in the reply
    Redis; quorum queues in RabbitMQ's dead-letter queue."""

    def __init__(
        self,
        url: str,
        replies_url: str,
        sentinel_master: str | None = None,
        *,
        queue_type: str = "classic",
    ) -> None:
        self.connection = Connection(
            url, connect_timeout=5, transport_options={"confirm_publish": True}
        )
        self.queue_type = queue_type
        self.quorum = queue_type == "quorum"
        #: Where classic queues' attempt counts and dead letters are kept: the reply Redis.
        self.kept: redis.Redis = redis_client(replies_url, sentinel_master, socket_timeout=5)

    def _declared(self, queue: str) -> Any:
        """RabbitMQ's counts for ``queue``, or None if it was never declared."""
        channel = self.connection.channel()
        try:
            return kombu_queue(queue, self.queue_type)(channel).queue_declare(passive=True)
        except self.connection.channel_errors:  # 404: no such queue yet
            return None
        finally:
            with contextlib.suppress(Exception):
                channel.close()

    def declare(self, queues: Sequence[str]) -> list[str]:
        problems = []
        for queue in queues:
            channel = self.connection.channel()
            try:
                kombu_queue(queue, self.queue_type)(channel).declare()
            except self.connection.channel_errors as exc:
                problems.append(declared_otherwise(exc, queue, self.queue_type) or str(exc))
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
        if self.quorum:
            channel = self.connection.channel()
            try:
                dead_letter_queue()(channel).declare()
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
        return problems

    def queue_state(self, queue: str) -> QueueState:
        declared = self._declared(queue)
        # RabbitMQ counts ready messages; what is delivered and unacknowledged is not told.
        return QueueState(None if declared is None else declared.message_count, None, None)

    def consumers(self, queue: str) -> int | None:
        declared = self._declared(queue)
        return 0 if declared is None else int(declared.consumer_count)

    def warnings(self) -> list[str]:
        return []

    def holders(self, queues: Sequence[str]) -> dict[str, str]:
        # Kept by fleet members (on the reply Redis); otherwise RabbitMQ picks the active
        # consumer and does not say which.
        return read_holders(self.kept, queues)

    def dead_letters(self, queue: str | None = None) -> list[tuple[str, bytes | str]]:
        if not self.quorum:
            return list(redis_dead_letters(self.kept, queue))
        found: list[tuple[str, bytes | str]] = []
        with self._dead_lettered() as messages:
            for source, message in messages:
                if queue is None or source == queue:
                    found.append((source, _enveloped(source, message)))
        return found  # the channel closed unacknowledged: every message is back

    def quarantined(self, queues: Sequence[str]) -> dict[str, int]:
        if not self.quorum:
            return redis_quarantined(self.kept, queues)
        counts = dict.fromkeys(queues, 0)
        with self._dead_lettered() as messages:
            for source, _ in messages:
                if source in counts:
                    counts[source] += 1
        return counts

    @contextlib.contextmanager
    def _dead_lettered(self) -> Iterator[Iterator[tuple[str, Message]]]:
        """The messages of the dead-letter queue, each with the queue it left, taken
        unacknowledged on a channel of their own: they all go back, in their order, when
        it closes (what a message the caller acknowledges on it does not)."""
        channel = self.connection.channel()
        dead = dead_letter_queue()(channel)
        try:
            dead.declare()

            def taken() -> Iterator[tuple[str, Message]]:
                while (message := dead.get(no_ack=False)) is not None:
                    yield _dead_lettered_from(message), message

            yield taken()
        finally:
            with contextlib.suppress(Exception):
                channel.close()

    def requeue(self, queue: str) -> int:
        declared = kombu_queue(queue, self.queue_type)
        moved = 0
        with self.connection.Producer() as producer:
            if self.quorum:
                with self._dead_lettered() as messages:
                    for source, message in messages:
                        if source != queue:
                            continue
                        headers = {
                            name: value
                            for name, value in (message.headers or {}).items()
                            if not name.startswith("x-")  # RabbitMQ's: x-death, counts
                        }
                        self._publish(producer, declared, _body(message), headers, message)
                        message.ack()  # once RabbitMQ confirmed the copy in its queue
                        moved += 1
                return moved
            dead, attempts = dead_letter_list(queue), attempts_hash(queue)
            while True:
                raw = self.kept.lindex(dead, -1)  # the oldest
                if raw is None:
                    return moved
                stored = json.loads(raw)
                headers, body = stored["headers"], base64.b64decode(stored["body"])
                # Published (and confirmed by the broker) before it leaves the dead-letter
                # list: a crash in between sends it twice, which its key makes harmless.
                producer.publish(
                    body,
                    exchange=declared.exchange,
                    routing_key=queue,
                    declare=[declared],
                    headers=headers,
                    content_type=stored.get("content-type"),
                    content_encoding=stored.get("content-encoding"),
                    correlation_id=stored.get("properties", {}).get("correlation_id"),
                    delivery_mode=2,
                    retry=True,
                )
                self.kept.lrem(dead, -1, raw)  # type: ignore[arg-type]  # bytes are fine
                tag = headers.get("id") or hashlib.sha256(body).hexdigest()
                self.kept.hdel(attempts, tag)
                moved += 1

    @staticmethod
    def _publish(
        producer: Any, declared: Any, body: bytes, headers: dict[str, Any], message: Message
    ) -> None:
        producer.publish(
            body,
            exchange=declared.exchange,
            routing_key=declared.routing_key,
            declare=[declared],
            headers=headers,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            correlation_id=message.properties.get("correlation_id"),
            delivery_mode=2,
            retry=True,
        )

    def close(self) -> None:
        self.kept.close()
        self.connection.release()


def _dead_lettered_from(message: Message) -> str:
    """The queue a dead-lettered message left (its first ``x-death`` entry's)."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    first = headers.get("x-first-death-queue")
    if isinstance(first, str):
        return first
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[-1], dict):
        return str(deaths[-1].get("queue", ""))
    return ""


def _enveloped(queue: str, message: Message) -> str:
    headers = message.headers if isinstance(message.headers, dict) else {}
    return envelope(
        queue,
        {name: value for name, value in headers.items() if not name.startswith("x-")},
        _body(message),
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        correlation_id=message.properties.get("correlation_id"),
    )
