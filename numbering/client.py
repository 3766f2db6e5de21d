"""Enqueue a number request and await the answer, from threads or asyncio.

::

    from numbering import Client

    client = Client.from_env()
    n = client.next_value("invoices", key="invoice:42", timeout=10)   # int
    r = client.next_values("invoices", count=500, key="batch:7")      # range
    n = await client.next_value_async("invoices", key="invoice:42")

Requests are real Celery task messages, published on the sequence's queue (one LPUSH on
a Redis broker, ``send_task`` on RabbitMQ). Answers come back on a Redis list owned by
this process (see :mod:`numbering.replies`). A waiting thread reads that list itself and
hands other threads their answers (one reader at a time; the role passes on when the
reader has its answer), so a caller that waits alone costs no thread switch; asyncio
callers are served by a listener thread started on first use.

A request that gets no answer in time is sent again with the *same* key (it can never get
a second number), and when ``timeout`` runs out :class:`RequestTimeout` names the key to
retry with. A ``Client`` may be shared by threads, and survives ``fork()``: a child
process (gunicorn ``--preload``, uWSGI) opens its own broker and Redis connections on
first use and never touches its parent's.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import amqp.exceptions
import kombu.exceptions
import kombu.pools
import redis
from celery import Celery
from redis.sentinel import MasterNotFoundError

from numbering.assignment import Assignment, Request, new_key
from numbering.brokers import is_redis, redis_client
from numbering.config.celery import celery_config
from numbering.errors import (
    BrokerUnavailable,
    ConfigurationError,
    NumberingError,
    RequestTimeout,
)
from numbering.messages import encode_redis_message
from numbering.policies import DateLike
from numbering.replies import error_from_reply, new_reply_list, reply_database, same_database
from numbering.routing import REPLY_HEADER, TASK_NAME, declared_otherwise, kombu_queue, queue_for
from numbering.settings import Settings, check_queue_type, mask_url
from numbering.validation import check_count, check_seconds, check_sequence_name

__all__ = ["Client"]

log = logging.getLogger("numbering.client")

# Seconds the listener blocks on the reply list before checking whether it should stop.
_LISTEN_SECONDS = 1.0
# Replies popped per round trip once one has arrived.
_REPLY_BATCH = 200
# Shortest wait worth a BRPOP (its timeout is in seconds; 0 would block for ever).
_MIN_BLOCK_SECONDS = 0.001
# The shortest wait for RabbitMQ to confirm a message.
_MIN_CONFIRM_SECONDS = 0.05
# Seconds before sending again after the broker refused a message.
_PUBLISH_RETRY_SECONDS = 0.2
# What kombu raises when RabbitMQ cannot take a message (a nack: publisher confirms).
_KOMBU_ERRORS = (kombu.exceptions.OperationalError, amqp.exceptions.MessageNacked)

Waiter = Callable[[dict[str, Any]], None]

# A resend pushes the request again only if its earlier copy has left the queue (a worker
# took it and the answer was lost): a key never has more than one copy waiting, however
# long no worker consumes (200 waiting keys once piled 6,183 copies up in 11 minutes).
_PUSH_UNLESS_QUEUED = """
if redis.call('LPOS', KEYS[1], ARGV[1]) then return 0 end
redis.call('LPUSH', KEYS[1], ARGV[1])
return 1
"""
# Is the request still waiting in its queue (no worker has taken it)?
_STILL_QUEUED = "return redis.call('LPOS', KEYS[1], ARGV[1]) and 1 or 0"


def _permanent(exc: BaseException) -> bool:
    """A broker error that waiting and sending again cannot cure (a wrong password, a
    database index the server does not have): the caller is told at once."""
    if isinstance(exc, (redis.AuthenticationError, redis.exceptions.AuthorizationError)):
        return True
    if isinstance(exc, (redis.ReadOnlyError, redis.OutOfMemoryError, redis.BusyLoadingError)):
        return False  # a failover, memory pressure, a restart: these pass
    if isinstance(exc, redis.ResponseError):
        text = str(exc)
        return text.startswith(("DB index", "WRONGPASS", "NOAUTH", "NOPERM", "invalid "))
    return isinstance(exc, kombu.exceptions.ContentDisallowed)


class _Outage:
    """Says once that the broker cannot be reached, not at every resend (the client once
    logged about five warning lines a second while it waited), and says when it is back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: str | None = None

    def failed(self, what: str, exc: BaseException) -> None:
        text = f"{type(exc).__name__}: {exc}"
        with self._lock:
            repeated, self._last = self._last == text, text
        (log.debug if repeated else log.warning)("%s: %s; trying again", what, text)

    @property
    def down(self) -> bool:
        """Whether the last attempt failed (an unlocked read: a hint, checked again)."""
        return self._last is not None

    def ok(self, what: str) -> None:
        if self._last is None:  # unlocked read first: the common path costs nothing
            return
        with self._lock:
            was, self._last = self._last, None
        if was is not None:
            log.warning("%s works again", what)


@dataclass
class _ProcessState:
    """Connections and waiters that belong to one process; rebuilt after a fork."""

    pid: int
    app: Celery
    replies: redis.Redis
    broker: redis.Redis | None  # set when the broker is Redis: publish with one LPUSH
    reply_list: str
    waiters: dict[str, list[Waiter]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    listener: threading.Thread | None = None
    #: The waiting thread that reads the reply list now (None: nobody, or the listener).
    reader: _SyncWaiter | None = None
    #: Broker and reply-list failures, said once (one tracker: when the reply lists are
    #: on the broker's Redis, sending and reading fail with the same error).
    outage: _Outage = field(default_factory=_Outage)
    push_unless_queued: Any = None  # redis Script objects, on a Redis broker
    still_queued: Any = None
    #: The reply lists' database, when it is another database of the broker's server:
    #: a request and the wait for its answer then still share a round trip (the broker's
    #: connection selects it, and the broker's again, in the same pipeline).
    reply_db: int | None = None
    broker_db: int = 0

    @property
    def one_trip(self) -> bool:
        """Whether a request and the wait for its answer share a round trip."""
        return self.broker is not None and (
            self.broker is self.replies or self.reply_db is not None
        )


class _SyncWaiter:
    """A blocked caller: woken by its reply, or when the reader role passes to it."""

    __slots__ = ("event", "reply")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.reply: dict[str, Any] | None = None

    def __call__(self, reply: dict[str, Any]) -> None:
        self.reply = reply
        self.event.set()


class Client:
    """Sends number requests to the workers and waits for the answers."""

    def __init__(
        self,
        broker_url: str,
        reply_url: str,
        *,
        shards: int | None = None,
        timeout: float = 10.0,
        resend_after: float | None = None,
        sentinel_master: str | None = None,
        queue_type: str = "classic",
    ) -> None:
        if not is_redis(reply_url):
            raise ConfigurationError(
                f"numbering replies travel over Redis; {mask_url(reply_url)!r} is not a "
                "redis:// URL (set NUMBERING_RESULT_BACKEND)"
            )
        self.broker_url = broker_url
        self.reply_url = reply_url
        self.shards = shards
        #: The Redis master's name, for sentinel:// URLs (NUMBERING_SENTINEL_MASTER).
        self.sentinel_master = sentinel_master
        #: RabbitMQ's type of the queues (NUMBERING_QUEUE_TYPE), as the workers declare them.
        self.queue_type = check_queue_type(queue_type, broker_url)
        self.timeout = check_seconds(timeout, "timeout")
        self.resend_after = (
            None if resend_after is None else check_seconds(resend_after, "resend_after")
        )
        self._state: _ProcessState | None = None
        self._state_lock = threading.Lock()
        _forget_after_fork.add(self)

    @classmethod
    def from_settings(cls, settings: Settings) -> Client:
        return cls(
            settings.broker_url,
            settings.result_backend,
            shards=settings.shards,
            timeout=settings.request_timeout,
            sentinel_master=settings.sentinel_master,
            queue_type=settings.queue_type,
        )

    @classmethod
    def from_env(cls) -> Client:
        """A client configured from ``NUMBERING_*`` environment variables."""
        return cls.from_settings(Settings.from_env())

    def __repr__(self) -> str:
        return f"<Client broker={mask_url(self.broker_url)} replies={mask_url(self.reply_url)}>"

    # -- per-process state -------------------------------------------------------------------

    def _process_state(self) -> _ProcessState:
        state = self._state
        if state is not None and state.pid == os.getpid():
            return state
        with self._state_lock:
            state = self._state
            if state is None or state.pid != os.getpid():
                state = self._open()
                self._state = state
        return state

    def _open(self) -> _ProcessState:
        settings = Settings(
            broker_url=self.broker_url,
            result_backend=self.reply_url,
            sentinel_master=self.sentinel_master,
            queue_type=self.queue_type,
        )
        app = Celery("numbering-client", set_as_current=False)
        app.conf.update(celery_config(settings))
        app.conf.result_backend = None  # answers come on the reply list, not the backend
        replies = redis_client(self.reply_url, self.sentinel_master)
        broker = None
        if is_redis(self.broker_url):
            broker = redis_client(self.broker_url, self.sentinel_master)
            if same_database(broker, replies):
                # One client: a request and the wait for its answer share a round trip.
                broker = replies
        state = _ProcessState(
            pid=os.getpid(),
            app=app,
            replies=replies,
            broker=broker,
            reply_list=new_reply_list(),
        )
        if broker is not None and broker is not replies:
            state.reply_db = reply_database(broker, replies)
            state.broker_db = int(broker.connection_pool.connection_kwargs.get("db") or 0)
        if broker is not None:
            state.push_unless_queued = broker.register_script(_PUSH_UNLESS_QUEUED)
            state.still_queued = broker.register_script(_STILL_QUEUED)
        return state

    def _start_listener(self, state: _ProcessState) -> None:
        """Read replies in a thread of their own from now on (for asyncio callers)."""
        with state.lock:
            if state.listener is None:
                state.listener = threading.Thread(
                    target=self._listen, args=(state,), name="numbering-replies", daemon=True
                )
                state.listener.start()

    def _forget(self) -> None:
        """Drop the parent's connections in a forked child, without closing them."""
        self._state = None
        self._state_lock = threading.Lock()

    def close(self) -> None:
        """Stop the listener and close this process's connections."""
        with self._state_lock:
            state, self._state = self._state, None
        if state is not None and state.pid == os.getpid():
            state.stop.set()
            if state.listener is not None:
                state.listener.join(_LISTEN_SECONDS * 3)
            state.replies.close()
            if state.broker is not None and state.broker is not state.replies:
                state.broker.close()
            state.app.close()

    def _listen(self, state: _ProcessState) -> None:
        while not state.stop.is_set():
            try:
                first = state.replies.brpop([state.reply_list], timeout=_LISTEN_SECONDS)
                if first is None:
                    continue
                more = state.replies.rpop(state.reply_list, _REPLY_BATCH) or []
            except redis.RedisError as exc:
                state.outage.failed("reading replies", exc)
                state.stop.wait(0.5)
                continue
            state.outage.ok("reading replies")
            for raw in [first[1], *more]:
                self._deliver(state, raw)

    def _deliver(self, state: _ProcessState, raw: bytes | str) -> None:
        try:
            reply = json.loads(raw)
            key = reply["key"]
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed reply: %r", raw[:200])
            return
        with state.lock:
            waiters = state.waiters.pop(key, [])
        for wake in waiters:
            wake(reply)

    # -- requests ----------------------------------------------------------------------------

    def _outgoing(self, state: _ProcessState, sequence: str, request: Request) -> _Outgoing:
        kwargs = {
            "sequence": sequence,
            "key": request.key,
            "count": request.count,
            "reference": request.reference,
        }
        if request.date is not None:
            kwargs["date"] = request.date
        queue = queue_for(sequence, self.shards)
        # Encoded once: every copy of the request is the same message, so a resend can
        # tell whether its earlier copy is still waiting in the queue.
        message = None
        if state.broker is not None:
            message = encode_redis_message(queue, kwargs, state.reply_list)
        return _Outgoing(sequence, queue, kwargs, message)

    def _publish(
        self,
        state: _ProcessState,
        out: _Outgoing,
        read: float | None = None,
        expires: float | None = None,
    ) -> None:
        """Send ``out`` (the first copy, or a resend), and on a Redis broker with
        ``read`` wait that long for the first answer in the same round trip. A resend
        on RabbitMQ expires after ``expires`` seconds (when its caller stops waiting)."""
        if state.broker is not None:
            assert out.message is not None
            broker = state.broker
            if read is None:
                if out.sent:
                    state.push_unless_queued(keys=[out.queue], args=[out.message])
                else:
                    broker.lpush(out.queue, out.message)
                out.sent = True
                return
            # The broker's server holds the reply list too: send the request and wait up
            # to ``read`` seconds for the first answer in one round trip (selecting the
            # reply lists' database, and the broker's again, when they differ).
            pipe = broker.pipeline(transaction=False)
            if out.sent:
                state.push_unless_queued(keys=[out.queue], args=[out.message], client=pipe)
            else:
                pipe.lpush(out.queue, out.message)
            apart = state.reply_db is not None
            if apart:
                pipe.execute_command("SELECT", state.reply_db)  # type: ignore[no-untyped-call]
            pipe.brpop([state.reply_list], timeout=read)
            if apart:
                pipe.execute_command("SELECT", state.broker_db)  # type: ignore[no-untyped-call]
            results = pipe.execute(raise_on_error=False)
            pushed, popped = results[0], results[2 if apart else 1]
            if apart and any(isinstance(r, Exception) for r in (results[1], results[3])):
                # SELECT refused (an ACL, a proxy): its connection may sit in the wrong
                # database, so drop every connection, and use two round trips from now on.
                log.warning(
                    "cannot select the reply lists' database on the broker's "
                    "connection (%s); sending and waiting apart",
                    results[1],
                )
                state.reply_db = None
                broker.connection_pool.disconnect()
            if isinstance(popped, (list, tuple)):
                self._deliver(state, popped[1])  # whoever's answer it is
            if isinstance(pushed, Exception):
                raise pushed
            out.sent = True
            return
        # RabbitMQ: nothing can look into the queue, so a resend (never the first copy,
        # which waits for a worker however long that takes) expires when its caller
        # gives up; the broker drops expired copies unread.
        options: dict[str, float] = {}
        if expires is not None:
            # The broker confirms each message (publisher confirms); no longer than the
            # caller waits.
            options["confirm_timeout"] = max(expires, _MIN_CONFIRM_SECONDS)
            if out.sent:
                options["expiration"] = max(expires, 0.001)
        state.app.send_task(
            TASK_NAME,
            kwargs=out.kwargs,
            queue=kombu_queue(out.queue, self.queue_type),
            headers={REPLY_HEADER: state.reply_list},
            ignore_result=True,
            **options,
        )
        out.sent = True

    def _unanswered(
        self, state: _ProcessState, out: _Outgoing, request: Request, wait: float,
        failure: BaseException | None,
    ) -> RequestTimeout:  # fmt: skip
        """The error for a request with no answer in time, saying what is known of why."""
        if not out.sent and not out.maybe_sent:
            broker = mask_url(self.broker_url)
            if isinstance(failure, redis.ResponseError):  # it answered, refusing the write
                hint = (
                    "the broker refused the write; NOREPLICAS: no replica is in sync with "
                    "the master (min-replicas-to-write), as during a failover or a partition"
                    if str(failure).startswith("NOREPLICAS")
                    else "the broker refused the write"
                )
                return BrokerUnavailable(request.key, out.sequence, wait, broker, failure, hint)
            return BrokerUnavailable(request.key, out.sequence, wait, broker, failure)
        detail = None
        try:
            if state.broker is not None and state.still_queued is not None:
                if state.still_queued(keys=[out.queue], args=[out.message]):
                    detail = _no_worker(out)
                else:
                    detail = (
                        f"a worker took it from queue {out.queue}, but its answer did not "
                        "come back in time"
                    )
            elif state.broker is None and self._consumers(state, out.queue) == 0:
                detail = _no_worker(out)
        except Exception as exc:  # only the wording depends on it
            log.debug("could not look at queue %s: %s", out.queue, exc)
        return RequestTimeout(request.key, out.sequence, wait, detail=detail)

    @staticmethod
    def _consumers(state: _ProcessState, queue: str) -> int | None:
        """How many consumers RabbitMQ has for ``queue`` (a passive declare)."""
        with state.app.connection_for_write() as connection:
            channel = connection.channel()
            try:
                declared = channel.queue_declare(queue=queue, passive=True)
            finally:
                channel.close()
        return int(declared.consumer_count)

    def _prepare(
        self,
        sequence: str,
        count: int,
        key: str | None,
        reference: Any,
        timeout: float | None,
        date: DateLike,
    ) -> tuple[str, Request, float, float]:
        name = check_sequence_name(sequence)
        day = date.isoformat() if isinstance(date, datetime.date) else date
        request = Request(new_key() if key is None else key, check_count(count), reference, day)
        wait = self.timeout if timeout is None else check_seconds(timeout, "timeout")
        resend = self.resend_after or max(wait / 3, 0.05)
        return name, request, wait, resend

    def _register(self, state: _ProcessState, key: str, wake: Waiter) -> None:
        with state.lock:
            state.waiters.setdefault(key, []).append(wake)

    def _unregister(self, state: _ProcessState, key: str, wake: Waiter) -> None:
        with state.lock:
            waiters = state.waiters.get(key)
            if waiters and wake in waiters:
                waiters.remove(wake)
                if not waiters:
                    del state.waiters[key]

    def next_block(
        self,
        sequence: str,
        *,
        count: int = 1,
        key: str | None = None,
        reference: Any = None,
        timeout: float | None = None,
        date: DateLike = None,
    ) -> Assignment:
        """Request ``count`` consecutive values; block until they are assigned."""
        name, request, wait, resend = self._prepare(sequence, count, key, reference, timeout, date)
        state = self._process_state()
        out = self._outgoing(state, name, request)
        waiter = _SyncWaiter()
        self._register(state, request.key, waiter)
        try:
            deadline = time.monotonic() + wait
            failure: BaseException | None = None
            while True:
                read = None
                if state.one_trip and self._take_reading(state, waiter):
                    read = min(resend, deadline - time.monotonic(), _LISTEN_SECONDS)
                    read = read if read >= _MIN_BLOCK_SECONDS else None
                failure = self._try_publish(state, out, read, deadline - time.monotonic())
                pause = _PUBLISH_RETRY_SECONDS if failure else resend
                if self._await(state, waiter, min(time.monotonic() + pause, deadline)):
                    assert waiter.reply is not None
                    return _result(name, request, waiter.reply)
                if time.monotonic() >= deadline:
                    raise self._unanswered(state, out, request, wait, failure) from failure
                log.info("no answer yet for key %r on %s; sending it again", request.key, name)
        finally:
            self._unregister(state, request.key, waiter)
            self._pass_reading_on(state, waiter)

    def _await(self, state: _ProcessState, waiter: _SyncWaiter, until: float) -> bool:
        """Wait until ``until`` (monotonic) for ``waiter``'s reply, reading the reply list
        while no other thread does; True if the reply came."""
        while True:
            waiter.event.clear()
            if waiter.reply is not None:
                return True
            if self._take_reading(state, waiter):
                return self._read_replies(state, waiter, until)
            left = until - time.monotonic()
            if left <= 0:
                return False
            waiter.event.wait(left)  # set by the reply, or when the reader role is ours

    def _take_reading(self, state: _ProcessState, waiter: _SyncWaiter) -> bool:
        with state.lock:
            if state.listener is None and state.reader in (None, waiter):
                state.reader = waiter
                return True
            return False

    def _read_replies(self, state: _ProcessState, waiter: _SyncWaiter, until: float) -> bool:
        """Pop replies and hand them out until ``waiter``'s has come (True) or ``until``."""
        while waiter.reply is None:
            left = until - time.monotonic()
            if left < _MIN_BLOCK_SECONDS:  # BRPOP's timeout 0 would mean "for ever"
                return False
            try:
                item = state.replies.brpop([state.reply_list], timeout=min(left, _LISTEN_SECONDS))
            except redis.RedisError as exc:
                if _permanent(exc):
                    raise _refused("NUMBERING_RESULT_BACKEND", self.reply_url, exc) from exc
                state.outage.failed("reading replies", exc)
                time.sleep(min(0.5, max(until - time.monotonic(), 0)))
                continue
            state.outage.ok("reading replies")
            if item is not None:
                self._deliver(state, item[1])
        return True

    def _pass_reading_on(self, state: _ProcessState, waiter: _SyncWaiter) -> None:
        """A leaving reader hands the role to a thread still waiting, and wakes it."""
        with state.lock:
            if state.reader is not waiter:
                return
            state.reader = None
            for waiting in state.waiters.values():
                for other in waiting:
                    if isinstance(other, _SyncWaiter) and other.reply is None:
                        state.reader = other
                        other.event.set()
                        return

    def _try_publish(
        self,
        state: _ProcessState,
        out: _Outgoing,
        read: float | None = None,
        expires: float | None = None,
    ) -> BaseException | None:
        """Publish (and with ``read``, wait that long for a first answer); on a broker
        error that may pass, return it (sending again later is always safe); raise one
        that cannot pass (a wrong password, a missing database index) at once."""
        try:
            self._publish(state, out, read, expires)
        except amqp.exceptions.PreconditionFailed as exc:
            mismatch = declared_otherwise(exc, out.queue, self.queue_type)
            raise ConfigurationError(mismatch or str(exc)) from exc
        except (redis.RedisError, OSError, *_KOMBU_ERRORS) as exc:
            if _permanent(exc):
                raise _refused("NUMBERING_BROKER_URL", self.broker_url, exc) from exc
            if not _nothing_sent(exc):
                out.maybe_sent = True  # the connection broke mid-way: it may have arrived
            state.outage.failed(f"sending requests to {mask_url(self.broker_url)}", exc)
            return exc
        if state.outage.down:  # the common path builds no message
            state.outage.ok(f"sending requests to {mask_url(self.broker_url)}")
        return None

    def next_value(
        self,
        sequence: str,
        *,
        key: str | None = None,
        reference: Any = None,
        timeout: float | None = None,
        date: DateLike = None,
    ) -> int:
        """Request the next value of ``sequence``; the same key always gets the same value."""
        return self.next_block(
            sequence, key=key, reference=reference, timeout=timeout, date=date
        ).value

    def next_values(
        self,
        sequence: str,
        count: int,
        *,
        key: str | None = None,
        reference: Any = None,
        timeout: float | None = None,
        date: DateLike = None,
    ) -> range:
        """Request ``count`` consecutive values, as a range."""
        return self.next_block(
            sequence, count=count, key=key, reference=reference, timeout=timeout, date=date
        ).values

    async def next_block_async(
        self,
        sequence: str,
        *,
        count: int = 1,
        key: str | None = None,
        reference: Any = None,
        timeout: float | None = None,
        date: DateLike = None,
    ) -> Assignment:
        """:meth:`next_block` for asyncio: waiting does not block the event loop."""
        name, request, wait, resend = self._prepare(sequence, count, key, reference, timeout, date)
        loop = asyncio.get_running_loop()
        state = await loop.run_in_executor(None, self._process_state)
        if state.listener is None:
            self._start_listener(state)
        answer: asyncio.Future[dict[str, Any]] = loop.create_future()

        def settle(reply: dict[str, Any]) -> None:
            if not answer.done():
                answer.set_result(reply)

        def wake(reply: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(settle, reply)

        out = self._outgoing(state, name, request)
        self._register(state, request.key, wake)
        try:
            deadline = loop.time() + wait
            while True:
                failure = await loop.run_in_executor(
                    None, self._try_publish, state, out, None, deadline - loop.time()
                )
                left = deadline - loop.time()
                pause = _PUBLISH_RETRY_SECONDS if failure else resend
                try:
                    reply = await asyncio.wait_for(
                        asyncio.shield(answer), timeout=min(pause, max(left, 0))
                    )
                    return _result(name, request, reply)
                except asyncio.TimeoutError:
                    if loop.time() >= deadline:
                        error = await loop.run_in_executor(
                            None, self._unanswered, state, out, request, wait, failure
                        )
                        raise error from failure
        finally:
            self._unregister(state, request.key, wake)

    async def next_value_async(
        self,
        sequence: str,
        *,
        key: str | None = None,
        reference: Any = None,
        timeout: float | None = None,
        date: DateLike = None,
    ) -> int:
        """:meth:`next_value` for asyncio."""
        block = await self.next_block_async(
            sequence, key=key, reference=reference, timeout=timeout, date=date
        )
        return block.value

    async def next_values_async(
        self,
        sequence: str,
        count: int,
        *,
        key: str | None = None,
        reference: Any = None,
        timeout: float | None = None,
        date: DateLike = None,
    ) -> range:
        """:meth:`next_values` for asyncio."""
        block = await self.next_block_async(
            sequence, count=count, key=key, reference=reference, timeout=timeout, date=date
        )
        return block.values


@dataclass
class _Outgoing:
    """One request on its way: where it goes, and whether a copy has reached the broker."""

    sequence: str
    queue: str
    kwargs: dict[str, Any]
    message: str | None  # the Redis message, the same bytes for every copy
    sent: bool = False
    #: A send failed after the connection was up: the copy may have reached the broker.
    maybe_sent: bool = False


def _nothing_sent(exc: BaseException) -> bool:
    """True when ``exc`` says the request cannot have reached the broker: the connection
    could not even be opened (refused, unreachable, timed out while connecting; no
    master known to the sentinels), or the server answered and refused the write (a
    replica's READONLY, NOREPLICAS, out of memory; RabbitMQ's nack of a message)."""
    if isinstance(
        exc,
        (
            ConnectionRefusedError,
            MasterNotFoundError,
            redis.ResponseError,
            amqp.exceptions.MessageNacked,
        ),
    ):
        return True
    text = str(exc)
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        # redis-py's words for a failed connect, and for a reply of READONLY through a
        # sentinel-managed connection (the command was refused by a demoted master)
        return "connecting to" in text or text == "The previous master is now a slave"
    return isinstance(exc, kombu.exceptions.OperationalError) and "Connection refused" in text


def _no_worker(out: _Outgoing) -> str:
    return (
        f"no worker took it from queue {out.queue}: is a worker running for it "
        f"(numbering worker --sequence {out.sequence}), and does sequence {out.sequence!r} "
        "exist? The request stays queued for the worker"
    )


def _refused(variable: str, url: str, exc: BaseException) -> ConfigurationError:
    return ConfigurationError(f"{mask_url(url)} refused numbering: {exc} (check {variable})")


def _result(sequence: str, request: Request, reply: dict[str, Any]) -> Assignment:
    error = reply.get("error")
    if error is not None:
        raise error_from_reply(error)
    try:
        return Assignment(
            sequence=sequence,
            key=request.key,
            value=int(reply["value"]),
            count=int(reply["count"]),
            cycle=int(reply["cycle"]),
            resent=bool(reply["resent"]),
            formatted=_optional_str(reply.get("formatted")),
            period=_optional_str(reply.get("period")),
        )
    except (KeyError, TypeError, ValueError):
        raise NumberingError(f"malformed reply for key {request.key!r}: {reply!r}") from None


def _optional_str(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


# Clients to reset in a forked child: connections and threads do not survive a fork, and
# sharing the parent's sockets would interleave two processes' traffic.
_forget_after_fork: weakref.WeakSet[Client] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    clients = list(_forget_after_fork)
    if not clients:
        return
    # kombu keeps broker connection pools in process-wide registries, keyed by URL, that
    # it clears only in multiprocessing and billiard children. After a plain os.fork()
    # (gunicorn --preload, uWSGI) the child's new Celery app would take the parent's open
    # RabbitMQ connection from there: two processes on one socket, each reading the
    # other's frames and flipping its blocking mode (a parent then hung in recv()). Drop
    # the child's references without closing anything: closing would shut the socket the
    # parent still uses.
    kombu.pools.connections.clear()
    kombu.pools.producers.clear()
    for client in clients:
        client._forget()


os.register_at_fork(after_in_child=_after_fork_in_child)
