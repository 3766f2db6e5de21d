"""Which broker a URL names, and every Redis key numbering keeps on a broker.

One place answers "is this Redis or RabbitMQ?" (the client, the worker, the status and
quarantine commands and the settings all ask), so that a new broker (Redis Sentinel, a
quorum-queue RabbitMQ) is one more kind here rather than one more ``startswith`` in every
module. The Redis keys are named here too: the worker writes them, and ``numbering
status`` and ``numbering quarantine`` read them.
"""

from __future__ import annotations

from typing import Literal

__all__ = [
    "REDIS_SCHEMES",
    "REPLY_LIST_PREFIX",
    "SCHEMES",
    "BrokerKind",
    "attempts_hash",
    "broker_kind",
    "dead_letter_list",
    "inflight_list",
    "is_redis",
]

BrokerKind = Literal["redis", "amqp", "memory"]

# URL schemes of each kind of broker.
_SCHEMES: dict[str, BrokerKind] = {
    "redis": "redis",
    "rediss": "redis",
    "amqp": "amqp",
    "amqps": "amqp",
    "pyamqp": "amqp",
    "memory": "memory",
}
#: Every broker URL scheme numbering takes (settings validation reads it).
SCHEMES = tuple(_SCHEMES)
#: The schemes of a Redis server: the only place numbering's answers can travel.
REDIS_SCHEMES = tuple(scheme for scheme, kind in _SCHEMES.items() if kind == "redis")

#: Reply lists are Redis keys of this shape: ``numbering.reply.<random hex>``.
REPLY_LIST_PREFIX = "numbering.reply."


def scheme_of(url: str) -> str:
    """The scheme of ``url`` (``redis``, ``amqp``, ...); empty when it has none."""
    return url.partition("://")[0] if "://" in url else ""


def broker_kind(url: str) -> BrokerKind | None:
    """The kind of broker ``url`` names, or None for a scheme numbering does not know."""
    return _SCHEMES.get(scheme_of(url))


def is_redis(url: str) -> bool:
    """Whether ``url`` names a Redis server (``redis://`` or ``rediss://``)."""
    return broker_kind(url) == "redis"


def inflight_list(queue: str) -> str:
    """The Redis list holding the batch the active consumer of ``queue`` is working on."""
    return f"_numbering.inflight.{queue}"


def dead_letter_list(queue: str) -> str:
    """The Redis list where quarantined requests of ``queue`` are kept for an operator."""
    return f"_numbering.dead.{queue}"


def attempts_hash(queue: str) -> str:
    """The Redis hash counting how often each request left in flight on ``queue`` was
    tried (by the message's SHA-256), for quarantine after ``MAX_DELIVERIES``."""
    return f"_numbering.attempts.{queue}"
