"""The consumer loop: one for every broker, over a :class:`~numbering.tasks.transport.Transport`.

Each turn takes a batch from the transport, tries what a stopped consumer left behind
alone (counted, and quarantined once it has stopped the worker ``MAX_DELIVERIES`` times:
:mod:`numbering.tasks.redelivery`), assigns the rest in one database transaction
(:class:`BatchProcessor`), answers every request, and only then acknowledges: a consumer
killed at any point leaves its batch unacknowledged, and the next active consumer of the
queue finishes it. Redelivery is harmless: requests are idempotent by key.

While the database is away a batch stays unacknowledged and is retried; clients time out
and resend with the same keys meanwhile, which is harmless too. A batch in hand is
finished even when ``stop`` comes meanwhile; only an empty hand stops.

Two batches in flight (``NUMBERING_BATCHES_IN_FLIGHT=2``; the default is the serial
turn, which measured 5-10% faster on 2 cores). A turn is serial (take, parse,
transaction, answer). With two in flight, while batch N's COMMIT is on its way, the
consumer takes batch N+1 and starts its transaction on a second database
thread and connection: it asks for the counters' locks once N's statements are done and
waits for them inside the database, then goes on with the rows N committed (where the
engine and isolation level cannot do that without a serialization failure, it waits for
N to end first). Answers and acknowledgements stay in the order the batches came, each
after its own commit: the consumer answers N, acknowledges it, takes N+2, and so on. A
killed worker leaves both batches unacknowledged (on Redis, both in the queue's
in-flight list, oldest at the end: an acknowledgement trims its batch's count off that
end), and the next consumer finishes them one at a time. A batch of one request with
nothing in flight is served as it came, without the hand-over to a database thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis
from celery import Celery, states
from sqlalchemy import Connection

from numbering.allocator import Allocator
from numbering.assignment import Outcome, assign_many
from numbering.errors import InvalidRequestError, NumberingError, RetriesExhaustedError
from numbering.failpoints import failpoint
from numbering.messages import BadMessage, Job
from numbering.replies import push_replies, reply_for
from numbering.routing import TASK_NAME, Shard
from numbering.settings import mask_url
from numbering.tasks.events import TaskEvents
from numbering.tasks.failover import FailoverDetected, FailoverWatch
from numbering.tasks.metrics import WorkerMetrics
from numbering.tasks.redelivery import Redelivery
from numbering.tasks.transport import Delivery, Transport

__all__ = ["OUTAGE_BACKOFF_SECONDS", "BatchProcessor", "Consumer", "RedisReplies", "ReplySink"]

log = logging.getLogger("numbering.worker")

# Seconds to wait before retrying a batch the database could not take, or a transport
# that failed.
OUTAGE_BACKOFF_SECONDS = 1.0
# Plain Celery callers remembered for the once-per-caller log line.
CALLERS_REMEMBERED = 4096


class ReplySink(Protocol):
    """Where answers to numbering's own callers go, by reply list."""

    def push(self, replies: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Deliver each ``(reply list, reply)``."""


class RedisReplies:
    """Answers pushed on the callers' Redis lists, all in one round trip."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def push(self, replies: Iterable[tuple[str, dict[str, Any]]]) -> None:
        push_replies(self.client, replies)


@dataclass
class Turn:
    """One batch on its way through :class:`BatchProcessor`: prepared, assigned (in one
    transaction, on any thread), finished (answered, in the consumer's thread)."""

    items: Sequence[Job | BadMessage]
    #: When the batch was taken (Unix time, for task events).
    received: float
    #: Each request's result or error, by index in ``items``.
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    #: The indexes to assign, by sequence.
    groups: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    keys: list[str] = field(default_factory=list)
    #: How long the transaction took (None: there was none).
    seconds: float | None = None


class BatchProcessor:
    """Assigns a batch of parsed requests in one transaction and answers each one: the
    broker-neutral part of a worker's turn (assign, answer, metrics, failpoints, logs)."""

    def __init__(
        self,
        allocator: Allocator,
        replies: redis.Redis | ReplySink,
        app: Celery | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.allocator = allocator
        #: Where answers go: the reply Redis, or any :class:`ReplySink`.
        self.replies = RedisReplies(replies) if isinstance(replies, redis.Redis) else replies
        self.app = app
        self.metrics = metrics
        #: Transactions committed so far (for logs, the demo and tests).
        self.transactions = 0
        #: Celery task events of answered requests (set by the worker; None: never).
        self.events: TaskEvents | None = None
        #: Checks before a batch that the database did not fail over unnoticed (set by
        #: the worker; None: never).
        self.failover: FailoverWatch | None = None
        self._rpc: Any = None  # Celery's rpc:// backend, made at the first such caller
        #: Plain Celery callers already named in the log, and whether each listens on
        #: its own rpc:// reply queue (least recently seen first).
        self._callers: OrderedDict[str, bool] = OrderedDict()

    def process(
        self, items: Sequence[Job | BadMessage], shards: Sequence[Shard | None] | None = None
    ) -> None:
        """Assign and answer; raises only if the database could not take the batch.

        ``shards``: the shard whose queue each item came from (None: a sequence's own
        queue), so that a request sent to the wrong shard queue fails alone.
        """
        turn = self.prepare(items, shards)
        self.assign(turn)
        self.finish(turn)

    def prepare(
        self, items: Sequence[Job | BadMessage], shards: Sequence[Shard | None] | None = None
    ) -> Turn:
        """A batch's turn, before its transaction: what fails alone, what is assigned."""
        turn = Turn(items, time.time())
        for index, item in enumerate(items):
            shard = None if shards is None else shards[index]
            if isinstance(item, BadMessage):
                turn.outcomes[index] = item.error
            elif shard is not None and not shard.serves(item.sequence):
                turn.outcomes[index] = InvalidRequestError(
                    f"sequence {item.sequence!r} does not belong to {shard.queue}"
                )
            else:
                turn.groups[item.sequence].append(index)
        turn.keys = [item.request.key for item in items if isinstance(item, Job)]
        return turn

    def assign(
        self,
        turn: Turn,
        after: threading.Event | None = None,
        locked: threading.Event | None = None,
        written: threading.Event | None = None,
    ) -> None:
        """The turn's transaction (any thread may run it); raises only if the database
        could not take the batch.

        ``after``: the previous batch in flight says, by setting it, that this one may
        take its counters' locks now (see :class:`Consumer`). ``locked``: set here once
        this batch's statements are done and only its COMMIT is left, when the engine
        lets the next batch queue for the locks behind that COMMIT (else the caller sets
        it when this batch is over). ``written``: set here at the same point, on every
        engine (the consumer then takes the next batch).
        """
        items, groups, keys = turn.items, turn.groups, turn.keys
        if not groups:
            return
        release_early = locked is not None and self.allocator.queues_behind_commit

        def work(connection: Connection) -> dict[int, Outcome]:
            if after is not None:
                after.wait()
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
            if release_early:
                assert locked is not None
                locked.set()
            if written is not None:
                written.set()
            failpoint("before_commit", keys)
            return assigned

        if self.failover is not None:
            self.failover.confirm()
        started = time.monotonic()
        turn.outcomes.update(
            self.allocator.run_assignment(
                work, describe=f"batch of {sum(map(len, groups.values()))}"
            )
        )
        turn.seconds = time.monotonic() - started
        log.debug("assigned %d request(s) in %.1f ms", len(items), 1e3 * turn.seconds)

    def finish(self, turn: Turn) -> None:
        """After the turn's commit: metrics, answers, events (in the consumer's thread)."""
        items, outcomes, keys = turn.items, turn.outcomes, turn.keys
        if turn.groups:
            self.transactions += 1
        failpoint("after_commit", keys)
        if self.failover is not None:
            self.failover.answered(outcomes.values())
        if self.metrics is not None:
            # Counted before the replies go out, so that a scrape made after a client has
            # its answer already shows it (CI saw the counter lag the reply).
            self.metrics.batch(
                [item.sequence if isinstance(item, Job) else None for item in items],
                [outcomes[index] for index in range(len(items))],
                turn.seconds,
            )
        self._answer(items, outcomes)
        failpoint("after_reply", keys)
        if self.events is not None:
            self.events.batch(items, outcomes, turn.received, turn.seconds)

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
                listens = self._plain_caller(item)
                if state == states.FAILURE:
                    self.app.backend.mark_as_failure(item.task_id, outcome)
                else:
                    self.app.backend.store_result(item.task_id, reply, state)
                if item.rpc is not None and listens:
                    self._answer_rpc(item.task_id, item.rpc, outcome, reply, state)
        self.replies.push(lean)

    def _plain_caller(self, item: Job | BadMessage) -> bool:
        """Log once per plain Celery caller where its answers go; True when it waits on
        its own ``rpc://`` reply queue (on RabbitMQ) and is answered there too.

        A message does not say which result backend its caller reads, so the worker says
        where the answer is: a caller that reads another backend finds the reason in
        the log. A caller is named by its reply queue, else by its ``origin``.
        """
        assert self.app is not None
        caller = item.rpc[0] if item.rpc is not None else (item.origin or "(no origin)")
        known = self._callers.get(caller)
        if known is not None:
            self._callers.move_to_end(caller)
            return known
        listens = item.rpc is not None and self._reply_queue_exists(item.rpc[0])
        self._callers[caller] = listens
        if len(self._callers) > CALLERS_REMEMBERED:
            self._callers.popitem(last=False)
        backend = mask_url(str(self.app.conf.result_backend))
        who = item.origin or "(no origin header)"
        if listens:
            log.info(
                "plain Celery caller %s: answered on its reply queue %s (rpc://) and in "
                "the result backend %s",
                who,
                caller,
                backend,
            )
        else:
            log.info(
                "plain Celery caller %s: answered only in numbering's result backend %s "
                "(key celery-task-meta-<task id>); a caller reading another backend "
                "(another Redis database or server, a database backend, rpc:// over "
                "Redis) never gets its answers: set its result_backend to this one",
                who,
                backend,
            )
        return listens

    def _reply_queue_exists(self, reply_to: str) -> bool:
        """Whether RabbitMQ has the queue ``reply_to`` (a caller on ``rpc://`` declares
        it before it sends). Only a definite "not found" says no."""
        from amqp.exceptions import NotFound

        assert self.app is not None
        try:
            with self.app.connection_for_write() as connection:
                connection.default_channel.queue_declare(queue=reply_to, passive=True)
        except NotFound:
            return False
        except Exception as exc:  # unknown: answer there, as any Celery worker would
            log.debug("could not look up reply queue %s: %s", reply_to, exc)
        return True

    def _answer_rpc(
        self, task_id: str, rpc: tuple[str, str], outcome: Outcome, reply: Any, state: str
    ) -> None:
        """Answer a plain Celery caller over RabbitMQ on its reply queue too, as Celery's
        ``rpc://`` backend does: a caller on that backend waits there. A caller on
        another backend has no such queue, and RabbitMQ drops the copy. Best effort:
        the answer is in numbering's result backend either way."""
        from celery.app.task import Context
        from celery.backends.rpc import RPCBackend

        assert self.app is not None
        if self._rpc is None:
            self._rpc = RPCBackend(self.app)
        reply_to, correlation_id = rpc
        # The task's request as Celery's backends read it (its other fields default).
        request = Context(
            reply_to=reply_to, correlation_id=correlation_id, id=task_id, task=TASK_NAME
        )
        try:
            if state == states.FAILURE:
                self._rpc.mark_as_failure(task_id, outcome, request=request)
            else:
                self._rpc.store_result(task_id, reply, state, request=request)
        except Exception as exc:  # the answer is in the result backend already
            log.warning("could not answer %s on its reply queue %s: %s", task_id, reply_to, exc)

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
        turn = self.prepare(items, shards)
        return self.finish_until_done(turn, None, stop, queue)

    def finish_until_done(
        self, turn: Turn, assigned: Future[None] | None, stop: threading.Event, queue: str
    ) -> bool:
        """Finish ``turn`` once its transaction (``assigned``, run elsewhere; None: run
        it here) is done, running it again here through database outages; False if
        stopped first."""
        while True:
            try:
                if assigned is None:
                    self.assign(turn)
                else:
                    assigned.result()
                break
            except RetriesExhaustedError as exc:
                # Not the batch's fault: it stays in hand (not counted as a redelivery).
                log.error("%s: database unavailable (%s); retrying the batch", queue, exc)
            except FailoverDetected as exc:
                log.error("%s: %s; the batch waits", queue, exc)
            assigned = None
            if stop.wait(OUTAGE_BACKOFF_SECONDS):
                return False
        self.finish(turn)
        return True


@dataclass
class _InFlight:
    """A batch whose transaction runs on one of the consumer's database threads."""

    deliveries: list[Delivery]
    turn: Turn
    assigned: Future[None]
    #: Set once the next batch may ask for the counters' locks (see :class:`Consumer`).
    locked: threading.Event
    #: Set once only the batch's COMMIT is left (or it is over).
    written: threading.Event


class Consumer:
    """The consumer of a worker's queues over one transport (run it in its own thread)."""

    def __init__(
        self,
        transport: Transport,
        processor: BatchProcessor,
        *,
        batch_size: int,
        stop: threading.Event,
        shards: Mapping[str, Shard] | None = None,
        in_flight: int = 1,
    ) -> None:
        self.transport = transport
        self.processor = processor
        self.batch_size = batch_size
        self.stop = stop
        self.shards = dict(shards or {})
        self.redelivery = Redelivery(transport.attempts, processor.metrics)
        #: The consumer's name in logs and thread names: its queues.
        self.name = transport.name
        #: Requests answered since start (for logs and tests).
        self.handled = 0
        #: Batches in flight at once: 1 is the serial turn (always on an engine of one
        #: writer at a time, SQLite); 2 lets the next batch be taken, and its
        #: transaction wait for the counters' locks, while the last one commits.
        self.in_flight = in_flight if processor.allocator.concurrent_writers else 1
        self._pool: futures.ThreadPoolExecutor | None = None
        #: Batches started while another was in flight (for logs and tests).
        self.overlapped = 0

    def run(self) -> None:
        """Consume until ``stop`` is set; survive broker and database outages."""
        survivable: tuple[type[BaseException], ...] = (*self.transport.errors, NumberingError)
        while not self.stop.is_set():
            try:
                try:
                    self.transport.open()
                    self._consume()
                    self.transport.flush()
                finally:
                    self.transport.close(stopping=self.stop.is_set())
            except survivable as exc:
                log.error("consumer of %s: %s; retrying", self.name, exc)
                self.stop.wait(OUTAGE_BACKOFF_SECONDS)
            except Exception:
                # A bug must not silently end the consumer while the worker looks alive;
                # the batch stays unacknowledged and is tried again, one at a time.
                log.exception("consumer of %s failed; starting over", self.name)
                self.stop.wait(OUTAGE_BACKOFF_SECONDS)
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def _consume(self) -> None:
        in_flight: deque[_InFlight] = deque()
        try:
            while not self.stop.is_set():
                batch = self.transport.receive(self.batch_size, more=bool(in_flight))
                # Nothing more (answer what is in flight now), or what a stopped
                # consumer left: tried alone, after the batches in flight.
                settle = not batch or any(delivery.redelivered for delivery in batch)
                if settle and not self._finish(in_flight, 0):
                    return
                # Redelivered messages may be what stopped the last consumer: one at a time.
                for delivery in batch:
                    if delivery.redelivered and not self._alone(delivery):
                        return  # stopped during an outage: the rest stays unacknowledged
                fresh = [delivery for delivery in batch if not delivery.redelivered]
                if not fresh:
                    continue
                items = [delivery.item for delivery in fresh]
                turn = self.processor.prepare(
                    items, [self.shards.get(delivery.queue) for delivery in fresh]
                )
                if self.in_flight < 2 or (len(fresh) == 1 and not in_flight):
                    # One at a time: the turn is served here, as the batch came.
                    if not self.processor.finish_until_done(turn, None, self.stop, self.name):
                        return
                    self.transport.ack(fresh)
                    self.handled += len(fresh)
                    continue
                in_flight.append(self._start(fresh, turn, in_flight))
                if len(in_flight) > 1:
                    failpoint("batches_in_flight", [k for f in in_flight for k in f.turn.keys])
                if not self._finish(in_flight, self.in_flight - 1):
                    return
                # The next batch is taken once this one's COMMIT is on its way: taken
                # earlier, it would be smaller, and more transactions cost more per number.
                in_flight[-1].written.wait()
            self._finish(in_flight, 0)  # stopping: a batch in hand is finished
        finally:
            # A failure or a stop leaves these unacknowledged: they come back redelivered.
            # Their transactions end first, so none outlives this consumer's turn.
            for pending in in_flight:
                futures.wait([pending.assigned])

    def _start(self, fresh: list[Delivery], turn: Turn, before: deque[_InFlight]) -> _InFlight:
        """Run ``turn``'s transaction on a database thread. It asks for the counters'
        locks once the batch before it has done its statements (then it waits inside
        the database for that batch's COMMIT), or has ended, where the engine cannot
        queue behind a COMMIT (see :meth:`Backend.queues_behind_commit`)."""
        if self._pool is None:
            self._pool = futures.ThreadPoolExecutor(
                max_workers=self.in_flight, thread_name_prefix=f"numbering:db:{self.name}"
            )
        after = before[-1].locked if before else None
        self.overlapped += after is not None
        locked, written = threading.Event(), threading.Event()
        assigned = self._pool.submit(self.processor.assign, turn, after, locked, written)

        def over(_: object) -> None:
            locked.set()
            written.set()

        assigned.add_done_callback(over)
        return _InFlight(fresh, turn, assigned, locked, written)

    def _finish(self, in_flight: deque[_InFlight], keep: int) -> bool:
        """Answer and acknowledge the oldest batches in flight, in the order they came,
        until ``keep`` are left; False if stopped during a database outage."""
        while len(in_flight) > keep:
            oldest = in_flight[0]
            if not self.processor.finish_until_done(
                oldest.turn, oldest.assigned, self.stop, self.name
            ):
                return False
            in_flight.popleft()
            self.transport.ack(oldest.deliveries)
            self.handled += len(oldest.deliveries)
        return True

    def _alone(self, delivery: Delivery) -> bool:
        """Process a redelivered message alone; quarantine it after too many tries."""
        tries = self.redelivery.count(
            delivery.queue, self.transport.tag(delivery), delivery.redeliveries
        )
        item = delivery.item
        if self.redelivery.exhausted(tries):
            stored = self.transport.dead_letter(delivery)
            item = self.redelivery.quarantine(delivery.queue, item, stored, tries)
            delivery.quarantined = True
        shard = self.shards.get(delivery.queue)
        if not self.processor.process_until_done([item], self.stop, delivery.queue, [shard]):
            return False
        self.transport.ack([delivery])
        self.handled += 1
        return True
