"""The consumer loop over the in-memory transport: no broker, an SQLite file.

The loop is the same one the Redis and RabbitMQ transports run under (the integration
and fault tests run it there); here its own rules are pinned down: one transaction a
batch, a bad message failing alone, what a failed turn left behind tried alone,
quarantine after MAX_DELIVERIES, a batch in hand finished when stop comes.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from ledger_check import check_gapless

from numbering import Allocator, Request
from numbering.errors import InvalidRequestError, RetriesExhaustedError
from numbering.messages import BadMessage, Job, decode_redis_message, parse_task
from numbering.migrations import upgrade
from numbering.replies import new_reply_list
from numbering.routing import Shard, sequence_queue
from numbering.tasks import consumer as consumer_module
from numbering.tasks.consumer import BatchProcessor, Consumer, Turn
from numbering.tasks.memory import MemoryBroker, MemoryReplies, MemoryTransport
from numbering.tasks.redelivery import MAX_DELIVERIES

QUEUE = sequence_queue("invoices")


class Processor(BatchProcessor):
    """The real processor, with a hook that runs before each batch (to fail on cue)."""

    def __init__(self, allocator: Allocator, replies: MemoryReplies) -> None:
        super().__init__(allocator, replies)
        self.batches: list[list[str | None]] = []
        self.before: Callable[[list[str | None]], None] = lambda keys: None

    def prepare(self, items: Sequence[Job | BadMessage], shards: Any = None) -> Turn:
        keys = [item.request.key if isinstance(item, Job) else item.key for item in items]
        self.batches.append(keys)
        return super().prepare(items, shards)

    def assign(self, turn: Turn, *args: Any) -> None:
        # What is about to be assigned (as the worker's failpoints see a batch).
        self.before(list(turn.keys))
        super().assign(turn, *args)


class Harness:
    def __init__(self, tmp_path: Path, shards: dict[str, Shard] | None = None) -> None:
        self.allocator = Allocator(f"sqlite:///{tmp_path / 'loop.db'}")
        upgrade(self.allocator.engine)
        self.allocator.create_sequence("invoices")
        self.broker = MemoryBroker()
        self.replies = MemoryReplies()
        self.processor = Processor(self.allocator, self.replies)
        self.stop = threading.Event()
        queues = [QUEUE, *(shards or {})]
        self.transport = MemoryTransport(self.broker, queues, poll_seconds=0.02)
        self.consumer = Consumer(
            self.transport, self.processor, batch_size=100, stop=self.stop, shards=shards
        )
        self.thread = threading.Thread(target=self.consumer.run, daemon=True)

    def send(self, key: str, sequence: str = "invoices", queue: str = QUEUE) -> str:
        reply_to = new_reply_list()
        self.broker.publish(queue, Job(uuid.uuid4().hex, sequence, Request(key), reply_to))
        return reply_to

    def answer(self, reply_to: str) -> dict[str, Any]:
        reply = self.replies.wait(reply_to, 30)
        assert reply is not None, f"no answer on {reply_to}"
        return reply

    def start(self) -> None:
        self.thread.start()

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()
        self.allocator.close()


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    monkeypatch.setattr(consumer_module, "OUTAGE_BACKOFF_SECONDS", 0.01)
    made = Harness(tmp_path)
    yield made
    if made.thread.is_alive():
        made.finish()


def dead_letter_key(kept: bytes | str) -> str:
    """The key of a dead letter (kept as a kombu Redis envelope, as on every broker)."""
    item = parse_task(*decode_redis_message(kept))
    assert isinstance(item, Job)
    return item.request.key


def _wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "condition not met in 30 s"
        time.sleep(0.01)


def test_what_waits_is_one_batch_in_one_transaction(harness: Harness) -> None:
    replies = [harness.send(f"k{i}") for i in range(20)]
    harness.start()
    values = [harness.answer(reply)["value"] for reply in replies]
    assert values == list(range(1, 21))
    assert harness.processor.batches == [[f"k{i}" for i in range(20)]]
    assert harness.processor.transactions == 1
    _wait_for(lambda: harness.transport.unacknowledged == 0)
    assert harness.consumer.handled == 20
    harness.finish()
    check_gapless(harness.allocator.engine, "invoices", keys=[f"k{i}" for i in range(20)])


def test_a_bad_message_fails_alone(harness: Harness) -> None:
    good = harness.send("a")
    harness.broker.publish(QUEUE, BadMessage("t1", "bad", "reply:bad", InvalidRequestError("no")))
    unknown = harness.send("b", sequence="nowhere")
    other = harness.send("c")
    harness.start()
    assert harness.answer(good)["value"] == 1
    assert harness.answer("reply:bad")["error"]["type"] == "InvalidRequestError"
    assert harness.answer(unknown)["error"]["type"] == "SequenceNotFoundError"
    assert harness.answer(other)["value"] == 2
    harness.finish()
    check_gapless(harness.allocator.engine, "invoices", keys=["a", "c"])


def test_a_failed_turn_is_tried_again_one_request_at_a_time(harness: Harness) -> None:
    """A bug (or a crash) in the middle of a batch: the batch was not acknowledged, so
    it comes back redelivered, each request alone; nothing is numbered twice."""
    failed: list[bool] = []

    def fail_once(keys: list[str | None]) -> None:
        if not failed:
            failed.append(True)
            raise RuntimeError("a bug in the middle of a batch")

    harness.processor.before = fail_once
    replies = [harness.send(key) for key in ("a", "b", "c")]
    harness.start()
    assert [harness.answer(reply)["value"] for reply in replies] == [1, 2, 3]
    assert harness.processor.batches == [["a", "b", "c"], ["a"], ["b"], ["c"]]
    assert dict(harness.transport.attempts.counts) == {}, "answered: counts forgotten"
    harness.finish()
    check_gapless(harness.allocator.engine, "invoices", keys=["a", "b", "c"])


def test_a_request_that_keeps_stopping_the_worker_is_quarantined(harness: Harness) -> None:
    def poison(keys: list[str | None]) -> None:
        if "poison" in keys:
            raise RuntimeError("this request kills the worker")

    harness.processor.before = poison
    first, bad, last = (harness.send(key) for key in ("a", "poison", "z"))
    harness.start()
    assert harness.answer(first)["value"] == 1
    error = harness.answer(bad)["error"]
    assert error["type"] == "QuarantinedError"
    assert f"stopped the worker {MAX_DELIVERIES} times" in error["message"]
    assert harness.answer(last)["value"] == 2
    [kept] = harness.transport.attempts.dead[QUEUE]
    assert dead_letter_key(kept) == "poison"
    harness.finish()
    check_gapless(harness.allocator.engine, "invoices", keys=["a", "z"])


def test_a_batch_in_hand_is_finished_when_stop_comes(harness: Harness) -> None:
    harness.processor.before = lambda keys: harness.stop.set()
    replies = [harness.send(key) for key in ("a", "b")]
    harness.start()
    harness.thread.join(30)
    assert not harness.thread.is_alive()
    assert [harness.answer(reply)["value"] for reply in replies] == [1, 2]
    assert harness.transport.unacknowledged == 0
    assert harness.broker.waiting(QUEUE) == 0
    harness.allocator.close()


def test_stopped_during_an_outage_the_batch_is_given_back(harness: Harness) -> None:
    """The database is away and the worker is told to stop: the batch is neither lost
    nor answered; it goes back to the queue for the next consumer."""

    def outage(keys: list[str | None]) -> None:
        harness.stop.set()
        raise RetriesExhaustedError("database unavailable", attempts=3)

    harness.processor.before = outage
    harness.send("a")
    harness.start()
    harness.thread.join(30)
    assert not harness.thread.is_alive()
    assert harness.broker.waiting(QUEUE) == 1
    assert harness.allocator.last_value("invoices") is None
    harness.allocator.close()


def test_a_request_on_the_wrong_shard_queue_fails_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shards = {shard.queue: shard for shard in (Shard(0, 2), Shard(1, 2))}
    harness = Harness(tmp_path, shards)
    harness.allocator.create_sequence("orders")
    owner = next(queue for queue, shard in shards.items() if shard.serves("orders"))
    stranger = next(queue for queue in shards if queue != owner)
    right = harness.send("r", sequence="orders", queue=owner)
    wrong = harness.send("w", sequence="orders", queue=stranger)
    harness.start()
    assert harness.answer(right)["value"] == 1
    assert "does not belong to" in harness.answer(wrong)["error"]["message"]
    harness.finish()
    check_gapless(harness.allocator.engine, "orders", keys=["r"])
