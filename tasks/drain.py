"""The bulk consumer: drain a queue, assign a batch in one transaction, answer each request.

Stock Celery over Redis delivers one message per round trip and books each one in and
out of an "unacked" hash: about 500 messages a second for one consumer. This consumer
reads the same Celery messages from the same Redis list, but moves up to ``batch_size``
of them at a time, atomically, into an in-flight list (one round trip), assigns them all
in one database transaction, answers every request, and only then clears the in-flight
list: that is the acknowledgement. A consumer killed at any point leaves its batch in the
in-flight list, and the next active consumer of the queue (the same worker restarted, or
a standby) finishes it first. Redelivery is harmless: requests are idempotent by key.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import redis
from celery import Celery, states
from sqlalchemy import Connection

from numbering.allocator import Outcome, assign
from numbering.errors import (
    InvalidRequestError,
    NumberingError,
    QuarantinedError,
    RetriesExhaustedError,
)
from numbering.failpoints import failpoint
from numbering.messages import BadMessage, Job, decode_redis_message, parse_task, reply_for
from numbering.replies import push_replies
from numbering.routing import Shard
from numbering.runner import Allocator
from numbering.tasks.guard import ConsumerLock
from numbering.tasks.metrics import WorkerMetrics

__all__ = ["MAX_DELIVERIES", "BatchProcessor", "RedisDrain", "dead_letter_list", "inflight_list"]

log = logging.getLogger("numbering.worker")

# Seconds a consumer blocks on an empty queue before checking its lock and stop flag.
POLL_SECONDS = 1
# Seconds between checks that the consumer lock's database session is alive.
LOCK_CHECK_SECONDS = 5.0
# Seconds a standby waits between attempts to become the active consumer.
STANDBY_SECONDS = 1.0
# A request left in flight this many times by a consumer that died is quarantined.
MAX_DELIVERIES = 3
# Seconds to wait before retrying a batch the database could not take.
OUTAGE_BACKOFF_SECONDS = 1.0

# Acknowledge the batch in flight (clear the in-flight list), then atomically move up to
# ARGV[1] messages from the queue (oldest first) into it: one round trip between two
# batches under load. Needs Redis 6.2+ (RPOP with a count).
_ACK_AND_DRAIN = """
redis.call('DEL', KEYS[2])
local items = redis.call('RPOP', KEYS[1], ARGV[1])
if not items then return {} end
for i = 1, #items do redis.call('LPUSH', KEYS[2], items[i]) end
return items
"""


def inflight_list(queue: str) -> str:
    """The Redis list holding the batch the active consumer of ``queue`` is working on."""
    return f"_numbering.inflight.{queue}"


def dead_letter_list(queue: str) -> str:
    """The Redis list where quarantined requests of ``queue`` are kept for an operator."""
    return f"_numbering.dead.{queue}"


class BatchProcessor:
    """Assigns a batch of parsed requests in one transaction and answers each one."""

    def __init__(
        self,
        allocator: Allocator,
        replies: redis.Redis,
        app: Celery | None = None,
        shard: Shard | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.allocator = allocator
        self.replies = replies
        self.app = app
        self.shard = shard
        self.metrics = metrics

    def process(self, items: Sequence[Job | BadMessage]) -> None:
        """Assign and answer; raises only if the database could not take the batch."""
        outcomes: dict[int, Outcome] = {}
        groups: dict[str, list[int]] = defaultdict(list)
        for index, item in enumerate(items):
            if isinstance(item, BadMessage):
                outcomes[index] = item.error
            elif self.shard is not None and not self.shard.serves(item.sequence):
                outcomes[index] = InvalidRequestError(
                    f"sequence {item.sequence!r} does not belong to {self.shard.queue}"
                )
            else:
                groups[item.sequence].append(index)

        keys = [item.request.key for item in items if isinstance(item, Job)]

        def work(connection: Connection) -> dict[int, Outcome]:
            failpoint("before_assign", keys)
            assigned: dict[int, Outcome] = {}
            # One transaction for the whole batch; sequences locked in name order, so two
            # consumers of overlapping shards cannot deadlock each other.
            for sequence in sorted(groups):
                indexes = groups[sequence]
                requests = [items[i].request for i in indexes]  # type: ignore[union-attr]
                try:
                    results: list[Outcome] = assign(connection, sequence, requests)
                except InvalidRequestError as error:  # e.g. unknown sequence: fails alone
                    results = [error] * len(indexes)
                assigned.update(zip(indexes, results, strict=True))
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
            log.debug("assigned %d request(s) in %.1f ms", len(items), 1e3 * seconds)
        failpoint("after_commit", keys)
        self._answer(items, outcomes)
        failpoint("after_reply", keys)
        if self.metrics is not None:
            self.metrics.batch(
                [item.sequence if isinstance(item, Job) else None for item in items],
                [outcomes[index] for index in range(len(items))],
                seconds,
            )

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
        self, items: Sequence[Job | BadMessage], stop: threading.Event, queue: str
    ) -> bool:
        """:meth:`process`, retried through database outages; False if stopped first.

        While the database is away the batch stays unacknowledged; clients time out and
        resend with the same keys meanwhile, which is harmless.
        """
        while True:
            try:
                self.process(items)
                return True
            except RetriesExhaustedError as exc:
                log.error("%s: database unavailable (%s); retrying the batch", queue, exc)
                if stop.wait(OUTAGE_BACKOFF_SECONDS):
                    return False


class RedisDrain:
    """The consumer of one queue on a Redis broker (run it in its own thread)."""

    def __init__(
        self,
        broker: redis.Redis,
        queue: str,
        processor: BatchProcessor,
        lock: ConsumerLock,
        *,
        batch_size: int,
        stop: threading.Event,
    ) -> None:
        self.broker = broker
        self.queue = queue
        self.inflight = inflight_list(queue)
        self.attempts = f"_numbering.attempts.{queue}"
        self.dead = dead_letter_list(queue)
        self.processor = processor
        self.lock = lock
        self.batch_size = batch_size
        self.stop = stop
        self._ack_and_drain = broker.register_script(_ACK_AND_DRAIN)
        #: Requests answered since start (for logs and tests).
        self.handled = 0

    def run(self) -> None:
        """Be the active consumer whenever the lock allows, until ``stop`` is set."""
        standby_logged = False
        while not self.stop.is_set():
            try:
                if not self.lock.try_acquire():
                    if not standby_logged:
                        log.warning(
                            "standby: another consumer is active on %s; waiting to take over",
                            self.queue,
                        )
                        standby_logged = True
                    self.stop.wait(STANDBY_SECONDS)
                    continue
                standby_logged = False
                log.info("active consumer of %s", self.queue)
                self._consume()
            except (redis.RedisError, NumberingError, OSError) as exc:
                log.error("consumer of %s: %s; retrying", self.queue, exc)
                self.stop.wait(OUTAGE_BACKOFF_SECONDS)
            except Exception:
                # A bug must not silently end the consumer while the worker looks alive;
                # the batch stays in flight and is tried again, one request at a time.
                log.exception("consumer of %s failed; starting over", self.queue)
                self.stop.wait(OUTAGE_BACKOFF_SECONDS)
            finally:
                if self.stop.is_set():
                    self.lock.release()

    def _consume(self) -> None:
        self._finish_inflight()
        checked = time.monotonic()
        batch: list[bytes | str] = []
        # A batch already moved in flight is finished even when ``stop`` came meanwhile
        # (a warm shutdown between the ack-and-drain and the next turn of the loop left
        # it in flight for the next consumer: seen in a test run); only an empty hand stops.
        while batch or not self.stop.is_set():
            if time.monotonic() - checked > LOCK_CHECK_SECONDS:
                if not self.lock.still_held():
                    return
                checked = time.monotonic()
            if not batch:
                # Idle: block for the next request and take it alone, at once. What
                # arrives meanwhile is the next batch, taken together with the ack.
                first = self.broker.blmove(self.queue, self.inflight, POLL_SECONDS, "RIGHT", "LEFT")
                if first is None:
                    continue
                batch = [first]
            if not self._process(batch):
                return  # stopped during an outage: the batch stays in flight
            if self.stop.is_set():
                self.broker.delete(self.inflight)
                return
            batch = self._ack_and_drain(keys=[self.queue, self.inflight], args=[self.batch_size])

    def _finish_inflight(self) -> None:
        """Finish what a stopped consumer left in flight, one request at a time.

        One at a time, because one of them may be what stopped it: each is counted before
        it is tried, and a request that has now stopped the worker ``MAX_DELIVERIES``
        times is quarantined instead of tried again, so the queue keeps flowing.
        """
        left = self.broker.lrange(self.inflight, 0, -1)
        if not left:
            return
        left.reverse()  # LPUSHed oldest first: the oldest is at the right end
        log.warning(
            "%s: finishing %d request(s) left in flight by a stopped consumer",
            self.queue,
            len(left),
        )
        for raw in left:
            tag = hashlib.sha256(raw if isinstance(raw, bytes) else raw.encode()).hexdigest()
            tries = int(self.broker.hincrby(self.attempts, tag, 1))
            if tries > MAX_DELIVERIES:
                self._quarantine(raw, tries - 1)
            elif not self._process([raw]):
                return  # stopped during an outage: the rest stays in flight
            pipe = self.broker.pipeline()
            pipe.lrem(self.inflight, 1, raw)  # type: ignore[arg-type]  # bytes are fine
            pipe.hdel(self.attempts, tag)
            pipe.execute()

    def _quarantine(self, raw: bytes | str, tries: int) -> None:
        item = self._parse(raw)
        key = item.request.key if isinstance(item, Job) else item.key
        log.error(
            "%s: quarantined request %s (key %r) after it stopped the worker %d times; "
            "it is kept in %s",
            self.queue,
            item.task_id,
            key,
            tries,
            self.dead,
            extra={"key": key, "task_id": item.task_id, "queue": self.queue},
        )
        self.broker.lpush(self.dead, raw)
        if self.processor.metrics is not None:
            self.processor.metrics.quarantined.inc()
        error = QuarantinedError(
            f"request quarantined in {self.dead} after it stopped the worker {tries} times; "
            "nothing was assigned to it"
        )
        bad = BadMessage(item.task_id, key, item.reply_to, error)
        self.processor.process([bad])

    @staticmethod
    def _parse(raw: bytes | str) -> Job | BadMessage:
        try:
            return parse_task(*decode_redis_message(raw))
        except NumberingError as error:
            return BadMessage(None, None, None, error)

    def _process(self, raws: list[bytes | str]) -> bool:
        items = [self._parse(raw) for raw in raws]
        done = self.processor.process_until_done(items, self.stop, self.queue)
        if done:
            self.handled += len(items)
        return done
