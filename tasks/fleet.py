"""A worker fleet: the K shard queues spread over the live workers.

Workers started with ``numbering worker --shards K`` (on any number of machines) are the
members of one fleet. Each member says it is alive every second or so in a Redis sorted
set (scored with the Redis server's clock, so machines' clocks need not agree); a member
not heard from for :data:`MEMBER_TTL` seconds is gone. Every member computes the same
owner for each shard queue from the same member list, by rendezvous hashing (the member
with the highest hash of member and queue): about K/N queues each, and when a member
joins or leaves only the queues it gains or loses move.

The owner takes the queue's consumer lock; a member that holds the lock of a queue it no
longer owns releases it between two batches, and the owner takes it on its next check.
The lock, in the database, stays the authority: two workers are never active on one
queue at once, whatever the members believe about each other. The fleet only says who
should try.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
from collections.abc import Sequence
from typing import Any

import redis

__all__ = ["HOLDERS", "MEMBER_TTL", "Fleet", "owner_of", "read_holders", "worker_name"]

log = logging.getLogger("numbering.worker")

#: Seconds after its last sign of life that a member counts as gone, and its queues go
#: to the others. A live member paused longer (a long batch, a slow database) is taken
#: for gone for a while, which costs nothing: the others find its queues' locks held and
#: wait, and it claims them back with its next sign of life.
MEMBER_TTL = 5.0
#: Redis hash of queue -> the worker that took its consumer lock last (``numbering
#: status`` shows it; whether that worker still holds it is the database's to say).
HOLDERS = "_numbering.holders"

# Say this member is alive (scored with the server's time), forget members not heard
# from for ARGV[2] ms, and return the members left.
_BEAT = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZADD', KEYS[1], ms, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 10)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""


def owner_of(queue: str, members: Sequence[str]) -> str:
    """The member that owns ``queue`` among ``members`` (rendezvous hashing)."""
    return max(members, key=lambda member: hashlib.sha256(f"{member}\n{queue}".encode()).digest())


class Fleet:
    """This worker's membership of the fleet serving ``count`` shard queues."""

    def __init__(self, client: redis.Redis, count: int, member: str | None = None) -> None:
        self.client = client
        self.key = f"_numbering.fleet.{count}"
        #: This worker, as the others and ``numbering status`` see it.
        self.member = member or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._beat = client.register_script(_BEAT)
        self.members: list[str] = [self.member]
        self._looked = False

    def beat(self) -> list[str]:
        """Say this member is alive; the live members, this one included."""
        raw = self._beat(keys=[self.key], args=[self.member, int(MEMBER_TTL * 1000)])
        self.members = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in raw)
        return self.members

    def look(self, queues: Sequence[str]) -> list[str]:
        """:meth:`beat`, and the ``queues`` this member owns now; logged when the fleet
        changed since the last look."""
        before = self.members
        self.beat()
        owned = [queue for queue in queues if self.owns(queue)]
        if self.members != before or not self._looked:
            self._looked = True
            log.info(
                "fleet of %d worker(s): this one (%s) owns %d of the %d shard queues",
                len(self.members),
                self.member,
                len(owned),
                len(queues),
            )
        return owned

    def owns(self, queue: str) -> bool:
        """Whether this member owns ``queue`` among the members of the last :meth:`beat`."""
        return owner_of(queue, self.members) == self.member

    def leave(self) -> None:
        """Leave at once (a clean stop), so the others take the queues without waiting
        for :data:`MEMBER_TTL`."""
        self.client.zrem(self.key, self.member)


def read_holders(client: redis.Redis, queues: Sequence[str]) -> dict[str, str]:
    """The worker that last took each of ``queues`` (those :data:`HOLDERS` names)."""
    if not queues:
        return {}
    found: list[Any] = client.hmget(HOLDERS, list(queues))
    return {
        queue: holder.decode() if isinstance(holder, bytes) else str(holder)
        for queue, holder in zip(queues, found, strict=True)
        if holder is not None
    }


def worker_name() -> str:
    """A worker's name for :data:`HOLDERS` when it is not a fleet member."""
    return f"{socket.gethostname()}:{os.getpid()}"
