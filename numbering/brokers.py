"""Which broker a URL names, and every Redis key numbering keeps on a broker.

One place answers "is this Redis or RabbitMQ?" (the client, the worker, the status and
quarantine commands and the settings all ask), so that a new broker (Redis Sentinel, a
quorum-queue RabbitMQ) is one more kind here rather than one more ``startswith`` in every
module. The Redis keys are named here too: the worker writes them, and ``numbering
status`` and ``numbering quarantine`` read them.
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import redis
import redis.sentinel

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
    "is_sentinel",
    "redis_client",
]

BrokerKind = Literal["redis", "amqp", "memory"]

# URL schemes of each kind of broker.
_SCHEMES: dict[str, BrokerKind] = {
    "redis": "redis",
    "rediss": "redis",
    # Redis Sentinel: the sentinels' addresses, ';'-separated as kombu and Celery take
    # them; the master's name is a setting (NUMBERING_SENTINEL_MASTER).
    "sentinel": "redis",
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
    """Whether ``url`` names a Redis server (``redis://``, ``rediss://``, ``sentinel://``)."""
    return broker_kind(url) == "redis"


def is_sentinel(url: str) -> bool:
    """Whether ``url`` names Redis through its sentinels (``sentinel://h1:26379;...``)."""
    return scheme_of(url) == "sentinel"


def redis_client(url: str, sentinel_master: str | None = None, **kwargs: Any) -> redis.Redis:
    """A redis-py client for ``url``: ``redis://``/``rediss://`` as redis-py reads them;
    ``sentinel://h1:26379;sentinel://h2:26379/DB`` (kombu's and Celery's form) as the
    current master of ``sentinel_master``, found through those sentinels and found again
    after a failover (redis-py's ``Sentinel.master_for``). A password in the URL is the
    master's, as in Celery; ``kwargs`` go to the master's connections."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **kwargs)
    if not sentinel_master:
        from numbering.errors import ConfigurationError

        raise ConfigurationError(
            "a sentinel:// URL needs the master's name: set NUMBERING_SENTINEL_MASTER (the "
            "NAME of `sentinel monitor NAME host port quorum`)"
        )
    sentinels: list[tuple[str, int]] = []
    master: dict[str, Any] = {"db": 0}
    for part in url.split(";"):
        part = part.strip()
        if not part:
            continue
        where = urlsplit(part if "://" in part else f"sentinel://{part}")
        sentinels.append((where.hostname or "127.0.0.1", where.port or 26379))
        if where.path.strip("/"):
            master["db"] = int(where.path.strip("/"))
        if where.password is not None:
            master["password"] = unquote(where.password)
            if where.username:
                master["username"] = unquote(where.username)
    timeout = kwargs.get("socket_timeout")
    finder = redis.sentinel.Sentinel(
        sentinels, socket_timeout=timeout, sentinel_kwargs={"socket_timeout": timeout}
    )
    client: redis.Redis = finder.master_for(sentinel_master, **master, **kwargs)
    return client


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
