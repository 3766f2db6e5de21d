"""The queue layer on the local RabbitMQ: same guarantees, single-active-consumer queues."""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest
from celery import Celery
from integration.stack import Stack
from ledger_check import check_gapless
from test_queue import assert_increasing, read_replies, serve_wide_names, setup_sequences

from numbering import Allocator, Client, create_engine
from numbering.routing import REPLY_HEADER, TASK_NAME, Shard, kombu_queue, sequence_queue


def unique(name: str) -> str:
    # RabbitMQ queues outlive a test; a fresh sequence name gives each test its own queue.
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=["classic", "quorum"])
def any_amqp_stack(request: pytest.FixtureRequest) -> Stack:
    """``amqp_stack`` and ``quorum_stack`` in turn."""
    fixture = "amqp_stack" if request.param == "classic" else "quorum_stack"
    stack: Stack = request.getfixturevalue(fixture)
    return stack


def test_four_client_processes_on_one_sequence(any_amqp_stack: Stack) -> None:
    amqp_stack = any_amqp_stack
    seq = unique("invoices")
    setup_sequences(amqp_stack, seq)
    amqp_stack.worker("--sequence", seq)
    results = amqp_stack.client_processes([(seq, f"c{c}", 250) for c in range(4)])
    assert sorted(v for values in results for v in values) == list(range(1, 1001))
    assert_increasing(results)
    keys = [f"c{c}:{i}" for c in range(4) for i in range(250)]
    amqp_stack.check(seq, keys)


def test_sequences_named_with_any_text(amqp_stack: Stack) -> None:
    serve_wide_names(amqp_stack, suffix=unique(" "))


def test_standby_consumer_takes_over_when_the_active_one_is_killed(
    any_amqp_stack: Stack,
) -> None:
    amqp_stack = any_amqp_stack
    seq = unique("invoices")
    setup_sequences(amqp_stack, seq)
    first = amqp_stack.worker("--sequence", seq)
    second = amqp_stack.worker("--sequence", seq)
    client = amqp_stack.client()
    assert [client.next_value(seq, key=f"before:{i}") for i in range(20)] == list(range(1, 21))
    [active, standby] = [w for w in (first, second) if "active consumer of" in w.output()] + [
        w for w in (first, second) if "active consumer of" not in w.output()
    ]
    assert f"active consumer of numbering.{seq}" in active.output()
    active.kill()
    assert [client.next_value(seq, key=f"after:{i}") for i in range(20)] == list(range(21, 41))
    standby.wait_for(f"active consumer of numbering.{seq}")  # the takeover is logged
    standby.terminate()
    check_gapless(create_engine(amqp_stack.settings.database_url), seq)


def test_killed_worker_under_load_loses_nothing(any_amqp_stack: Stack) -> None:
    """Unacknowledged messages of a SIGKILLed worker are delivered again; keys make the
    redelivery harmless."""
    amqp_stack = any_amqp_stack
    seq = unique("invoices")
    setup_sequences(amqp_stack, seq)
    worker = amqp_stack.worker("--sequence", seq)
    clients = amqp_stack.start_clients([(seq, f"c{c}", 150) for c in range(3)])
    amqp_stack.wait_for_numbers(seq, 100)
    worker.kill()
    amqp_stack.worker("--sequence", seq)
    results = clients.wait()
    assert len(results) == 3
    assert_increasing(results)
    amqp_stack.check(seq, [f"c{c}:{i}" for c in range(3) for i in range(150)])


def test_client_survives_fork_on_rabbitmq(amqp_stack: Stack) -> None:
    """Stock Celery clients forked after connecting to RabbitMQ stalled for 20 s per
    request; a forked numbering client opens its own connections."""
    seq = unique("invoices")
    setup_sequences(amqp_stack, seq)
    amqp_stack.worker("--sequence", seq)
    client = amqp_stack.client()
    assert client.next_value(seq, key="parent:0") == 1
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            started = time.monotonic()
            values = [client.next_value(seq, key=f"child:{i}") for i in range(10)]
            os.write(write, json.dumps([values, time.monotonic() - started]).encode())
        finally:
            os._exit(0)
    os.close(write)
    parent = [client.next_value(seq, key=f"parent:{i}") for i in range(1, 11)]
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        child, elapsed = json.loads(pipe.read())
    assert elapsed < 10, f"the forked child took {elapsed:.1f}s for 10 numbers"
    assert sorted([1, *parent, *child]) == list(range(1, 22))
    check_gapless(create_engine(amqp_stack.settings.database_url), seq)


def broker_port(client: Client) -> int:
    """The local port of the RabbitMQ connection ``client`` publishes on in this process."""
    connection = client._process_state().app.pool.acquire(block=True)
    try:
        return int(connection.connection.sock.getsockname()[1])
    finally:
        connection.release()


def test_forked_client_opens_its_own_rabbitmq_connection(amqp_stack: Stack) -> None:
    """kombu's process-wide pool survives os.fork(): without numbering clearing it in the
    child, the child published on its parent's socket (seen in CI as a parent stuck in
    recv() for 300 s; the test above passes only when the race goes well)."""
    seq = unique("invoices")
    setup_sequences(amqp_stack, seq)
    amqp_stack.worker("--sequence", seq)
    client = amqp_stack.client()
    assert client.next_value(seq, key="parent") == 1
    parent_port = broker_port(client)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            value = client.next_value(seq, key="child")
            os.write(write, json.dumps([value, broker_port(client)]).encode())
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        value, child_port = json.loads(pipe.read())
    assert value == 2
    assert child_port != parent_port
    assert broker_port(client) == parent_port  # the parent's connection is untouched
    assert client.next_value(seq, key="parent again") == 3
    check_gapless(create_engine(amqp_stack.settings.database_url), seq)


def test_one_worker_serves_several_queues_and_another_stands_by(amqp_stack: Stack) -> None:
    """One consumer for a worker's queues on RabbitMQ: the broker makes it active on the
    queues nobody else consumes and a standby on the others, queue by queue."""
    a, b, c = (unique(name) for name in ("a", "b", "c"))
    setup_sequences(amqp_stack, a, b, c)
    first = amqp_stack.worker("--sequence", a, "--sequence", b)
    second = amqp_stack.worker("--sequence", b, "--sequence", c)
    client = amqp_stack.client()
    assert [client.next_value(name, key=f"{name}:1") for name in (a, b, c)] == [1, 1, 1]
    first.kill()
    assert [client.next_value(name, key=f"{name}:2") for name in (b, c)] == [2, 2]
    second.terminate()
    engine = create_engine(amqp_stack.settings.database_url)
    check_gapless(engine, a, keys=[f"{a}:1"])
    for name in (b, c):
        check_gapless(engine, name, keys=[f"{name}:1", f"{name}:2"])


def test_shard_queues_on_one_consumer(amqp_stack: Stack) -> None:
    """Several shard queues served by one consumer: client processes on sequences of
    every shard, each sequence gapless, and a request on the wrong shard fails alone."""
    count = 1000 + uuid.uuid4().int % 3000  # fresh queues: RabbitMQ keeps them across runs
    names = [unique(f"tenant{t}") for t in range(4)]
    setup_sequences(amqp_stack, *names)
    shards = sorted({Shard.of(name, count).index for name in names})
    amqp_stack.env["NUMBERING_SHARDS"] = str(count)
    amqp_stack.worker(*[arg for index in shards for arg in ("--shard", f"{index}/{count}")])
    results = amqp_stack.client_processes([(name, f"{name}-c", 40) for name in names])
    for name, values in zip(names, results, strict=True):
        assert values == list(range(1, 41))
        amqp_stack.check(name, [f"{name}-c:{i}" for i in range(40)])
    stray = next(n for n in names if Shard.of(n, count).index != shards[0])
    # Sent straight to the first shard's queue, which does not carry it: it fails alone.
    app = Celery(broker=amqp_stack.settings.broker_url, set_as_current=False)
    app.send_task(
        TASK_NAME,
        kwargs={"sequence": stray, "key": "stray"},
        queue=kombu_queue(Shard(shards[0], count).queue),
        headers={REPLY_HEADER: "numbering.reply.stray-amqp"},
    )
    [reply] = read_replies(
        amqp_stack.settings.result_backend, "numbering.reply.stray-amqp", 1
    ).values()
    assert f"does not belong to {Shard(shards[0], count).queue}" in str(reply["error"])
    assert Allocator(amqp_stack.settings.database_url).last_value(stray) == 40


def test_a_queue_of_the_other_type_is_explained(quorum_stack: Stack, amqp_stack: Stack) -> None:
    """A queue's type cannot change in place (RabbitMQ answers 406 "inequivalent arg"):
    a worker refuses to start and a client refuses to send, each saying what differs
    and what to do, instead of a raw channel error or a wait."""
    seq = unique("invoices")
    setup_sequences(amqp_stack, seq)
    amqp_stack.worker("--sequence", seq)  # declares a classic queue
    assert amqp_stack.client().next_value(seq, key="classic") == 1
    refused = quorum_stack.numbering("worker", "--sequence", seq)
    assert refused.returncode == 1, refused.stderr
    for said in (
        f"RabbitMQ queue {sequence_queue(seq)} exists with other arguments than "
        "NUMBERING_QUEUE_TYPE=quorum declares",
        "but current is none",  # what RabbitMQ found different
        "migrate the queue",
    ):
        assert said in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    # A client process of its own (this one has declared the queue already).
    sent = quorum_stack.numbering("next", seq, "--key", "quorum", "--timeout", "10")
    assert sent.returncode == 1, sent.stderr
    assert "cannot change in place" in sent.stderr, sent.stderr
    assert "Traceback" not in sent.stderr
    check_gapless(create_engine(amqp_stack.settings.database_url), seq, keys=["classic"])


def test_a_celery_caller_on_the_rpc_backend_gets_its_answer(amqp_stack: Stack) -> None:
    """A plain Celery app whose result backend is rpc:// (answers on its own reply queue,
    as from any Celery worker): its numbers, a resend by key, and a refused request
    raised as numbering's error, all on its reply queue."""
    from numbering.errors import InvalidCountError

    seq = unique("invoices")
    setup_sequences(amqp_stack, seq)
    worker = amqp_stack.worker("--sequence", seq)
    app = Celery(broker=amqp_stack.settings.broker_url, backend="rpc://", set_as_current=False)
    queue = kombu_queue(sequence_queue(seq))

    def ask(**kwargs: object) -> dict[str, object]:
        result = app.send_task(TASK_NAME, kwargs={"sequence": seq, **kwargs}, queue=queue)
        answer: dict[str, object] = result.get(timeout=60)
        return answer

    assert [ask(key=f"rpc:{i}")["value"] for i in range(5)] == [1, 2, 3, 4, 5]
    again = ask(key="rpc:0")
    assert (again["value"], again["resent"]) == (1, True)
    with pytest.raises(InvalidCountError, match="count must be at least 1"):
        ask(key="rpc:bad", count=0)
    check_gapless(
        create_engine(amqp_stack.settings.database_url),
        seq,
        keys=[f"rpc:{i}" for i in range(5)],
    )
    told = [line for line in worker.output().splitlines() if "plain Celery caller" in line]
    assert len(told) == 1, told
    assert f"answered on its reply queue {app.thread_oid} (rpc://)" in told[0], told


def test_a_celery_caller_on_numbering_s_backend_is_told_where_its_answers_are(
    amqp_stack: Stack,
) -> None:
    """A plain Celery app reading numbering's result backend gets its answer there; it
    has no reply queue, so the worker publishes no copy, and says once where the answers
    go (the line a caller reading another backend would find)."""
    seq = unique("invoices")
    setup_sequences(amqp_stack, seq)
    worker = amqp_stack.worker("--sequence", seq)
    backend = amqp_stack.settings.result_backend
    app = Celery(broker=amqp_stack.settings.broker_url, backend=backend, set_as_current=False)
    queue = kombu_queue(sequence_queue(seq))
    for i in range(3):
        result = app.send_task(TASK_NAME, kwargs={"sequence": seq, "key": f"b:{i}"}, queue=queue)
        assert result.get(timeout=60)["value"] == i + 1
    told = [line for line in worker.output().splitlines() if "plain Celery caller" in line]
    assert len(told) == 1, told
    assert "answered only in numbering's result backend" in told[0], told
    assert "could not answer" not in worker.output()
    check_gapless(
        create_engine(amqp_stack.settings.database_url), seq, keys=[f"b:{i}" for i in range(3)]
    )
