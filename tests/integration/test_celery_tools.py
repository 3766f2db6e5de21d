"""What Celery's own tools see of a numbering worker: the queues it consumes
(``celery inspect active_queues``) and, with ``-E``, the task events Flower shows."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from integration.stack import Stack
from test_queue import setup_sequences

from numbering.routing import TASK_NAME, sequence_queue
from numbering.tasks.app import create_app
from numbering.tasks.events import task_events_switch

pytestmark = pytest.mark.integration


def test_inspect_lists_the_sequence_queues(stack: Stack) -> None:
    setup_sequences(stack, "invoices", "orders")
    stack.worker("--sequence", "invoices", "--sequence", "orders")
    app = create_app(stack.settings)
    try:
        deadline = time.monotonic() + 60
        replies: dict[str, Any] | None = None
        while time.monotonic() < deadline and not replies:
            replies = app.control.inspect(timeout=2).active_queues()
        assert replies, "the worker never answered the inspect command"
        [(hostname, queues)] = replies.items()
        assert hostname.startswith("numbering-")
        names = sorted(queue["name"] for queue in queues)
        assert names == ["numbering.control", "numbering.invoices", "numbering.orders"]
        invoices = next(queue for queue in queues if queue["name"] == "numbering.invoices")
        assert invoices["queue_arguments"] == {"x-single-active-consumer": True}
    finally:
        app.close()


def test_a_worker_started_with_events_sends_task_events(stack: Stack) -> None:
    setup_sequences(stack, "invoices")
    stack.worker("--sequence", "invoices", "-E")
    app = create_app(stack.settings)
    seen: list[dict[str, Any]] = []
    lock = threading.Lock()
    receiver_box: list[Any] = []

    def listen() -> None:
        def record(event: dict[str, Any]) -> None:
            with lock:
                seen.append(event)

        with app.connection_for_read() as connection:
            receiver = app.events.Receiver(connection, handlers={"*": record})
            receiver_box.append(receiver)
            receiver.capture(limit=None, timeout=None, wakeup=False)

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()

    def wait_for(condition: Any, what: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with lock:
                if condition(list(seen)):
                    return
            time.sleep(0.05)
        pytest.fail(f"timed out waiting for {what}; saw {[e['type'] for e in seen]}")

    try:
        # Events are broadcast: the listener hears the worker's heartbeat once subscribed.
        wait_for(lambda events: any(e["type"] == "worker-heartbeat" for e in events), "a heartbeat")
        client = stack.client()
        assert client.next_value("invoices", key="evt:1") == 1
        assert client.next_value("invoices", key="evt:2") == 2

        def task_events(events: list[dict[str, Any]]) -> dict[str, list[str]]:
            by_task: dict[str, list[str]] = {}
            for event in events:
                if event["type"].startswith("task-"):
                    by_task.setdefault(event["uuid"], []).append(event["type"])
            return by_task

        def both_done(events: list[dict[str, Any]]) -> bool:
            done = [t for t in task_events(events).values() if "task-succeeded" in t]
            return len(done) == 2

        wait_for(both_done, "two task-succeeded events")
        with lock:
            events = list(seen)
        received = [e for e in events if e["type"] == "task-received"]
        assert {e["name"] for e in received} == {"numbering.assign"}
        keys = sorted(ast.literal_eval(e["kwargs"])["key"] for e in received)
        assert keys == ["evt:1", "evt:2"]
        for kinds in task_events(events).values():
            assert kinds == ["task-received", "task-started", "task-succeeded"]
        succeeded = [e for e in events if e["type"] == "task-succeeded"]
        assert sorted(ast.literal_eval(e["result"])["value"] for e in succeeded) == [1, 2]
    finally:
        if receiver_box:
            receiver_box[0].should_stop = True
        listener.join(10)
        app.close()


def test_a_stock_celery_worker_of_the_app_numbers_and_logs_like_numbering_worker(
    stack: Stack,
) -> None:
    """``celery -A numbering.tasks.app worker`` consumes one message at a time (slower,
    equally correct) and gets numbering's worker output set-up: JSON log lines with
    NUMBERING_LOG_FORMAT=json, Celery's own lines included."""
    setup_sequences(stack, "invoices")
    env = {**stack.env, "NUMBERING_LOG_FORMAT": "json"}
    log = stack.tmp / "celery.log"
    with log.open("w") as out:
        worker = subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "numbering.tasks.app", "worker"),
                *("-Q", sequence_queue("invoices"), "-P", "solo", "-l", "INFO"),
                *("--without-mingle", "--without-gossip", "-n", "stock@%h"),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    app = create_app(stack.settings)
    try:
        results = [
            app.send_task(
                TASK_NAME,
                kwargs={"sequence": "invoices", "key": f"stock:{i}"},
                queue=sequence_queue("invoices"),
            )
            for i in range(3)
        ]
        values = [result.get(timeout=60)["value"] for result in results]
        assert values == [1, 2, 3]
        again = app.send_task(
            TASK_NAME,
            kwargs={"sequence": "invoices", "key": "stock:1"},
            queue=sequence_queue("invoices"),
        )
        assert again.get(timeout=60)["value"] == 2  # a resent key gets its number back
    finally:
        app.close()
        worker.terminate()
        worker.wait(60)
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]
    ready = [r for r in records if r["message"].endswith(" ready.")]
    assert ready, log.read_text()
    assert ready[0]["logger"] == "celery.apps.worker"
    keys = [f"stock:{i}" for i in range(3)]
    stack.check("invoices", keys, unrecorded=keys)  # sent here, not by client processes


def test_task_events_follow_the_worker_switch() -> None:
    def worker(enabled: bool, groups: set[str] | None) -> Any:
        dispatcher = SimpleNamespace(enabled=enabled, groups=groups or set())
        return SimpleNamespace(consumer=SimpleNamespace(event_dispatcher=dispatcher))

    assert task_events_switch(worker(True, None))()  # -E: every group
    assert not task_events_switch(worker(True, {"worker"}))()  # heartbeats only
    assert task_events_switch(worker(True, {"worker", "task"}))()  # enable_events by remote
    assert not task_events_switch(worker(False, None))()
    assert not task_events_switch(SimpleNamespace(consumer=None))()
