"""A real numbering stack for tests: worker processes, Redis, PostgreSQL, client processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from history import OK, Op, check_history, load
from ledger_check import check_gapless

from numbering import Allocator, Client, Settings, create_engine
from numbering.config import ENV
from numbering.routing import Shard, sequence_queue

# A client process: take N numbers one at a time, recording each attempt (history.py);
# resend the keys whose outcome was unknown; print the history as JSON.
CLIENT_SCRIPT = """
import json, sys
sequence, prefix, count, timeout, tests = sys.argv[1:6]
sys.path.insert(0, tests)
from history import run_keys
from numbering import Client
client = Client.from_env()
history = run_keys(
    sequence,
    prefix,
    [f"{prefix}:{i}" for i in range(int(count))],
    lambda key: client.next_value(sequence, key=key, timeout=float(timeout)),
)
print(json.dumps([op.to_json() for op in history]))
"""
TESTS = Path(__file__).resolve().parents[1]


class ClientRun:
    """Client processes running in the background (see :meth:`Stack.start_clients`)."""

    def __init__(self, stack: Stack, jobs: list[tuple[str, str, int]]) -> None:
        self.results: list[list[int]] = []
        self.thread = threading.Thread(
            target=lambda: self.results.extend(stack.client_processes(jobs))
        )
        self.thread.start()

    def wait(self, timeout: float = 240) -> list[list[int]]:
        """Each process's numbers, once all have finished (asserts they did, in time)."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "clients did not finish after the fault healed"
        return self.results


class Worker:
    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.handle = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "numbering", "worker", *args],
            env=env,
            stdout=self.handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited early:\n{self.output()}")
            time.sleep(0.05)
        raise AssertionError(f"worker never said {text!r}:\n{self.output()}")

    def kill(self) -> None:
        """SIGKILL the whole process group: no clean-up of any kind."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.kill()
            raise


class Stack:
    def __init__(self, database_url: str, broker_url: str, reply_url: str, tmp: Path) -> None:
        self.tmp = tmp
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBERING_")}
        self.env.update(
            {
                ENV["database_url"]: database_url,
                ENV["broker_url"]: broker_url,
                ENV["result_backend"]: reply_url,
                ENV["request_timeout"]: "60",
            }
        )
        #: Seconds a client process waits for one answer before it records an unknown
        #: outcome (and later resends the key).
        self.op_timeout: float = 60
        #: Every operation the client processes recorded (see history.py).
        self.history: list[Op] = []
        self._history_lock = threading.Lock()
        self.workers: list[Worker] = []
        self.client_procs: list[subprocess.Popen[str]] = []
        self.clients: list[Client] = []
        #: Queues this stack's workers consumed (deleted afterwards on RabbitMQ).
        self.queues: set[str] = set()

    @property
    def settings(self) -> Settings:
        return Settings.from_env({k: v for k, v in self.env.items() if k.startswith("NUMBERING_")})

    def worker(self, *args: str, active: bool = True) -> Worker:
        """Start ``numbering worker ARGS``; wait until it is the active consumer (or a
        standby). On RabbitMQ, the broker picks the active consumer: wait until it consumes.
        A fleet member (``--shards K``): wait until it has joined the fleet."""
        worker = Worker(list(args), self.env, self.tmp / f"worker{len(self.workers)}.log")
        self.workers.append(worker)
        if args[0] == "--shards":
            self.queues.update(Shard(i, int(args[1])).queue for i in range(int(args[1])))
            worker.wait_for("fleet of")
            return worker
        if args[0] == "--shard":
            self.queues.add(Shard.parse(args[1]).queue)
        else:
            self.queues.update(sequence_queue(name) for name in args[1::2])
        if self.env[ENV["broker_url"]].startswith("amqp"):
            worker.wait_for("single-active-consumer decides")
        else:
            worker.wait_for("active consumer" if active else "standby")
        return worker

    def numbering(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``numbering ARGS`` with this stack's settings; its output and status."""
        return subprocess.run(
            [sys.executable, "-m", "numbering", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def client(self, **kwargs: Any) -> Client:
        settings = self.settings
        client = Client(
            settings.broker_url,
            settings.result_backend,
            shards=settings.shards,
            timeout=kwargs.pop("timeout", 30),
            sentinel_master=settings.sentinel_master,
            queue_type=settings.queue_type,
            **kwargs,
        )
        self.clients.append(client)
        return client

    def client_processes(self, jobs: list[tuple[str, str, int]]) -> list[list[int]]:
        """Run one client process per (sequence, key prefix, count), all at once; return
        each one's numbers in key order. Every attempt is added to :attr:`history`."""
        timeout = str(self.op_timeout)
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", CLIENT_SCRIPT, sequence, prefix, str(count), timeout, TESTS],
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for sequence, prefix, count in jobs
        ]
        self.client_procs.extend(procs)
        results = []
        for proc, (_, prefix, count) in zip(procs, jobs, strict=True):
            try:
                out, err = proc.communicate(timeout=600)
            except subprocess.TimeoutExpired:
                proc.kill()  # the others are killed by close()
                raise
            assert proc.returncode == 0, err
            ops = load(json.loads(out))
            with self._history_lock:
                self.history.extend(ops)
            answers = {op.key: op.value for op in ops if op.type == OK}
            unanswered = [f"{prefix}:{i}" for i in range(count) if f"{prefix}:{i}" not in answers]
            assert not unanswered, f"keys never answered after the fault healed: {unanswered[:5]}"
            results.append([answers[f"{prefix}:{i}"] for i in range(count)])
        return results

    def check(
        self, sequence: str, keys: Iterable[str], *, unrecorded: Iterable[str] = ()
    ) -> dict[str, list[int]]:
        """The gapless check of ``sequence`` (its ledger holds exactly ``keys``) and the
        check of every recorded client operation on it against the ledger. ``unrecorded``:
        keys among ``keys`` sent by other means than the client processes."""
        engine = create_engine(self.settings.database_url)
        try:
            by_key = check_gapless(engine, sequence, keys=keys)
        finally:
            engine.dispose()
        skip = set(unrecorded)
        summary = check_history(
            self.history,
            sequence,
            {key: values[0] for key, values in by_key.items() if key not in skip},
        )
        assert not summary.unresolved
        return by_key

    def wait_for_numbers(self, sequence: str, at_least: int, timeout: float = 60) -> None:
        """Wait until ``sequence`` has handed out ``at_least`` numbers (or ``timeout``
        passes: a fault test then injects its fault earlier, which it survives too)."""
        allocator = Allocator(self.settings.database_url)
        try:
            deadline = time.monotonic() + timeout
            while (allocator.last_value(sequence) or 0) < at_least:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.01)
        finally:
            allocator.close()

    def start_clients(self, jobs: list[tuple[str, str, int]]) -> ClientRun:
        """:meth:`client_processes` in the background, while a test injects faults."""
        return ClientRun(self, jobs)

    def close(self) -> None:
        for proc in self.client_procs:
            if proc.poll() is None:
                proc.kill()
        for client in self.clients:
            client.close()
        for worker in self.workers:
            worker.kill()
            worker.handle.close()
