"""Names of tasks and queues, and which queue serves which sequence.

Every sequence has its own Celery queue, ``numbering.<sequence>``. A deployment with
thousands of sequences can map them instead onto K shard queues,
``numbering.shard.<i>-of-<K>``, by a stable hash of the name (CRC-32, the same in every
process and every Python version), still with one consumer per queue, so each sequence's
requests stay in order.

A queue name longer than 200 bytes of UTF-8 (a sequence name of long non-ASCII text) is
cut there and ends in ``~`` and 16 hex digits of its SHA-256: RabbitMQ refuses names of
more than 255 bytes, and the rest leaves room for the names numbering derives from a
queue's.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from numbering.errors import InvalidValueError
from numbering.validation import check_sequence_name

if TYPE_CHECKING:
    from kombu.entity import Queue

__all__ = [
    "BATCH_TASK_NAME",
    "DEAD_LETTER_EXCHANGE",
    "DEAD_LETTER_QUEUE",
    "DELIVERY_LIMIT",
    "FREEZE_TASK_NAME",
    "MAX_QUEUE_BYTES",
    "VOID_TASK_NAME",
    "QUEUE_PREFIX",
    "QUEUE_TYPES",
    "REPLY_HEADER",
    "TASK_NAME",
    "Shard",
    "dead_letter_queue",
    "declared_otherwise",
    "kombu_queue",
    "queue_for",
    "sequence_queue",
]

# The Celery task that assigns numbers; callable with send_task from any Celery app.
TASK_NAME = "numbering.assign"
# The Celery task that numbers a table's rows in place (sent to the control queue).
BATCH_TASK_NAME = "numbering.batch"
# Administrative tasks, consumed from the control queue by numbering workers.
VOID_TASK_NAME = "numbering.void"
FREEZE_TASK_NAME = "numbering.freeze"
# Prefix of every queue numbering consumes.
QUEUE_PREFIX = "numbering."
# Message header naming the Redis list a lean client waits on for its reply.
REPLY_HEADER = "numbering_reply"
# The most shard queues a deployment may use.
MAX_SHARDS = 4096
# The longest queue name in bytes of UTF-8 (RabbitMQ's limit is 255; see the module doc).
MAX_QUEUE_BYTES = 200
# RabbitMQ queue types numbering declares (NUMBERING_QUEUE_TYPE).
QUEUE_TYPES = ("classic", "quorum")
# A quorum queue dead-letters a message delivered more than this many times. The worker
# quarantines a request on its MAX_DELIVERIES + 1st delivery (numbering.tasks.redelivery:
# 3), answering its caller; this backstop is above that, so it only catches a message
# that stops the worker before it is counted.
DELIVERY_LIMIT = 5
# Where quorum queues dead-letter: an exchange and a queue whose names no sequence's
# queue can take ("/" is never in a sequence name).
DEAD_LETTER_EXCHANGE = "numbering/quarantine"
DEAD_LETTER_QUEUE = "numbering/quarantine"


# Queue names numbering keeps for itself after the prefix: the control queue, and the
# shard queues (Shard.queue).
_OWN_QUEUE = re.compile(r"control|shard\.[0-9]+-of-[0-9]+")


def sequence_queue(sequence: str) -> str:
    """The queue of ``sequence`` when it has its own: ``numbering.<sequence>``.

    A sequence named like one of numbering's own queues (``control``,
    ``shard.<i>-of-<K>``) gets ``numbering./<sequence>`` instead: no sequence name holds
    ``/``, so that queue is nobody else's.

    >>> sequence_queue("invoices")
    'numbering.invoices'
    >>> sequence_queue("control")
    'numbering./control'
    >>> len(sequence_queue("\u00e9" * 100).encode()) <= MAX_QUEUE_BYTES
    True
    """
    checked = check_sequence_name(sequence)
    name = QUEUE_PREFIX + ("/" if _OWN_QUEUE.fullmatch(checked) else "") + checked
    raw = name.encode()
    if len(raw) <= MAX_QUEUE_BYTES:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:16]
    head = raw[: MAX_QUEUE_BYTES - len(digest) - 1].decode(errors="ignore")
    return f"{head}~{digest}"


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0 <= index < count)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        for value in (self.index, self.count):
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidValueError("shard index and count must be integers")
        if not 1 <= self.count <= MAX_SHARDS:
            raise InvalidValueError(f"shard count must be 1..{MAX_SHARDS}, got {self.count}")
        if not 0 <= self.index < self.count:
            raise InvalidValueError(
                f"shard index must be 0..{self.count - 1} for {self.count} shards, got {self.index}"
            )

    @classmethod
    def parse(cls, text: str) -> Shard:
        """Parse ``"I/K"``, e.g. ``"3/8"`` for shard 3 of 8."""
        index, sep, count = text.partition("/")
        try:
            if not sep:
                raise ValueError
            numbers = int(index), int(count)
        except ValueError:
            raise InvalidValueError(f"shard must be written I/K, e.g. 0/8, got {text!r}") from None
        return cls(*numbers)  # range errors keep their own message

    @property
    def queue(self) -> str:
        return f"{QUEUE_PREFIX}shard.{self.index}-of-{self.count}"

    @classmethod
    def of(cls, sequence: str, count: int) -> Shard:
        """The shard that serves ``sequence`` among ``count`` shards."""
        name = check_sequence_name(sequence)
        return cls(zlib.crc32(name.encode()) % count, count)

    def serves(self, sequence: str) -> bool:
        return Shard.of(sequence, self.count) == self


def queue_for(sequence: str, shards: int | None = None) -> str:
    """The queue that carries requests for ``sequence``.

    ``shards=None`` (the default) gives the sequence's own queue; ``shards=K`` gives its
    shard queue among K. Clients and workers must agree on K.
    """
    if shards is None:
        return sequence_queue(sequence)
    return Shard.of(sequence, shards).queue


def kombu_queue(name: str, queue_type: str = "classic") -> Queue:
    """The kombu declaration of numbering queue ``name``, the same for every party.

    On RabbitMQ the queue is durable and single-active-consumer, so a standby worker
    consumes only when the active one is gone. RabbitMQ refuses a second declaration with
    different arguments, so plain Celery callers should publish with this object
    (``send_task(..., queue=kombu_queue(queue_for("invoices"), settings.queue_type))``).
    Redis ignores the arguments.

    ``queue_type="quorum"``: a quorum queue (replicated over the cluster's nodes by Raft)
    that counts deliveries and, past :data:`DELIVERY_LIMIT`, dead-letters a message to
    :data:`DEAD_LETTER_QUEUE` (at least once: the message leaves the queue only once the
    dead-letter queue has it). The worker quarantines a request that keeps stopping it
    before that limit; the limit catches what stops the worker before it can count.
    """
    # Imported here: `import numbering` (allocate in one's own transaction) loads no
    # kombu or Celery.
    from kombu.entity import Exchange, Queue

    arguments: dict[str, object] = {"x-single-active-consumer": True}
    if queue_type == "quorum":
        arguments |= {
            "x-queue-type": "quorum",
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",  # what at-least-once dead-lettering requires
        }
    elif queue_type != "classic":
        raise InvalidValueError(
            f"queue type must be {' or '.join(QUEUE_TYPES)}, got {queue_type!r}"
        )
    return Queue(
        name,
        Exchange(name, type="direct", durable=True),
        routing_key=name,
        durable=True,
        queue_arguments=arguments,
    )


def declared_otherwise(exc: BaseException, queue: str, queue_type: str) -> str | None:
    """What to tell when RabbitMQ refused to declare ``queue`` because it exists with
    other arguments (406 PRECONDITION_FAILED "inequivalent arg"), else None. A queue's
    type and arguments cannot change in place."""
    text = str(exc)
    found = re.search(r"inequivalent arg '([^']+)'", text)
    if found is None:
        return None
    detail = text[text.find("received", found.end()) :] if "received" in text else ""
    return (
        f"RabbitMQ queue {queue} exists with other arguments than NUMBERING_QUEUE_TYPE="
        f"{queue_type} declares ({found.group(1)}: {detail or 'differs'}): a queue's type "
        "cannot change in place. Give every client and worker the same "
        "NUMBERING_QUEUE_TYPE, or migrate the queue (docs/deployment.md, RabbitMQ: "
        "changing the queue type)"
    )


def dead_letter_queue() -> Queue:
    """The kombu declaration of :data:`DEAD_LETTER_QUEUE` and its fanout exchange, where
    quorum queues dead-letter the requests quarantined (one queue for all: each message
    names its queue in its ``x-death`` header)."""
    from kombu.entity import Exchange, Queue

    return Queue(
        DEAD_LETTER_QUEUE,
        Exchange(DEAD_LETTER_EXCHANGE, type="fanout", durable=True),
        durable=True,
        queue_arguments={"x-queue-type": "quorum"},
    )
