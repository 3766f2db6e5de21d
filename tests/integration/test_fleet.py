"""A worker fleet (``numbering worker --shards K``) on Redis and RabbitMQ: the shard queues
spread over the live workers, a killed worker's taken over, a new worker given its
share, and never two active consumers of one queue (the database's locks decide)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis
from integration.stack import Stack, Worker
from kombu import Connection
from test_queue import assert_increasing, setup_sequences

from numbering import create_engine
from numbering.routing import Shard, kombu_queue
from numbering.tasks.fleet import HOLDERS, Fleet, owner_of
from numbering.tasks.guard import consumer_alive

SHARDS = 16


def member_of(worker: Worker) -> str:
    """The fleet member name ``worker`` logged when it joined."""
    for line in worker.output().splitlines():
        if "fleet of" in line and "this one (" in line:
            return line.split("this one (", 1)[1].split(")", 1)[0]
    raise AssertionError(f"the worker never joined the fleet:\n{worker.output()}")


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.2)


def test_owners_spread_and_move_little() -> None:
    """Rendezvous hashing: every member owns some of the queues, and a member joining
    takes queues only from the others (none moves between the members that stay)."""
    queues = [Shard(i, SHARDS).queue for i in range(SHARDS)]
    three = ["a:1:x", "b:2:y", "c:3:z"]
    owners = {queue: owner_of(queue, three) for queue in queues}
    assert set(owners.values()) == set(three)
    four = [*three, "d:4:w"]
    for queue in queues:
        moved_to = owner_of(queue, four)
        assert moved_to in (owners[queue], "d:4:w")


@pytest.mark.parametrize("broker", ["redis", "rabbitmq-quorum"])
def test_three_workers_share_the_shards_and_take_over(
    request: pytest.FixtureRequest, broker: str
) -> None:
    """Three workers on 16 shard queues under load: each holds some; one is SIGKILLed
    and one started: within a bounded time every queue is held, by live workers only,
    the new one included; every request ends with one number (the history check and
    the gapless check of each sequence). On RabbitMQ too: there a member consumes a
    queue only once it holds its lock, and cancels it before it lets the lock go."""
    stack: Stack = request.getfixturevalue("stack" if broker == "redis" else "quorum_stack")
    stack.env["NUMBERING_SHARDS"] = str(SHARDS)
    queues = [Shard(i, SHARDS).queue for i in range(SHARDS)]
    if broker != "redis":  # RabbitMQ keeps queues across runs: start from none
        with Connection(stack.settings.broker_url) as conn:
            for queue in queues:
                kombu_queue(queue)(conn.channel()).delete()
    names = [f"tenant-{t}" for t in range(8)]
    setup_sequences(stack, *names)
    workers = [stack.worker("--shards", str(SHARDS)) for _ in range(3)]
    kept = stack.settings.broker_url if broker == "redis" else stack.settings.result_backend
    broker_redis = redis.Redis.from_url(kept, decode_responses=True)
    engine = create_engine(stack.settings.database_url)

    def spread_over(live: list[Worker]) -> bool:
        """Every queue held, each by a live worker, and every live worker holds some."""
        members = {member_of(worker) for worker in live}
        holders = broker_redis.hgetall(HOLDERS)
        return (
            all(consumer_alive(engine, queue) for queue in queues)
            and all(holders.get(queue) in members for queue in queues)
            and members == {holders[queue] for queue in queues}
        )

    try:
        wait_until(lambda: spread_over(workers), "the shards spread over three workers")
        before = broker_redis.hgetall(HOLDERS)
        run = stack.start_clients([(name, f"{name}-c", 60) for name in names])
        stack.wait_for_numbers(names[0], 10)
        workers[0].kill()
        workers.append(stack.worker("--shards", str(SHARDS)))
        live = workers[1:]
        wait_until(lambda: spread_over(live), "the shards spread over the workers left")
        results = run.wait(300)
        assert_increasing(results)
        for name, values in zip(names, results, strict=True):
            assert values == list(range(1, 61)), name
            stack.check(name, [f"{name}-c:{i}" for i in range(60)])
        assert all(worker.proc.poll() is None for worker in live)
        # Each queue the worker that joined took from a live worker was handed over by
        # that worker between two batches. Which queues those are depends on the member
        # names (pid and a random token): about one run in twenty it takes only the
        # killed worker's, and then there is nothing to hand over.
        after = broker_redis.hgetall(HOLDERS)
        newcomer = member_of(live[-1])
        stayed = {member_of(worker): worker for worker in live[:-1]}
        for queue in queues:
            if after[queue] == newcomer and before[queue] in stayed:
                assert f"{queue}: handed over" in stayed[before[queue]].output(), queue
    finally:
        broker_redis.close()
        engine.dispose()


def test_a_stopped_member_leaves_at_once(stack: Stack) -> None:
    """A worker stopped cleanly (SIGTERM) leaves the fleet as it goes: the other takes
    its queues without waiting for the member to expire."""
    stack.env["NUMBERING_SHARDS"] = "4"
    first = stack.worker("--shards", "4")
    second = stack.worker("--shards", "4")
    broker = redis.Redis.from_url(stack.settings.broker_url, decode_responses=True)
    fleet = Fleet(broker, 4, member="observer")
    try:
        wait_until(lambda: len(broker.zrange(fleet.key, 0, -1)) == 2, "two members")
        leaving = member_of(second)
        assert second.terminate() == 0
        # Gone as it stopped, not MEMBER_TTL seconds later.
        assert broker.zscore(fleet.key, leaving) is None
        engine = create_engine(stack.settings.database_url)
        queues = [Shard(i, 4).queue for i in range(4)]
        wait_until(
            lambda: (
                all(consumer_alive(engine, q) for q in queues)
                and set(broker.hmget(HOLDERS, queues)) == {member_of(first)}
            ),
            "the first worker holds every queue",
            timeout=30,
        )
        engine.dispose()
    finally:
        broker.close()


@pytest.mark.parametrize("flag", [["--shard", "0/4"], ["--sequence", "x"]])
def test_a_fleet_member_serves_every_shard_and_nothing_else(stack: Stack, flag: list[str]) -> None:
    done = stack.numbering("worker", "--shards", "4", *flag)
    assert done.returncode == 1
    assert "--shards K serves every shard queue" in done.stderr
    stack.env["NUMBERING_SHARDS"] = "8"
    done = stack.numbering("worker", "--shards", "4")
    assert done.returncode == 1
    assert "--shards 4 disagrees with NUMBERING_SHARDS=8" in done.stderr
