"""The in-memory transport: in-process queues for ``numbering demo`` and for unit tests.

A :class:`MemoryBroker` holds queues of parsed requests (objects, not encoded messages);
a :class:`MemoryTransport` hands them to :class:`numbering.tasks.consumer.Consumer`
exactly as the Redis and RabbitMQ transports hand theirs: in batches, unacknowledged
until answered, and what a consumer had in hand when it failed comes back, marked
redelivered, when it opens the transport again. :class:`MemoryReplies` answers waiting
threads instead of Redis lists, and :class:`MemoryAttempts` keeps the redelivery counts
and dead letters. Nothing survives the process: a real deployment uses a broker.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from numbering.messages import BadMessage, Job, encode_redis_message
from numbering.tasks.transport import Delivery, consumer_name

__all__ = ["MemoryAttempts", "MemoryBroker", "MemoryReplies", "MemoryTransport"]


@dataclass
class _Message:
    id: int
    item: Job | BadMessage
    redelivered: bool = False


class MemoryBroker:
    """Named in-process queues, oldest first."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._queues: dict[str, deque[_Message]] = defaultdict(deque)
        self._ids = itertools.count(1)

    def publish(self, queue: str, item: Job | BadMessage) -> None:
        """Put ``item`` at the end of ``queue``."""
        with self._changed:
            self._queues[queue].append(_Message(next(self._ids), item))
            self._changed.notify_all()

    def waiting(self, queue: str) -> int:
        """How many messages wait in ``queue``."""
        with self._changed:
            return len(self._queues[queue])

    def _take(
        self, queues: Sequence[str], limit: int, timeout: float
    ) -> list[tuple[str, _Message]]:
        with self._changed:
            self._changed.wait_for(lambda: any(self._queues[q] for q in queues), timeout)
            taken: list[tuple[str, _Message]] = []
            for queue in queues:
                while self._queues[queue] and len(taken) < limit:
                    taken.append((queue, self._queues[queue].popleft()))
            return taken

    def _give_back(self, returned: Iterable[tuple[str, _Message]]) -> None:
        with self._changed:
            for queue, message in reversed(list(returned)):
                message.redelivered = True
                self._queues[queue].appendleft(message)
            self._changed.notify_all()


class MemoryAttempts:
    """Redelivery counts and dead letters, in memory."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = defaultdict(int)
        self.dead: dict[str, list[bytes | str]] = defaultdict(list)

    def count(self, queue: str, tag: str) -> int:
        self.counts[queue, tag] += 1
        return self.counts[queue, tag]

    def forget(self, queue: str, tag: str) -> None:
        self.counts.pop((queue, tag), None)

    def keep(self, queue: str, stored: bytes | str) -> str:
        self.dead[queue].append(stored)
        return f"the in-memory dead letters of {queue}"


class MemoryTransport:
    """The consumer side of a :class:`MemoryBroker`'s ``queues``."""

    def __init__(
        self, broker: MemoryBroker, queues: Sequence[str], *, poll_seconds: float = 0.1
    ) -> None:
        self.name = consumer_name(queues)
        self.broker = broker
        self.queues = list(queues)
        self.errors: tuple[type[BaseException], ...] = ()
        self.attempts = MemoryAttempts()
        self.poll_seconds = poll_seconds
        self._unacked: dict[int, tuple[str, _Message]] = {}

    def open(self) -> None:
        # What the last turn had in hand and did not acknowledge goes back to the front.
        returned, self._unacked = list(self._unacked.values()), {}
        self.broker._give_back(returned)

    def receive(self, limit: int, more: bool = False) -> list[Delivery]:
        taken = self.broker._take(self.queues, limit, 0 if more else self.poll_seconds)
        for queue, message in taken:
            self._unacked[message.id] = (queue, message)
        return [Delivery(queue, m.item, m.redelivered, m) for queue, m in taken]

    def tag(self, delivery: Delivery) -> str:
        return str(delivery.raw.id)

    def dead_letter(self, delivery: Delivery) -> str:
        item = delivery.item
        if isinstance(item, BadMessage):
            return json.dumps({"key": item.key, "error": str(item.error)})
        request = item.request
        kwargs: dict[str, Any] = {
            "sequence": item.sequence,
            "key": request.key,
            "count": request.count,
            "reference": request.reference,
        }
        if request.date is not None:
            kwargs["date"] = str(request.date)
        return encode_redis_message(delivery.queue, kwargs, item.reply_to)

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            self._unacked.pop(delivery.raw.id, None)
            if delivery.redelivered:
                self.attempts.forget(delivery.queue, self.tag(delivery))

    def flush(self) -> None:
        """Nothing is deferred."""

    def recheck(self) -> None:
        """One consumer per broker object: nothing to check."""

    def close(self, stopping: bool) -> None:
        if stopping:  # as a broker does when its consumer goes away
            self.open()

    @property
    def unacknowledged(self) -> int:
        """Messages handed out and not acknowledged."""
        return len(self._unacked)


class MemoryReplies:
    """Answers kept by reply list for the threads that wait for them."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._replies: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def push(self, replies: Sequence[tuple[str, dict[str, Any]]]) -> None:
        with self._changed:
            for name, reply in replies:
                self._replies[name].append(reply)
            self._changed.notify_all()

    def wait(self, name: str, timeout: float) -> dict[str, Any] | None:
        """The oldest answer on ``name``, waiting up to ``timeout`` seconds (None: none)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not self._replies.get(name):
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)
            return self._replies[name].pop(0)
