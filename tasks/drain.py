"""The bulk consumer: drain a queue, assign a batch in one transaction, answer each request.

Stock Celery over Redis delivers one message per round trip and books each one in and
out of an "unacked" hash: about 500 messages a second for one consumer. This consumer
reads the same Celery messages from the same Redis list, but moves up to ``batch_size``
of them at a time, atomically, into an in-flight list (one round trip), assigns them all
in one database transaction, answers every request, and only then clears the in-flight
list: that is the acknowledgement. A consumer killed at any point leaves its batch in the
in-flight list, and the next active consumer of the queue (the same worker restarted, or
a standby) finishes it first. Redelivery is harmless: requests are idempotent by key.

One consumer serves all of a worker process's queues on a Redis broker: each turn
acknowledges and drains every queue it is the active consumer of in one round trip, and
assigns what it drained in one transaction. With requests spread over many shard queues
each queue holds only a request or two at a time; served by a thread each, every one of
those small batches paid a transaction of its own (docs/benchmarks.md, many sequences).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import redis
from celery import Celery, states
from sqlalchemy import Connection

from numbering.allocator import Outcome, assign_many
from numbering.brokers import dead_letter_list, inflight_list
from numbering.errors import (
    InvalidRequestError,
    NumberingError,
    RetriesExhaustedError,
)
from numbering.failpoints import failpoint
from numbering.messages import BadMessage, Job, decode_redis_message, parse_task
from numbering.replies import push_replies, reply_for
from numbering.routing import Shard
from numbering.runner import Allocator
from numbering.tasks.events import TaskEvents
from numbering.tasks.guard import ConsumerLock
from numbering.tasks.metrics import WorkerMetrics
from numbering.tasks.redelivery import MAX_DELIVERIES, Redelivery

__all__ = ["MAX_DELIVERIES", "BatchProcessor", "RedisDrain", "dead_letter_list", "inflight_list"]

log = logging.getLogger("numbering.worker")

# Seconds a consumer blocks on an empty queue before checking its lock and stop flag.
POLL_SECONDS = 1
# Seconds between checks that the consumer lock's database session is alive.
LOCK_CHECK_SECONDS = 5.0
# Seconds a standby waits between attempts to become the active consumer.
STANDBY_SECONDS = 1.0
# Seconds to wait before retrying a batch the database could not take.
OUTAGE_BACKOFF_SECONDS = 1.0

# Acknowledge the batches in flight (clear the in-flight lists KEYS[1..ARGV[2]]), then
# for each (queue, in-flight list) pair of the remaining KEYS, atomically move messages
# from the queue (oldest first) into its in-flight list, up to ARGV[1] messages in all:
# one round trip between two turns under load. Returns {pair number, messages, ...} for
# the pairs that gave messages. Needs Redis 6.2+ (RPOP with a count).
_ACK_AND_DRAIN = """
local cleared = tonumber(ARGV[2])
for i = 1, cleared do redis.call('DEL', KEYS[i]) end
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


class BatchProcessor:
    """Assigns a batch of parsed requests in one transaction and answers each one."""

    def __init__(
        self,
        allocator: Allocator,
        replies: redis.Redis,
        app: Celery | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.allocator = allocator
        self.replies = replies
        self.app = app
        self.metrics = metrics
        #: Transactions committed so far (for logs, the demo and tests).
        self.transactions = 0
        #: Celery task events of answered requests (set by the worker; None: never).
        self.events: TaskEvents | None = None

    def process(
        self, items: Sequence[Job | BadMessage], shards: Sequence[Shard | None] | None = None
    ) -> None:
        """Assign and answer; raises only if the database could not take the batch.

        ``shards``: the shard whose queue each item came from (None: a sequence's own
        queue), so that a request sent to the wrong shard queue fails alone.
        """
        received = time.time()
        outcomes: dict[int, Outcome] = {}
        groups: dict[str, list[int]] = defaultdict(list)
        for index, item in enumerate(items):
            shard = None if shards is None else shards[index]
            if isinstance(item, BadMessage):
                outcomes[index] = item.error
            elif shard is not None and not shard.serves(item.sequence):
                outcomes[index] = InvalidRequestError(
                    f"sequence {item.sequence!r} does not belong to {shard.queue}"
                )
            else:
                groups[item.sequence].append(index)

        keys = [item.request.key for item in items if isinstance(item, Job)]

        def work(connection: Connection) -> dict[int, Outcome]:
            failpoint("before_assign", keys)
            # One transaction for the whole batch: its sequences locked in name order by
            # one statement (two consumers of overlapping queues cannot deadlock each
            # other), its keys looked up by one, its rows written by one.
            batches = {
                sequence: [items[i].request for i in indexes]  # type: ignore[union-attr]
                for sequence, indexes in groups.items()
            }
            assigned: dict[int, Outcome] = {}
            for sequence, results in assign_many(connection, batches).items():
                assigned.update(zip(groups[sequence], results, strict=True))
            failpoint("before_commit", keys)
            return assigned

        seconds = None
        if groups:
            started = time.monotonic()
            outcomes.update(
                self.allocator.run_assignment(
                    work, describe=f"batch of {sum(map(len, groups.values()))}"
                )
            )
            seconds = time.monotonic() - started
            self.transactions += 1
            log.debug("assigned %d request(s) in %.1f ms", len(items), 1e3 * seconds)
        failpoint("after_commit", keys)
        if self.metrics is not None:
            # Counted before the replies go out, so that a scrape made after a client has
            # its answer already shows it (CI saw the counter lag the reply).
            self.metrics.batch(
                [item.sequence if isinstance(item, Job) else None for item in items],
                [outcomes[index] for index in range(len(items))],
                seconds,
            )
        self._answer(items, outcomes)
        failpoint("after_reply", keys)
        if self.events is not None:
            self.events.batch(items, outcomes, received, seconds)

    def _answer(self, items: Sequence[Job | BadMessage], outcomes: dict[int, Outcome]) -> None:
        lean: list[tuple[str, dict[str, Any]]] = []
        for index, item in enumerate(items):
            outcome = outcomes[index]
            key = item.request.key if isinstance(item, Job) else item.key
            if isinstance(outcome, NumberingError):
                log.info(
                    "request %s (key %r) failed: %s",
                    item.task_id,
                    key,
                    outcome,
                    extra={
                        "key": key,
                        "task_id": item.task_id,
                        "sequence": item.sequence if isinstance(item, Job) else None,
                    },
                )
            reply = reply_for(key, outcome)
            if item.reply_to is not None:
                lean.append((item.reply_to, reply))
            elif item.task_id is not None and self.app is not None:
                # A plain Celery caller: answer through the result backend.
                state = states.FAILURE if isinstance(outcome, NumberingError) else states.SUCCESS
                if state == states.FAILURE:
                    self.app.backend.mark_as_failure(item.task_id, outcome)
                else:
                    self.app.backend.store_result(item.task_id, reply, state)
        push_replies(self.replies, lean)

    def process_until_done(
        self,
        items: Sequence[Job | BadMessage],
        stop: threading.Event,
        queue: str,
        shards: Sequence[Shard | None] | None = None,
    ) -> bool:
        """:meth:`process`, retried through database outages; False if stopped first.

        While the database is away the batch stays unacknowledged; clients time out and
        resend with the same keys meanwhile, which is harmless.
        """
        while True:
            try:
                self.process(items, shards)
                return True
            except RetriesExhaustedError as exc:
                log.error("%s: database unavailable (%s); retrying the batch", queue, exc)
                if stop.wait(OUTAGE_BACKOFF_SECONDS):
                    return False


class _Queue:
    """One queue a :class:`RedisDrain` serves: its lists, its lock, the shard it carries."""

    def __init__(self, name: str, lock: ConsumerLock, shard: Shard | None) -> None:
        self.name = name
        self.inflight = inflight_list(name)
        self.lock = lock
        self.shard = shard
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


class RedisDrain:
    """The consumer of a worker's queues on a Redis broker (run it in its own thread).

    ``queues`` maps each queue to the lock that makes its holder the queue's active
    consumer, and ``shards`` names the shard a shard queue carries. Each queue is served
    once its lock is taken; a queue whose lock another worker holds is served by that
    worker, and this one takes it over when it is released.
    """

    def __init__(
        self,
        broker: redis.Redis,
        queues: Mapping[str, ConsumerLock],
        processor: BatchProcessor,
        *,
        batch_size: int,
        stop: threading.Event,
        shards: Mapping[str, Shard] | None = None,
    ) -> None:
        if not queues:
            raise ValueError("a consumer needs at least one queue")
        self.broker = broker
        self.queues = [
            _Queue(name, lock, (shards or {}).get(name)) for name, lock in queues.items()
        ]
        #: The consumer's name in logs and thread names: its queues.
        self.name = ",".join(queue.name for queue in self.queues)
        self.processor = processor
        self.batch_size = batch_size
        self.stop = stop
        self._ack_and_drain = broker.register_script(_ACK_AND_DRAIN)
        self.redelivery = Redelivery(broker, processor.metrics)
        self._held: list[_Queue] = []  # the queues this consumer is active on, in turn order
        self._doorbell: _Doorbell | None = None
        #: Requests answered since start (for logs and tests).
        self.handled = 0

    @property
    def inflight(self) -> str:
        """The in-flight list of a consumer's only queue (for tests of one queue)."""
        [queue] = self.queues
        return queue.inflight

    def run(self) -> None:
        """Be the active consumer of every queue whose lock allows, until ``stop`` is set."""
        while not self.stop.is_set():
            try:
                if not self._keep_locks():
                    self.stop.wait(STANDBY_SECONDS)
                    continue
                self._consume()
            except (redis.RedisError, NumberingError, OSError) as exc:
                log.error("consumer of %s: %s; retrying", self.name, exc)
                self.stop.wait(OUTAGE_BACKOFF_SECONDS)
            except Exception:
                # A bug must not silently end the consumer while the worker looks alive;
                # the batch stays in flight and is tried again, one request at a time.
                log.exception("consumer of %s failed; starting over", self.name)
                self.stop.wait(OUTAGE_BACKOFF_SECONDS)
            finally:
                if self.stop.is_set():
                    for queue in self.queues:
                        queue.lock.release()
                    self._held = []
        if self._doorbell is not None:
            self._doorbell.join(POLL_SECONDS + 1)

    def _keep_locks(self) -> bool:
        """Drop the queues whose lock was lost, take those whose lock is free (finishing
        what was left in flight on each first); True while any queue is served."""
        for queue in self.queues:
            if queue in self._held:
                if not queue.lock.still_held():
                    log.warning("%s: lost the consumer lock; serving it no longer", queue.name)
                    self._held.remove(queue)
                continue
            if not queue.lock.try_acquire():
                if not queue.standby_logged:
                    log.warning(
                        "standby: another consumer is active on %s; waiting to take over",
                        queue.name,
                    )
                    queue.standby_logged = True
                continue
            queue.standby_logged = False
            log.info("active consumer of %s", queue.name)
            if not self._finish_inflight(queue):
                return False  # stopped during an outage: the rest stays in flight
            self._held.append(queue)
        return bool(self._held)

    def _consume(self) -> None:
        # What a failed turn (a lost Redis connection, a bug) left in flight comes first.
        for queue in self._held:
            if not self._finish_inflight(queue):
                return
        checked = time.monotonic()
        batch: list[tuple[_Queue, bytes | str]] = []
        done: list[_Queue] = []  # queues whose in-flight list holds only answered requests
        # A batch already moved in flight is finished even when ``stop`` came meanwhile
        # (a warm shutdown between the ack-and-drain and the next turn of the loop left
        # it in flight for the next consumer: seen in a test run); only an empty hand stops.
        while batch or not self.stop.is_set():
            if batch:
                if not self._process(batch):
                    return  # stopped during an outage: the batch stays in flight
                done = list({id(queue): queue for queue, _ in batch}.values())
                batch = []
            if self.stop.is_set():
                self._acknowledge(done)
                return
            since = time.monotonic() - checked
            standby = len(self._held) < len(self.queues)  # some queue to take over when free
            if since > LOCK_CHECK_SECONDS or (standby and since > STANDBY_SECONDS):
                self._acknowledge(done)
                done = []
                if not self._keep_locks():
                    return
                checked = time.monotonic()
            batch = self._drain(done)
            done = []
            if not batch:
                batch = self._wait()

    def _acknowledge(self, done: Sequence[_Queue]) -> None:
        if done:
            self.broker.delete(*(queue.inflight for queue in done))

    def _drain(self, done: Sequence[_Queue]) -> list[tuple[_Queue, bytes | str]]:
        """Acknowledge ``done``'s batches and move the next batch in flight, in one round
        trip; the queues take turns at being drained first."""
        order = list(self._held)
        if len(self._held) > 1:
            self._held.append(self._held.pop(0))
        keys = [queue.inflight for queue in done]
        for queue in order:
            keys += [queue.name, queue.inflight]
        reply = self._ack_and_drain(keys=keys, args=[self.batch_size, len(done)])
        batch: list[tuple[_Queue, bytes | str]] = []
        for number, items in zip(reply[::2], reply[1::2], strict=True):
            batch += [(order[number - 1], raw) for raw in items]
        return batch

    def _wait(self) -> list[tuple[_Queue, bytes | str]]:
        """Wait, idle, for the next request. With one queue, take it alone at once (what
        arrives meanwhile is the next batch, taken with the ack); with several, wait for
        any of them to have one, and drain on the next turn."""
        if len(self._held) == 1:
            [queue] = self._held
            first = self.broker.blmove(queue.name, queue.inflight, POLL_SECONDS, "RIGHT", "LEFT")
            return [] if first is None else [(queue, first)]
        if self._doorbell is None:
            self._doorbell = _Doorbell(self.broker, [q.name for q in self.queues], self.stop)
        self._doorbell.wait([queue.name for queue in self._held], POLL_SECONDS)
        return []

    def _finish_inflight(self, queue: _Queue) -> bool:
        """Finish what a stopped consumer left in ``queue``'s in-flight list, one request
        at a time; False if stopped first (the rest stays in flight).

        One at a time, because one of them may be what stopped it: each is counted before
        it is tried, and a request that has now stopped the worker ``MAX_DELIVERIES``
        times is quarantined instead of tried again, so the queue keeps flowing.
        """
        left = self.broker.lrange(queue.inflight, 0, -1)
        if not left:
            return True
        left.reverse()  # LPUSHed oldest first: the oldest is at the right end
        log.warning(
            "%s: finishing %d request(s) left in flight by a stopped consumer",
            queue.name,
            len(left),
        )
        for raw in left:
            tag = hashlib.sha256(raw if isinstance(raw, bytes) else raw.encode()).hexdigest()
            tries = self.redelivery.count(queue.name, tag)
            if self.redelivery.exhausted(tries):
                bad = self.redelivery.quarantine(queue.name, self._parse(raw), raw, tries)
                self.processor.process([bad])
            elif not self._process([(queue, raw)]):
                return False
            pipe = self.broker.pipeline()
            pipe.lrem(queue.inflight, 1, raw)  # type: ignore[arg-type]  # bytes are fine
            self.redelivery.forget(queue.name, tag, pipe)
            pipe.execute()
        return True

    @staticmethod
    def _parse(raw: bytes | str) -> Job | BadMessage:
        try:
            return parse_task(*decode_redis_message(raw))
        except NumberingError as error:
            return BadMessage(None, None, None, error)

    def _process(self, batch: list[tuple[_Queue, bytes | str]]) -> bool:
        items = [self._parse(raw) for _, raw in batch]
        shards = [queue.shard for queue, _ in batch]
        done = self.processor.process_until_done(items, self.stop, self.name, shards)
        if done:
            self.handled += len(items)
        return done
