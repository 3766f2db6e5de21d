"""The Redis transport: in-flight lists, one ack-and-drain round trip, a doorbell.

Stock Celery over Redis delivers one message per round trip and books each one in and
out of an "unacked" hash: about 500 messages a second for one consumer. This transport
reads the same Celery messages from the same Redis lists, but moves up to ``batch_size``
of them at a time, atomically, into an in-flight list (one round trip); trimming the
batch off the list's old end once it is answered is the acknowledgement, sent with the
next drain (with two batches in flight, the older is at that end). A consumer killed at
any point leaves its batches in the in-flight list, and the next active consumer of the
queue (the same worker restarted, or a standby) gets them back first, marked
redelivered.

One transport serves all of a worker process's queues on a Redis broker: each turn
acknowledges and drains every queue it is the active consumer of in one round trip, and
the consumer assigns what it drained in one transaction. With requests spread over many
shard queues each queue holds only a request or two at a time; served by a thread each,
every one of those small batches paid a transaction of its own (docs/benchmarks.md, many
sequences). Which consumer is active on a queue is decided by a lock in the database
(:mod:`numbering.tasks.guard`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import redis

from numbering.brokers import attempts_hash, dead_letter_list, inflight_list, redis_client
from numbering.errors import NumberingError
from numbering.messages import BadMessage, Job, decode_redis_message, parse_task
from numbering.tasks.consumer import OUTAGE_BACKOFF_SECONDS
from numbering.tasks.fleet import HOLDERS, Fleet, owner_of, read_holders, worker_name
from numbering.tasks.guard import ConsumerLock
from numbering.tasks.redelivery import RedisAttempts, redis_dead_letters, redis_quarantined
from numbering.tasks.transport import Delivery, QueueState, age_of, consumer_name

__all__ = ["RedisBroker", "RedisTransport"]

log = logging.getLogger("numbering.worker")

# Seconds a consumer blocks on an empty queue before checking its lock and stop flag.
POLL_SECONDS = 1
# Seconds between checks that the consumer lock's database session is alive.
LOCK_CHECK_SECONDS = 5.0
# Seconds a standby waits between attempts to become the active consumer.
STANDBY_SECONDS = 1.0

# Acknowledge the answered batches (trim ARGV[2 + i] messages off the old end of the
# in-flight list KEYS[i], for i in 1..ARGV[2]), then for each (queue, in-flight list)
# pair of the remaining KEYS, atomically move messages from the queue (oldest first)
# into its in-flight list, up to ARGV[1] messages in all: one round trip between two
# turns under load. Returns {pair number, messages, ...} for the pairs that gave
# messages. Needs Redis 6.2+ (RPOP with a count).
_ACK_AND_DRAIN = """
local cleared = tonumber(ARGV[2])
for i = 1, cleared do redis.call('LTRIM', KEYS[i], 0, -1 - tonumber(ARGV[2 + i])) end
local budget = tonumber(ARGV[1])
local out = {}
for i = cleared + 1, #KEYS, 2 do
  if budget <= 0 then break end
  local items = redis.call('RPOP', KEYS[i], budget)
  if items then
    for j = 1, #items do redis.call('LPUSH', KEYS[i + 1], items[j]) end
    budget = budget - #items
    out[#out + 1] = (i - cleared + 1) / 2
    out[#out + 1] = items
  end
end
return out
"""


class _Queue:
    """One queue a :class:`RedisTransport` serves: its lists, its lock."""

    def __init__(self, name: str, lock: ConsumerLock) -> None:
        self.name = name
        self.inflight = inflight_list(name)
        self.lock = lock
        self.standby_logged = False


class _Doorbell:
    """Wakes an idle consumer of several queues when any of them has a request.

    Redis cannot block on several lists without taking from one (BLMPOP would take a
    message out of the queue before it is in flight, where a crash would lose it). So
    each queue has a watcher thread that, while the consumer is idle, blocks on ``BLMOVE
    queue queue RIGHT RIGHT``: a move of the oldest message onto itself, which waits for
    the list to be non-empty and leaves it exactly as it was. The consumer then drains.
    """

    def __init__(self, broker: redis.Redis, queues: Sequence[str], stop: threading.Event):
        self._broker = broker
        self._stop = stop
        self._changed = threading.Condition()
        self._idle = False
        self._rung = False
        self._wanted: frozenset[str] = frozenset()
        self._threads = [
            threading.Thread(target=self._watch, args=(queue,), name=f"numbering:watch:{queue}")
            for queue in queues
        ]
        for thread in self._threads:
            thread.daemon = True
            thread.start()

    def wait(self, queues: Sequence[str], timeout: float) -> bool:
        """Block until one of ``queues`` has a message (True) or ``timeout`` passes."""
        with self._changed:
            self._idle, self._rung, self._wanted = True, False, frozenset(queues)
            self._changed.notify_all()
            try:
                return self._changed.wait_for(lambda: self._rung or self._stop.is_set(), timeout)
            finally:
                self._idle = False
                self._changed.notify_all()

    def _watch(self, queue: str) -> None:
        while not self._stop.is_set():
            with self._changed:  # look only while the consumer waits: it drains otherwise
                if not self._changed.wait_for(
                    lambda: self._idle and queue in self._wanted, POLL_SECONDS
                ):
                    continue
            try:
                found = self._broker.blmove(queue, queue, POLL_SECONDS, "RIGHT", "RIGHT")
            except (redis.RedisError, OSError) as exc:
                log.warning("watching %s: %s; retrying", queue, exc)
                self._stop.wait(OUTAGE_BACKOFF_SECONDS)
                continue
            if found is None:
                continue
            with self._changed:
                if self._idle:
                    self._rung = True
                    self._changed.notify_all()
                # Not again before the consumer has drained: the message is still there.
                self._changed.wait_for(lambda: not self._idle, POLL_SECONDS)

    def join(self, timeout: float) -> None:
        for thread in self._threads:
            thread.join(timeout)


class RedisTransport:
    """The transport of a worker's queues on a Redis broker.

    ``queues`` maps each queue to the lock that makes its holder the queue's active
    consumer. Each queue is served once its lock is taken; a queue whose lock another
    worker holds is served by that worker, and this one takes it over when it is
    released (what the other left in flight comes back first, redelivered).
    """

    def __init__(
        self,
        broker: redis.Redis,
        queues: Mapping[str, ConsumerLock],
        *,
        stop: threading.Event,
        fleet: Fleet | None = None,
    ) -> None:
        self.name = consumer_name(queues)
        #: With a fleet, this worker tries to serve only the queues it owns (see
        #: :mod:`numbering.tasks.fleet`); without, every queue whose lock is free.
        self.fleet = fleet
        #: This worker's name in the holders hash (``numbering status``).
        self.holder = fleet.member if fleet is not None else worker_name()
        self.broker = broker
        self.queues = [_Queue(name, lock) for name, lock in queues.items()]
        self._by_name = {queue.name: queue for queue in self.queues}
        self.errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self.attempts = RedisAttempts(broker)
        self.stop = stop
        self._ack_and_drain = broker.register_script(_ACK_AND_DRAIN)
        self._held: list[_Queue] = []  # the queues this consumer is active on, in turn order
        #: How many answered requests each queue's in-flight list holds at its old end.
        self._done: dict[_Queue, int] = {}
        self._recheck: list[_Queue] = []  # queues whose in-flight list to hand back first
        self._checked = -float("inf")  # when the locks were last checked
        self._verified = -float("inf")  # when the held locks' sessions were last asked
        self._doorbell: _Doorbell | None = None

    @property
    def inflight(self) -> str:
        """The in-flight list of a transport's only queue (for tests of one queue)."""
        [queue] = self.queues
        return queue.inflight

    def open(self) -> None:
        # After a failed turn (a lost Redis connection, a bug) what is in flight comes
        # first. Acknowledgements not sent are dropped, not sent now: had the drain that
        # carried them run after all, they would clear the next batch, unanswered.
        self._recheck = list(self._held)
        self._done = {}
        self._checked = self._verified = -float("inf")

    def receive(self, limit: int, more: bool = False) -> list[Delivery]:
        if more:
            # Batches in flight: drain without waiting, unless the locks are due a look
            # (a queue handed over or lost must have nothing in flight).
            if self._recheck or not self._held or self._due():
                return []
            return self._drain(limit)
        while self._recheck:
            left = self._leftovers(self._recheck.pop(0))
            if left:
                return left
        if self._due():
            self.flush()
            # The held locks' sessions are asked about every LOCK_CHECK_SECONDS (a query
            # each); taking free locks and the fleet's beat, every STANDBY_SECONDS.
            verify = time.monotonic() - self._verified > LOCK_CHECK_SECONDS
            left = self._keep_locks(verify)
            self._checked = time.monotonic()
            if verify:
                self._verified = self._checked
            if left:
                return left
        if not self._held:
            self.stop.wait(STANDBY_SECONDS)
            return []
        batch = self._drain(limit)
        return batch or self._wait()

    def _due(self) -> bool:
        """Whether the consumer locks are due a look."""
        since = time.monotonic() - self._checked
        # Some queue to take over when free; or a fleet member, which says it is alive
        # every STANDBY_SECONDS (well within the fleet's MEMBER_TTL), even while it
        # holds every queue.
        standby = len(self._held) < len(self.queues) or self.fleet is not None
        return since > LOCK_CHECK_SECONDS or (standby and since > STANDBY_SECONDS)

    def tag(self, delivery: Delivery) -> str:
        raw = delivery.raw
        return hashlib.sha256(raw if isinstance(raw, bytes) else raw.encode()).hexdigest()

    def dead_letter(self, delivery: Delivery) -> bytes | str:
        raw: bytes | str = delivery.raw
        return raw  # the envelope as it came: `numbering quarantine replay` puts it back

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            queue = self._by_name[delivery.queue]
            if delivery.redelivered:  # handed back from the in-flight list: remove it alone
                pipe = self.broker.pipeline()
                pipe.lrem(queue.inflight, 1, delivery.raw)
                self.attempts.forget(queue.name, self.tag(delivery), pipe)
                pipe.execute()
            else:  # trimmed off the in-flight list's old end with the next drain
                self._done[queue] = self._done.get(queue, 0) + 1

    def recheck(self) -> None:
        # The locks are in the database: a failover took them with the old primary.
        # The next receive checks each one (and takes it again) before it drains.
        self._checked = self._verified = -float("inf")

    def flush(self) -> None:
        if self._done:
            pipe = self.broker.pipeline(transaction=False)
            for queue, count in self._done.items():
                pipe.ltrim(queue.inflight, 0, -1 - count)
            pipe.execute()
            self._done = {}

    def close(self, stopping: bool) -> None:
        if stopping:
            for queue in self.queues:
                queue.lock.release()
            self._held = []
            if self.fleet is not None:
                with contextlib.suppress(redis.RedisError, OSError):
                    self.fleet.leave()  # the others take its queues at once
            if self._doorbell is not None:
                self._doorbell.join(POLL_SECONDS + 1)
                self._doorbell = None

    def _keep_locks(self, verify: bool = True) -> list[Delivery]:
        """Drop the queues whose lock was lost (asked with ``verify``; and, in a fleet,
        hand over those another member owns now: their batches are answered and
        acknowledged by now), take those whose lock is free (in a fleet, those this
        member owns); return what each newly taken queue has left in flight."""
        fleet = self.fleet
        if fleet is not None:
            fleet.look([queue.name for queue in self.queues])
        left: list[Delivery] = []
        for queue in self.queues:
            if queue in self._held:
                if verify and not queue.lock.still_held():
                    log.warning("%s: lost the consumer lock; serving it no longer", queue.name)
                    self._held.remove(queue)
                elif fleet is not None and not fleet.owns(queue.name):
                    queue.lock.release()
                    self._held.remove(queue)
                    log.info(
                        "%s: handed over to %s (%d workers in the fleet)",
                        queue.name,
                        owner_of(queue.name, fleet.members),
                        len(fleet.members),
                    )
                continue
            if fleet is not None and not fleet.owns(queue.name):
                continue  # its owner takes it
            if not queue.lock.try_acquire():
                if not queue.standby_logged:
                    log.warning(
                        "standby: another consumer is active on %s; waiting to take over",
                        queue.name,
                    )
                    queue.standby_logged = True
                continue
            queue.standby_logged = False
            self.broker.hset(HOLDERS, queue.name, self.holder)
            log.info("active consumer of %s", queue.name)
            left += self._leftovers(queue)
            self._held.append(queue)
        return left

    def _leftovers(self, queue: _Queue) -> list[Delivery]:
        """What a stopped consumer left in ``queue``'s in-flight list, oldest first."""
        left = self.broker.lrange(queue.inflight, 0, -1)
        if not left:
            return []
        left.reverse()  # LPUSHed oldest first: the oldest is at the right end
        log.warning(
            "%s: finishing %d request(s) left in flight by a stopped consumer",
            queue.name,
            len(left),
        )
        return [Delivery(queue.name, _parse(raw), True, raw) for raw in left]

    def _drain(self, limit: int) -> list[Delivery]:
        """Acknowledge the answered batches and move the next batch in flight, in one
        round trip; the queues take turns at being drained first."""
        order = list(self._held)
        if len(self._held) > 1:
            self._held.append(self._held.pop(0))
        keys = [queue.inflight for queue in self._done]
        for queue in order:
            keys += [queue.name, queue.inflight]
        reply = self._ack_and_drain(keys=keys, args=[limit, len(self._done), *self._done.values()])
        self._done = {}
        batch: list[Delivery] = []
        for number, items in zip(reply[::2], reply[1::2], strict=True):
            name = order[number - 1].name
            batch += [Delivery(name, _parse(raw), False, raw) for raw in items]
        return batch

    def _wait(self) -> list[Delivery]:
        """Wait, idle, for the next request. With one queue, take it alone at once (what
        arrives meanwhile is the next batch, taken with the ack); with several, wait for
        any of them to have one, and drain on the next turn."""
        if len(self._held) == 1:
            [queue] = self._held
            first = self.broker.blmove(queue.name, queue.inflight, POLL_SECONDS, "RIGHT", "LEFT")
            return [] if first is None else [Delivery(queue.name, _parse(first), False, first)]
        if self._doorbell is None:
            self._doorbell = _Doorbell(self.broker, [q.name for q in self.queues], self.stop)
        self._doorbell.wait([queue.name for queue in self._held], POLL_SECONDS)
        return []


def _parse(raw: bytes | str) -> Job | BadMessage:
    try:
        return parse_task(*decode_redis_message(raw))
    except NumberingError as error:
        return BadMessage(None, None, None, error)


class RedisBroker:
    """What the operator commands and the start-up check ask of a Redis broker: its
    queues' lengths, where dead letters are kept (here, beside the queues), replay."""

    def __init__(self, url: str, sentinel_master: str | None = None) -> None:
        self.url = url
        self.client: redis.Redis = redis_client(url, sentinel_master, socket_timeout=5)

    def queue_state(self, queue: str) -> QueueState:
        pipe = self.client.pipeline()
        pipe.llen(queue)
        pipe.llen(inflight_list(queue))
        pipe.lindex(queue, -1)  # LPUSHed: the oldest is at the right end
        waiting, in_flight, oldest = pipe.execute()
        return QueueState(waiting, in_flight, age_of(oldest))

    def consumers(self, queue: str) -> int | None:
        return None  # not the broker's to say: the consumer lock is in the database

    def warnings(self) -> list[str]:
        """What may make this Redis drop queued requests."""
        warnings: list[str] = []
        try:
            config = self.client.config_get("maxmemory-policy")
            config.update(self.client.config_get("appendonly"))
            config.update(self.client.config_get("save"))
        except redis.ResponseError:  # CONFIG disabled (managed Redis): nothing to say
            return warnings
        policy = config.get("maxmemory-policy")
        if policy not in (None, "noeviction"):
            warnings.append(
                f"Redis maxmemory-policy is {policy}: under memory pressure it may evict "
                "queued requests (callers then wait and resend); set noeviction"
            )
        if config.get("appendonly") == "no" and not config.get("save"):
            warnings.append(
                "Redis keeps nothing on disk (appendonly no, no save points): a Redis restart "
                "drops queued requests (callers then wait and resend); set appendonly yes"
            )
        return warnings

    def declare(self, queues: Sequence[str]) -> list[str]:
        return []  # a Redis list needs no declaring

    def dead_letters(self, queue: str | None = None) -> list[tuple[str, bytes | str]]:
        return list(redis_dead_letters(self.client, queue))

    def quarantined(self, queues: Sequence[str]) -> dict[str, int]:
        return redis_quarantined(self.client, queues)

    def holders(self, queues: Sequence[str]) -> dict[str, str]:
        return read_holders(self.client, queues)

    def requeue(self, queue: str) -> int:
        moved = 0
        dead, attempts = dead_letter_list(queue), attempts_hash(queue)
        while True:
            raw: Any = self.client.lmove(dead, queue, "RIGHT", "LEFT")  # oldest first
            if raw is None:
                return moved
            self.client.hdel(attempts, hashlib.sha256(raw).hexdigest())
            moved += 1

    def close(self) -> None:
        self.client.close()
