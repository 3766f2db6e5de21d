"""The queue layer end to end: real worker processes, Redis, PostgreSQL, client processes."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from integration.stack import Stack
from ledger_check import check_gapless

from numbering import Allocator, Client, RequestTimeout, create_engine
from numbering.brokers import inflight_list
from numbering.errors import (
    InvalidCountError,
    InvalidKeyError,
    KeyReusedError,
    RetriesExhaustedError,
    SequenceNotFoundError,
)
from numbering.messages import encode_redis_message
from numbering.replies import new_reply_list
from numbering.routing import (
    MAX_QUEUE_BYTES,
    REPLY_HEADER,
    TASK_NAME,
    Shard,
    queue_for,
    sequence_queue,
)
from numbering.tasks.consumer import BatchProcessor, Consumer
from numbering.tasks.guard import consumer_lock
from numbering.tasks.redis_transport import RedisTransport


def setup_sequences(stack: Stack, *names: str) -> Allocator:
    allocator = Allocator(stack.settings.database_url)
    for name in names:
        allocator.create_sequence(name, exist_ok=True)
    return allocator


def assert_increasing(results: list[list[int]]) -> None:
    for values in results:
        assert values == sorted(values), "a client got decreasing numbers"
        assert len(set(values)) == len(values)


def four_clients(stack: Stack) -> None:
    """Four client processes, 250 numbers each, on ``invoices``: the history checker
    passes and every client's numbers increase."""
    results = stack.client_processes([("invoices", f"c{c}", 250) for c in range(4)])
    by_key = stack.check("invoices", [f"c{c}:{i}" for c in range(4) for i in range(250)])
    assert sorted(v for values in results for v in values) == list(range(1, 1001))
    for c, values in enumerate(results):
        assert values == [by_key[f"c{c}:{i}"][0] for i in range(250)]
    assert_increasing(results)


def test_four_client_processes_on_one_sequence(client_stack: Stack) -> None:
    stack = client_stack
    setup_sequences(stack, "invoices")
    stack.worker("--sequence", "invoices")
    four_clients(stack)


def test_four_client_processes_on_a_worker_with_two_batches_in_flight(
    engine_stack: Stack,
) -> None:
    """The same load through a worker that keeps two batches in flight, on PostgreSQL
    and MariaDB: every client's numbers increase, the history checker passes."""
    stack = engine_stack
    setup_sequences(stack, "invoices")
    stack.worker("--sequence", "invoices", "--in-flight", "2")
    four_clients(stack)


def test_two_sequences_on_two_workers(stack: Stack) -> None:
    setup_sequences(stack, "invoices", "credit-notes")
    stack.worker("--sequence", "invoices")
    stack.worker("--sequence", "credit-notes")
    jobs = [(seq, f"{seq}-{c}", 100) for seq in ("invoices", "credit-notes") for c in range(2)]
    results = stack.client_processes(jobs)
    assert_increasing(results)
    for seq in ("invoices", "credit-notes"):
        keys = [f"{seq}-{c}:{i}" for c in range(2) for i in range(100)]
        assert len(stack.check(seq, keys)) == 200


# A name with spaces and accents, and one whose queue name is cut and digested (over 255
# bytes of UTF-8 with the prefix, which RabbitMQ would refuse).
WIDE_NAMES = ("Factures clients n\u00b0 7", "Avoirs " + "\u8acb\u6c42\u66f8" * 31)


def serve_wide_names(stack: Stack, suffix: str = "") -> None:
    """A worker serves sequences named with any text; clients reach them by name."""
    names = [name[: 100 - len(suffix)] + suffix for name in WIDE_NAMES]
    cut = sequence_queue(names[1]).encode()
    assert len(cut) <= MAX_QUEUE_BYTES < len(f"numbering.{names[1]}".encode())
    setup_sequences(stack, *names)
    worker = stack.worker(*(arg for name in names for arg in ("--sequence", name)))
    client = stack.client()
    for n, name in enumerate(names):
        assert [client.next_value(name, key=f"{n}:{i}") for i in range(5)] == [1, 2, 3, 4, 5]
        assert client.next_block(name, key=f"{n}:2").resent
    worker.wait_for(f"active consumer of {sequence_queue(names[1])}")
    for n, name in enumerate(names):
        keys = [f"{n}:{i}" for i in range(5)]
        stack.check(name, keys, unrecorded=keys)  # (taken here, not by client processes)


def test_sequences_named_with_any_text(stack: Stack) -> None:
    serve_wide_names(stack)


def test_sequences_named_like_numbering_s_own_queues(stack: Stack) -> None:
    """Sequences named ``control`` and ``shard.0-of-8`` get queues of their own, not the
    control queue (where Celery's consumer would answer in the result backend, and the
    client wait in vain) or a shard's."""
    from numbering.config.celery import CONTROL_QUEUE

    names = ["control", "shard.0-of-8"]
    assert sequence_queue("control") != CONTROL_QUEUE
    assert sequence_queue("shard.0-of-8") != Shard(0, 8).queue
    assert sequence_queue("shard.notes") == "numbering.shard.notes"  # no clash: unchanged
    setup_sequences(stack, *names)
    worker = stack.worker(*(arg for name in names for arg in ("--sequence", name)))
    client = stack.client()
    for name in names:
        assert [client.next_value(name, key=f"{name}:{i}") for i in range(5)] == [1, 2, 3, 4, 5]
    worker.wait_for("active consumer of numbering./control")
    for name in names:
        keys = [f"{name}:{i}" for i in range(5)]
        stack.check(name, keys, unrecorded=keys)


def test_sequences_on_shard_queues(stack: Stack) -> None:
    names = [f"tenant-{t}" for t in range(6)]
    assert {Shard.of(name, 2).index for name in names} == {0, 1}
    setup_sequences(stack, *names)
    stack.env["NUMBERING_SHARDS"] = "2"
    stack.worker("--shard", "0/2")
    stack.worker("--shard", "1/2")
    results = stack.client_processes([(name, f"{name}-c", 40) for name in names])
    assert_increasing(results)
    for name, values in zip(names, results, strict=True):
        assert values == list(range(1, 41))
        stack.check(name, [f"{name}-c:{i}" for i in range(40)])


def test_one_worker_serves_several_shards(stack: Stack) -> None:
    """``--shard`` repeated: one process, one consumer for its shard queues, refusing on
    each queue the sequences of the other shards."""
    names = [f"tenant-{t}" for t in range(6)]
    setup_sequences(stack, *names)
    stack.env["NUMBERING_SHARDS"] = "2"
    stack.worker("--shard", "0/2", "--shard", "1/2")
    results = stack.client_processes([(name, f"{name}-c", 30) for name in names])
    for name, values in zip(names, results, strict=True):
        assert values == list(range(1, 31))
        stack.check(name, [f"{name}-c:{i}" for i in range(30)])
    # A request put on the wrong shard's queue fails alone, with a clear reason.
    app = Celery(broker=stack.settings.broker_url, set_as_current=False)
    stray = next(name for name in names if Shard.of(name, 2).index == 1)
    publish(app, Shard(0, 2).queue, "numbering.reply.stray", sequence=stray, key="x")
    [reply] = read_replies(stack.settings.result_backend, "numbering.reply.stray", 1).values()
    assert "does not belong to numbering.shard.0-of-2" in str(reply["error"])


def test_one_worker_serves_many_queues(stack: Stack) -> None:
    """Each queue's consumer holds a database connection for its lock: a worker with more
    queues than the default pool holds (15) must still serve every one of them."""
    names = [f"desk-{i:02d}" for i in range(18)]
    setup_sequences(stack, *names)
    stack.worker(*[arg for name in names for arg in ("--sequence", name)])
    client: Client = stack.client()
    values = [client.next_value(name, key=f"{name}:1", timeout=20) for name in names]
    assert values == [1] * len(names)
    engine = create_engine(stack.settings.database_url)
    for name in names:
        check_gapless(engine, name, keys=[f"{name}:1"])


def test_a_worker_takes_over_only_the_queues_it_can(stack: Stack) -> None:
    """Two workers whose queues overlap: the second serves the queue it alone has, stands
    by for the shared one, and takes that over when the first one dies."""
    setup_sequences(stack, "a", "b", "c")
    first = stack.worker("--sequence", "a", "--sequence", "b")
    second = stack.worker("--sequence", "b", "--sequence", "c")
    second.wait_for("standby: another consumer is active on numbering.b")
    client = stack.client()
    assert [client.next_value(name, key=f"{name}:1") for name in "abc"] == [1, 1, 1]
    first.kill()
    second.wait_for("active consumer of numbering.b")
    assert [client.next_value(name, key=f"{name}:2") for name in "bc"] == [2, 2]
    engine = create_engine(stack.settings.database_url)
    for name, keys in [("a", ["a:1"]), ("b", ["b:1", "b:2"]), ("c", ["c:1", "c:2"])]:
        check_gapless(engine, name, keys=keys)


def request_message(queue: str, sequence: str, key: str) -> bytes:
    body = {"sequence": sequence, "key": key, "count": 1, "reference": None}
    return encode_redis_message(queue, body, None)


def in_thread_consumer(
    stack: Stack, queues: list[str], engine: Any
) -> tuple[Consumer, threading.Event, list[list[str]], redis.Redis]:
    """A consumer of ``queues`` in this process, recording the keys of each batch."""
    broker = redis.Redis.from_url(stack.settings.broker_url)
    replies = redis.Redis.from_url(stack.settings.result_backend)
    batches: list[list[str]] = []

    class Recording(BatchProcessor):
        def prepare(self, items: Any, shards: Any = None) -> Any:
            batches.append([item.request.key for item in items])
            return super().prepare(items, shards)

    stop = threading.Event()
    drain = Consumer(
        RedisTransport(
            broker, {queue: consumer_lock(engine, queue) for queue in queues}, stop=stop
        ),
        Recording(Allocator(engine), replies),
        batch_size=500,
        stop=stop,
    )
    return drain, stop, batches, broker


def test_one_consumer_drains_all_its_queues_into_one_transaction(stack: Stack) -> None:
    """What waits on several queues is drained together and assigned in one batch; an
    idle consumer of several queues wakes for a request on any of them."""
    names = ["north", "south", "west"]
    setup_sequences(stack, *names)
    engine = create_engine(stack.settings.database_url)
    queues = [sequence_queue(name) for name in names]
    drain, stop, batches, broker = in_thread_consumer(stack, queues, engine)
    for name, queue in zip(names, queues, strict=True):
        for i in range(2):
            broker.lpush(queue, request_message(queue, name, f"{name}:{i}"))
    consumer = threading.Thread(target=drain.run)
    consumer.start()
    try:
        deadline = time.monotonic() + 20
        while drain.handled < 6 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(batches[0]) == sorted(f"{n}:{i}" for n in names for i in range(2))
        time.sleep(0.3)  # idle now: the next request rings the doorbell
        broker.lpush(queues[2], request_message(queues[2], "west", "west:late"))
        while drain.handled < 7 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert batches[-1] == ["west:late"]
    finally:
        stop.set()
        consumer.join(30)
    assert not consumer.is_alive()
    assert [broker.llen(q) + broker.llen(inflight_list(q)) for q in queues] == [0, 0, 0]
    for name in names:
        keys = [f"{name}:0", f"{name}:1"] + (["west:late"] if name == "west" else [])
        check_gapless(engine, name, keys=keys)


def test_an_idle_consumer_does_not_spin_on_a_queue_it_stands_by_for(stack: Stack) -> None:
    """A request waiting on a queue whose lock another consumer holds must neither wake
    the idle consumer again and again nor be taken by it."""
    names = ["one", "two", "three"]
    setup_sequences(stack, *names)
    engine = create_engine(stack.settings.database_url)
    queues = [sequence_queue(name) for name in names]
    other = consumer_lock(engine, queues[2])
    assert other.try_acquire()
    drain, stop, batches, broker = in_thread_consumer(stack, queues, engine)
    broker.lpush(queues[2], request_message(queues[2], "three", "three:0"))
    calls = 0
    real = drain.transport._ack_and_drain  # type: ignore[attr-defined]

    def counted(**kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(**kwargs)

    drain.transport._ack_and_drain = counted  # type: ignore[attr-defined]
    consumer = threading.Thread(target=drain.run)
    consumer.start()
    try:
        time.sleep(3)
        assert calls < 20, f"{calls} drains in 3 s while idle"
        assert (broker.llen(queues[2]), broker.llen(inflight_list(queues[2]))) == (1, 0)
        broker.lpush(queues[0], request_message(queues[0], "one", "one:0"))
        deadline = time.monotonic() + 10
        while drain.handled < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert batches == [["one:0"]]
    finally:
        stop.set()
        consumer.join(30)
        other.release()
    assert not consumer.is_alive()
    check_gapless(engine, "one", keys=["one:0"])
    assert broker.llen(queues[2]) == 1  # still waiting for its own consumer
    broker.delete(queues[2])


def publish(app: Celery, queue: str, reply_to: str, **kwargs: object) -> None:
    app.send_task(TASK_NAME, kwargs=kwargs, queue=queue, headers={REPLY_HEADER: reply_to})


def read_replies(url: str, reply_to: str, count: int) -> dict[str | None, dict[str, object]]:
    client = redis.Redis.from_url(url)
    replies: dict[str | None, dict[str, object]] = {}
    deadline = time.monotonic() + 30
    while len(replies) < count and time.monotonic() < deadline:
        item = client.brpop([reply_to], timeout=1)
        if item is not None:
            reply = json.loads(item[1])
            replies[reply["key"]] = reply
    return replies


def test_invalid_requests_in_a_batch_fail_alone(stack: Stack) -> None:
    """Requests queued before the worker starts arrive as one batch; bad ones fail alone."""
    allocator = setup_sequences(stack, "invoices", "other")
    allocator.next_value("other", key="taken")
    settings = stack.settings
    app = Celery(broker=settings.broker_url)
    queue = sequence_queue("invoices")
    reply_to = "numbering.reply.test"
    publish(app, queue, reply_to, sequence="invoices", key="a")
    publish(app, queue, reply_to, sequence="invoices", key="zero", count=0)
    publish(app, queue, reply_to, sequence="invoices", key="taken")
    publish(app, queue, reply_to, sequence="nosuch", key="lost")
    publish(app, queue, reply_to, sequence="invoices", key="a")  # a resend
    publish(app, queue, reply_to, sequence="invoices", key=" spaced")
    publish(app, queue, reply_to, sequence="invoices", key="b", count=2)
    redis.Redis.from_url(settings.broker_url).lpush(queue, b"{not json")
    assert redis.Redis.from_url(settings.broker_url).llen(queue) == 8

    worker = stack.worker("--sequence", "invoices")
    replies = read_replies(settings.result_backend, reply_to, 6)
    assert replies["a"]["value"] == 1
    assert replies["b"]["value"] == 2
    assert replies["b"]["count"] == 2
    errors = {key: r["error"]["type"] for key, r in replies.items() if "error" in r}  # type: ignore[index]
    assert errors == {
        "zero": InvalidCountError.__name__,
        "taken": KeyReusedError.__name__,
        "lost": SequenceNotFoundError.__name__,
        " spaced": InvalidKeyError.__name__,
    }
    engine = create_engine(settings.database_url)
    check_gapless(engine, "invoices", keys=["a", "b"])
    worker.wait_for("not a JSON kombu envelope")


def test_resent_key_gets_its_first_number(stack: Stack) -> None:
    setup_sequences(stack, "invoices")
    stack.worker("--sequence", "invoices")
    client = stack.client()
    first = client.next_block("invoices", key="invoice:1")
    other = client.next_value("invoices", key="invoice:2")
    again = client.next_block("invoices", key="invoice:1")
    assert (first.value, first.resent, other, again.value, again.resent) == (1, False, 2, 1, True)
    with pytest.raises(KeyReusedError):
        client.next_values("invoices", 3, key="invoice:1")


def test_a_batch_left_in_flight_is_finished_by_the_next_consumer(stack: Stack) -> None:
    """A worker killed after taking a batch (before answering) loses nothing."""
    setup_sequences(stack, "invoices")
    settings = stack.settings
    broker = redis.Redis.from_url(settings.broker_url)
    queue = sequence_queue("invoices")
    app = Celery(broker=settings.broker_url)
    for i in range(5):
        publish(app, queue, "numbering.reply.test", sequence="invoices", key=f"k{i}")
    # What a consumer killed mid-batch leaves: the batch moved to its in-flight list.
    broker.eval(
        "local items = redis.call('RPOP', KEYS[1], 5) "
        "for i = 1, #items do redis.call('LPUSH', KEYS[2], items[i]) end",
        2,
        queue,
        inflight_list(queue),
    )
    assert (broker.llen(queue), broker.llen(inflight_list(queue))) == (0, 5)
    worker = stack.worker("--sequence", "invoices")
    replies = read_replies(settings.result_backend, "numbering.reply.test", 5)
    assert [replies[f"k{i}"]["value"] for i in range(5)] == [1, 2, 3, 4, 5]
    deadline = time.monotonic() + 10  # each request leaves the list just after its reply
    while broker.llen(inflight_list(queue)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert broker.llen(inflight_list(queue)) == 0
    worker.wait_for("finishing 5 request(s) left in flight")


def test_killed_worker_under_load_loses_nothing(stack: Stack) -> None:
    """SIGKILL the worker while clients are waiting; a new worker finishes the work and
    the clients' resends (same keys) cost no gap and no duplicate."""
    setup_sequences(stack, "invoices")
    worker = stack.worker("--sequence", "invoices")
    stack.env["NUMBERING_REQUEST_TIMEOUT"] = "120"
    clients = stack.start_clients([("invoices", f"c{c}", 150) for c in range(3)])
    stack.wait_for_numbers("invoices", 100)
    worker.kill()
    time.sleep(1)
    stack.worker("--sequence", "invoices")
    results = clients.wait()
    assert len(results) == 3
    assert_increasing(results)
    stack.check("invoices", [f"c{c}:{i}" for c in range(3) for i in range(150)])


def test_second_worker_waits_as_standby_and_takes_over(stack: Stack) -> None:
    setup_sequences(stack, "invoices")
    first = stack.worker("--sequence", "invoices")
    second = stack.worker("--sequence", "invoices", active=False)
    client = stack.client()
    assert client.next_value("invoices", key="before") == 1
    assert "active consumer" not in second.output()
    first.kill()
    second.wait_for("active consumer")
    assert client.next_value("invoices", key="after") == 2
    check_gapless(create_engine(stack.settings.database_url), "invoices")


def test_plain_celery_apps_can_call_the_task(stack: Stack) -> None:
    setup_sequences(stack, "invoices")
    stack.worker("--sequence", "invoices")
    settings = stack.settings
    app = Celery(broker=settings.broker_url, backend=settings.result_backend)
    result = app.send_task(
        TASK_NAME, kwargs={"sequence": "invoices", "key": "celery:1"}, queue=queue_for("invoices")
    )
    assert result.get(timeout=30)["value"] == 1
    failed = app.send_task(
        TASK_NAME, kwargs={"sequence": "invoices", "key": ""}, queue=queue_for("invoices")
    )
    with pytest.raises(Exception, match="must not be empty"):
        failed.get(timeout=30)


def test_asyncio_client(stack: Stack) -> None:
    setup_sequences(stack, "invoices")
    stack.worker("--sequence", "invoices")
    client = stack.client()

    async def main() -> list[int]:
        firsts = await asyncio.gather(
            *(client.next_value_async("invoices", key=f"a{i}") for i in range(50))
        )
        block = await client.next_values_async("invoices", 10, key="block")
        again = await client.next_value_async("invoices", key="a7")
        return [*firsts, block.start, again]

    values = asyncio.run(main())
    assert sorted(values[:50]) == list(range(1, 51))
    assert values[50] == 51
    engine = create_engine(stack.settings.database_url)
    by_key = check_gapless(engine, "invoices")
    assert values[51] == by_key["a7"][0]


def test_timeout_names_the_key_and_asking_again_is_safe(client_stack: Stack) -> None:
    stack = client_stack
    setup_sequences(stack, "invoices")
    client = stack.client(resend_after=0.3)
    with pytest.raises(RequestTimeout) as info:
        client.next_value("invoices", key="invoice:5", timeout=1)
    assert info.value.key == "invoice:5"
    assert "ask again with key='invoice:5'" in str(info.value)
    # Several copies of the request are now queued; the worker answers them all the same.
    stack.worker("--sequence", "invoices")
    assert client.next_value("invoices", key="invoice:5") == 1
    assert client.next_value("invoices", key="invoice:6") == 2
    check_gapless(
        create_engine(stack.settings.database_url), "invoices", keys=["invoice:5", "invoice:6"]
    )


def test_client_survives_fork(client_stack: Stack) -> None:
    stack = client_stack
    setup_sequences(stack, "invoices")
    stack.worker("--sequence", "invoices")
    client = stack.client()
    assert client.next_value("invoices", key="parent:1") == 1
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: must open its own connections and get its own answers
        try:
            values = [client.next_value("invoices", key=f"child:{i}") for i in range(20)]
            os.write(write, json.dumps(values).encode())
        finally:
            os._exit(0)
    os.close(write)
    parent = [client.next_value("invoices", key=f"parent:{i}") for i in range(2, 22)]
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        child = json.loads(pipe.read())
    assert len(child) == 20
    assert sorted([1, *parent, *child]) == list(range(1, 42))
    check_gapless(create_engine(stack.settings.database_url), "invoices")


def test_client_is_shared_by_threads(client_stack: Stack) -> None:
    stack = client_stack
    setup_sequences(stack, "invoices")
    stack.worker("--sequence", "invoices")
    client: Client = stack.client()
    got: dict[int, list[int]] = {}

    def clerk(t: int) -> None:
        got[t] = [client.next_value("invoices", key=f"t{t}:{i}") for i in range(50)]

    threads = [threading.Thread(target=clerk, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert_increasing(list(got.values()))
    state = client._process_state()
    broker_url, reply_url = stack.settings.broker_url, stack.settings.result_backend
    shared = broker_url == reply_url
    elsewhere = "localhost" in reply_url
    assert (state.broker is state.replies) is shared  # one connection pool when shared
    # Another database of the broker's server: still one round trip, by SELECT.
    assert state.one_trip is not elsewhere
    assert (state.reply_db is not None) is (not shared and not elsewhere)
    # Every connection the SELECTs went through was left on the broker's database.
    assert state.broker is not None
    for _ in range(20):
        state.broker.lpush("probe", "x")
    assert redis.Redis.from_url(broker_url).llen("probe") == 20
    keys = [f"t{t}:{i}" for t in range(8) for i in range(50)]
    check_gapless(create_engine(stack.settings.database_url), "invoices", keys=keys)


def test_reading_passes_to_a_waiting_thread_when_the_reader_leaves(client_stack: Stack) -> None:
    stack = client_stack
    """Waiting threads take turns reading the reply list. The reader here gives up (its
    sequence has no worker); the other thread must take over reading at once, not at its
    next resend (30 s away)."""
    setup_sequences(stack, "invoices", "unserved")
    client: Client = stack.client(resend_after=30)
    outcome: dict[str, object] = {}

    def first() -> None:  # waits first, so it is the reader; times out after 1 s
        try:
            client.next_value("unserved", key="u1", timeout=1)
        except RequestTimeout as exc:
            outcome["first"] = exc

    def second() -> None:
        outcome["second"] = client.next_value("invoices", key="i1", timeout=60)
        outcome["second at"] = time.monotonic()

    reader = threading.Thread(target=first)
    reader.start()
    time.sleep(0.3)
    follower = threading.Thread(target=second)
    follower.start()
    reader.join(10)
    assert isinstance(outcome.get("first"), RequestTimeout)
    stack.worker("--sequence", "invoices")
    ready = time.monotonic()
    follower.join(60)
    assert outcome["second"] == 1
    assert float(outcome["second at"]) - ready < 10  # type: ignore[arg-type]


def test_sync_and_asyncio_callers_in_one_process(client_stack: Stack) -> None:
    stack = client_stack
    setup_sequences(stack, "invoices")
    stack.worker("--sequence", "invoices")
    client: Client = stack.client()
    sync_values: list[int] = []

    def clerk() -> None:
        sync_values.extend(client.next_value("invoices", key=f"s{i}") for i in range(30))

    thread = threading.Thread(target=clerk)
    thread.start()

    async def main() -> list[int]:
        return await asyncio.gather(
            *(client.next_value_async("invoices", key=f"a{i}") for i in range(30))
        )

    async_values = asyncio.run(main())
    thread.join(60)
    assert sorted(sync_values + async_values) == list(range(1, 61))
    assert_increasing([sync_values])
    keys = [f"s{i}" for i in range(30)] + [f"a{i}" for i in range(30)]
    check_gapless(create_engine(stack.settings.database_url), "invoices", keys=keys)


def test_cli_next_goes_through_the_queue(stack: Stack) -> None:
    setup_sequences(stack, "invoices", "other")
    stack.worker("--sequence", "invoices")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "numbering", *args],
            env=stack.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert cli("next", "invoices", "--key", "cli:1").stdout == "1\n"
    assert cli("next", "invoices", "--key", "cli:1").stdout == "1\n"
    assert cli("next", "invoices", "--count", "4").stdout == "2..5\n"
    refused = cli("next", "invoices", "--key", "cli:1", "--count", "2")
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        "error: request key 'cli:1' was already used for a block of 1 value(s), not 2"
    )
    no_worker = cli("next", "other", "--key", "cli:9", "--timeout", "1")
    assert no_worker.returncode == 1
    assert "ask again with key='cli:9'" in no_worker.stderr
    assert "no worker took it from queue numbering.other" in no_worker.stderr
    for args, message in [
        (("worker",), "give at least one --sequence NAME, a --shard I/K, or --shards K"),
        (("worker", "--shard", "9/4"), "shard index must be 0..3"),
        (("worker", "--shard", "0/2", "--shard", "1/4"), "must have the same count K"),
        (("worker", "--sequence", "bad/name"), "invalid sequence name"),
    ]:
        done = cli(*args)
        assert done.returncode == 1, args
        assert message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_sigterm_finishes_the_batch_in_hand(stack: Stack) -> None:
    setup_sequences(stack, "invoices")
    worker = stack.worker("--sequence", "invoices")
    clients = stack.start_clients([("invoices", f"c{c}", 100) for c in range(2)])
    stack.wait_for_numbers("invoices", 50)
    assert worker.terminate() == 0
    assert (
        redis.Redis.from_url(stack.settings.broker_url).llen(
            inflight_list(sequence_queue("invoices"))
        )
        == 0
    ), "a warm shutdown must not leave a batch in flight"
    stack.worker("--sequence", "invoices")
    results = clients.wait()
    assert_increasing(results)
    stack.check("invoices", [f"c{c}:{i}" for c in range(2) for i in range(100)])


def test_worker_on_sqlite_with_a_file_lock(
    sqlite_url: str, redis_urls: tuple[str, str], tmp_path: Path
) -> None:
    """Embedded use: SQLite holds the ledger, a file lock elects the active consumer."""
    stack = Stack(sqlite_url, *redis_urls, tmp_path)
    try:
        setup_sequences(stack, "invoices")
        stack.worker("--sequence", "invoices")
        standby = stack.worker("--sequence", "invoices", active=False)
        results = stack.client_processes([("invoices", f"c{c}", 50) for c in range(2)])
        assert_increasing(results)
        assert "active consumer" not in standby.output()
        stack.workers[0].kill()
        standby.wait_for("active consumer")
        assert stack.client().next_value("invoices", key="after") == 101
        check_gapless(create_engine(sqlite_url), "invoices")
    finally:
        stack.close()


def test_passwords_stay_out_of_logs_and_output(stack: Stack) -> None:
    secret = "Hunter2-Secret"
    url = stack.env["NUMBERING_DATABASE_URL"].replace("postgres@", f"postgres:{secret}@")
    assert secret in url  # the server trusts local connections, so any password works
    stack.env["NUMBERING_DATABASE_URL"] = url
    setup_sequences(stack, "invoices")
    worker = stack.worker("--sequence", "invoices", "--loglevel", "DEBUG")
    assert stack.client().next_value("invoices", key="k") == 1
    outputs = [worker.output()]
    for args in (("config",), ("sequence", "list"), ("next", "nosuch", "--timeout", "0.5")):
        done = subprocess.run(
            [sys.executable, "-m", "numbering", "-v", *args],
            env=stack.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        outputs += [done.stdout, done.stderr]
    assert not [out for out in outputs if secret in out]
    assert "postgres:***@" in outputs[1]  # `numbering config` shows the URL, masked


def test_status_shows_queues_consumers_and_waiting_requests(stack: Stack) -> None:
    setup_sequences(stack, "invoices", "orphans")
    worker = stack.worker("--sequence", "invoices")
    client = stack.client(timeout=0.5)
    assert client.next_value("invoices", key="i1") == 1
    with pytest.raises(RequestTimeout):
        client.next_value("orphans", key="o1")  # nobody consumes this queue

    def status(*args: str) -> subprocess.CompletedProcess[str]:
        return stack.numbering("status", *args)

    shown = {row["sequence"]: row for row in json.loads(status("--json").stdout)}
    assert shown["invoices"]["consumer"] is True
    holder = f"{socket.gethostname()}:{worker.proc.pid}"  # which worker is active
    assert shown["invoices"]["holder"] == holder
    assert shown["orphans"]["holder"] is None
    assert (shown["invoices"]["last_value"], shown["invoices"]["waiting"]) == (1, 0)
    assert shown["orphans"]["consumer"] is False
    assert shown["orphans"]["waiting"] >= 1  # the request and its resends
    assert shown["orphans"]["oldest_waiting_seconds"] >= 0.3
    assert shown["orphans"]["problems"] == [
        f"{shown['orphans']['waiting']} request(s) waiting and no active consumer"
    ]
    table = status()
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "SEQUENCE", "LAST", "WAITING", "IN", "FLIGHT", "QUARANTINED", "CONSUMER", "OLDEST",
    ]  # fmt: skip
    assert lines[1].split()[:7] == ["invoices", "1", "0", "0", "0", "alive:", holder]
    assert lines[2].split()[0] == "orphans"
    assert "NONE" in lines[2].split()
    assert "problem: orphans:" in table.stderr
    # The database's state, as the worker's start-up check sees it now.
    assert "database: PostgreSQL primary, timeline 1" in lines
    assert "database: standbys: none connected" in lines
    checked = status("--check")
    assert checked.returncode == 1
    stack.worker("--sequence", "orphans")  # the worker drains the waiting requests
    deadline = time.monotonic() + 30
    while status("--check").returncode != 0:
        assert time.monotonic() < deadline, status().stdout
        time.sleep(0.2)
    check_gapless(create_engine(stack.settings.database_url), "orphans", keys=["o1"])


def test_worker_metrics_are_scraped(stack: Stack) -> None:
    import socket
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stack.env["NUMBERING_METRICS_PORT"] = str(port)
    setup_sequences(stack, "invoices")
    worker = stack.worker("--sequence", "invoices")
    assert f"metrics on port {port}" in worker.output()
    client = stack.client()
    for i in range(20):
        client.next_value("invoices", key=f"k{i}")
    client.next_value("invoices", key="k0")  # a resend
    with pytest.raises(KeyReusedError):
        client.next_values("invoices", 2, key="k1")  # same key, other count: refused

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
            text = page.read().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    samples = scrape()

    def requests(outcome: str) -> float:
        key = (("outcome", outcome), ("sequence", "invoices"))
        return samples.get(("numbering_requests_total", key), 0)

    assert requests("assigned") == 20
    assert requests("resent") == 1
    assert requests("KeyReusedError") == 1
    assert samples[("numbering_batch_size_count", ())] >= 1
    assert samples[("numbering_batch_size_sum", ())] == 22
    assert samples[("numbering_assignment_seconds_count", ())] >= 1
    assert samples[("numbering_quarantined_total", ())] == 0
    check_gapless(create_engine(stack.settings.database_url), "invoices")


def test_worker_json_logs_carry_the_request_key(stack: Stack) -> None:
    stack.env["NUMBERING_LOG_FORMAT"] = "json"
    setup_sequences(stack, "invoices")
    worker = stack.worker("--sequence", "invoices")
    client = stack.client()
    client.next_value("invoices", key="dup")
    with pytest.raises(KeyReusedError):
        client.next_values("invoices", 2, key="dup")
    deadline = time.monotonic() + 10
    while '"key": "dup"' not in worker.output():
        assert time.monotonic() < deadline, worker.output()
        time.sleep(0.1)
    lines = [json.loads(line) for line in worker.output().splitlines() if line.startswith("{")]
    [failure] = [line for line in lines if line.get("key") == "dup"]
    assert failure["sequence"] == "invoices"
    assert failure["level"] == "INFO"
    assert "was already used for a block of 1 value(s), not 2" in failure["message"]
    assert {"time", "logger", "task_id"} <= set(failure)
    assert any("active consumer of numbering.invoices" in line["message"] for line in lines)


def test_a_stop_during_the_ack_and_drain_still_finishes_the_batch_drained(
    pg_url: str, redis_urls: tuple[str, str]
) -> None:
    """A warm shutdown that lands between the acknowledgement-and-drain of the next batch
    and the consumer's next turn must still finish that batch, not leave it in flight
    (seen in CI as test_sigterm_finishes_the_batch_in_hand failing now and then)."""
    broker_url, reply_url = redis_urls
    broker, replies = redis.Redis.from_url(broker_url), redis.Redis.from_url(reply_url)
    engine = create_engine(pg_url)
    allocator = Allocator(engine)
    allocator.create_sequence("invoices")
    queue = sequence_queue("invoices")
    stop = threading.Event()
    drain = Consumer(
        RedisTransport(broker, {queue: consumer_lock(engine, queue)}, stop=stop),
        BatchProcessor(allocator, replies),
        batch_size=500,
        stop=stop,
    )
    real = drain.transport._ack_and_drain  # type: ignore[attr-defined]

    def then_stop(**kwargs: object) -> object:
        drained = real(**kwargs)
        stop.set()  # SIGTERM arrives now: the drained batch is already in flight
        return drained

    drain.transport._ack_and_drain = then_stop  # type: ignore[attr-defined]
    # The first request is taken alone; the two behind it are the drained batch.
    for key in ("a", "b", "c"):
        broker.lpush(
            queue,
            encode_redis_message(
                queue, {"sequence": "invoices", "key": key, "count": 1, "reference": None}, None
            ),
        )
    consumer = threading.Thread(target=drain.run)
    consumer.start()
    consumer.join(30)
    assert not consumer.is_alive()
    inflight = drain.transport.inflight  # type: ignore[attr-defined]
    assert broker.llen(inflight) == 0, "the drained batch was left in flight"
    assert broker.llen(queue) == 0
    assert drain.handled == 3
    check_gapless(engine, "invoices", keys=["a", "b", "c"])
    broker.close()
    replies.close()


def pipelined_consumer(
    db_url: str, redis_urls: tuple[str, str], level: str, batch_size: int
) -> tuple[Consumer, threading.Event, list[str], redis.Redis, redis.Redis, Any]:
    """A consumer of ``invoices`` in this process at ``level``, recording the order in
    which its batches are taken (``prepare``) and answered (``finish``)."""
    broker_url, reply_url = redis_urls
    broker, replies = redis.Redis.from_url(broker_url), redis.Redis.from_url(reply_url)
    engine = create_engine(db_url)
    allocator = Allocator(engine, isolation_level=level)
    allocator.create_sequence("invoices")
    order: list[str] = []

    class Recording(BatchProcessor):
        def prepare(self, items: Any, shards: Any = None) -> Any:
            order.append("take " + " ".join(item.request.key for item in items))
            return super().prepare(items, shards)

        def finish(self, turn: Any) -> None:
            order.append("answer " + " ".join(turn.keys))
            super().finish(turn)

    queue = sequence_queue("invoices")
    stop = threading.Event()
    drain = Consumer(
        RedisTransport(broker, {queue: consumer_lock(engine, queue)}, stop=stop),
        Recording(allocator, replies),
        batch_size=batch_size,
        stop=stop,
        in_flight=2,
    )
    return drain, stop, order, broker, replies, engine


def send_waiting(broker: redis.Redis, keys: list[str]) -> list[str]:
    """Queue a request for each key (answers on reply lists); the reply lists."""
    queue = sequence_queue("invoices")
    lists = [new_reply_list() for _ in keys]
    for key, reply_to in zip(keys, lists, strict=True):
        body = {"sequence": "invoices", "key": key, "count": 1, "reference": None}
        broker.lpush(queue, encode_redis_message(queue, body, reply_to))
    return lists


def answers(replies: redis.Redis, lists: list[str]) -> list[dict[str, Any]]:
    got = []
    for reply_to in lists:
        popped = replies.blpop([reply_to], 60)
        assert popped is not None, f"no answer on {reply_to}"
        got.append(json.loads(popped[1]))
    return got


def answered(
    drain: Consumer,
    stop: threading.Event,
    broker: redis.Redis,
    replies: redis.Redis,
    keys: list[str],
) -> list[dict[str, Any]]:
    """Queue a request for each key, run the consumer until all are answered, stop it;
    the answers, in the keys' order."""
    lists = send_waiting(broker, keys)
    consumer = threading.Thread(target=drain.run)
    consumer.start()
    try:
        return answers(replies, lists)
    finally:
        stop.set()
        consumer.join(30)
        assert not consumer.is_alive()


def answered_in_turn(order: list[str]) -> None:
    """Each batch answered after it was taken, in the order the batches were taken."""
    taken = [line.removeprefix("take ") for line in order if line.startswith("take ")]
    answered = [line.removeprefix("answer ") for line in order if line.startswith("answer ")]
    assert answered == taken


@pytest.mark.parametrize("level", ["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE"])
def test_two_batches_in_flight_answer_in_order(
    db_url: str, redis_urls: tuple[str, str], level: str
) -> None:
    """With requests waiting, the consumer takes the next batch while the last one
    commits: the numbers follow the order the requests came in, the answers the order
    the batches were taken, and no transaction had to be retried (where a locking read
    cannot wait behind a COMMIT and go on, the next batch starts after it). SQLite takes
    one writer at a time: one batch in flight there."""
    drain, stop, order, broker, replies, engine = pipelined_consumer(
        db_url, redis_urls, level, batch_size=5
    )
    keys = [f"k{i}" for i in range(100)]
    got = answered(drain, stop, broker, replies, keys)
    assert [answer["value"] for answer in got] == list(range(1, 101))
    answered_in_turn(order)
    assert drain.processor.allocator.stats.total == 0, drain.processor.allocator.stats.as_dict()
    if db_url.startswith("sqlite"):
        assert drain.overlapped == 0
    else:
        assert drain.overlapped >= 5, order
    assert broker.llen(inflight_list(sequence_queue("invoices"))) == 0
    check_gapless(engine, "invoices", keys=keys)


def test_a_batch_that_fails_does_not_let_the_next_answer_first(
    pg_url: str, redis_urls: tuple[str, str]
) -> None:
    """The first batch's transaction fails (the database "away") while the second one is
    in flight: the second commits first, with numbers from the committed counter, but
    is answered only after the first is retried, committed and answered."""
    drain, stop, order, broker, replies, engine = pipelined_consumer(
        pg_url, redis_urls, "READ COMMITTED", batch_size=3
    )
    processor = drain.processor
    real = processor.assign
    failed, second_done = threading.Event(), threading.Event()

    def assign(turn: Any, *args: Any) -> None:
        if "a0" in turn.keys:
            if not failed.is_set():
                failed.set()
                away = ConnectionError("the database is away (test)")
                raise RetriesExhaustedError(20, 30.0, away, outcome_unknown=False)
            assert second_done.wait(60)  # the retry comes after the second batch's commit
        real(turn, *args)
        if "b0" in turn.keys:
            second_done.set()

    processor.assign = assign  # type: ignore[method-assign]
    keys = [f"a{i}" for i in range(3)] + [f"b{i}" for i in range(3)]
    got = answered(drain, stop, broker, replies, keys)
    assert failed.is_set()
    answered_in_turn(order)
    assert order[:2] == ["take a0 a1 a2", "take b0 b1 b2"], order
    # The second batch committed first: it has the first numbers.
    assert [answer["value"] for answer in got] == [4, 5, 6, 1, 2, 3]
    check_gapless(engine, "invoices", keys=keys)
