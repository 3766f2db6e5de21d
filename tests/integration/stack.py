"""A real numbering stack for tests: worker processes, Redis, PostgreSQL, client processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from numbering import Client, Settings
from numbering.config import ENV
from numbering.routing import Shard, sequence_queue

# A client process: take N numbers one at a time, print them as JSON.
CLIENT_SCRIPT = """
import json, sys
from numbering import Client
sequence, prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = Client.from_env()
print(json.dumps([client.next_value(sequence, key=f"{prefix}:{i}") for i in range(count)]))
"""


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
        self.workers: list[Worker] = []
        self.clients: list[Client] = []
        #: Queues this stack's workers consumed (deleted afterwards on RabbitMQ).
        self.queues: set[str] = set()

    @property
    def settings(self) -> Settings:
        return Settings.from_env({k: v for k, v in self.env.items() if k.startswith("NUMBERING_")})

    def worker(self, *args: str, active: bool = True) -> Worker:
        """Start ``numbering worker ARGS``; wait until it is the active consumer (or a
        standby). On RabbitMQ, the broker picks the active consumer: wait until it consumes."""
        worker = Worker(list(args), self.env, self.tmp / f"worker{len(self.workers)}.log")
        self.workers.append(worker)
        if args[0] == "--shard":
            self.queues.add(Shard.parse(args[1]).queue)
        else:
            self.queues.update(sequence_queue(name) for name in args[1::2])
        if self.env[ENV["broker_url"]].startswith("amqp"):
            worker.wait_for("single-active-consumer decides")
        else:
            worker.wait_for("active consumer" if active else "standby")
        return worker

    def client(self, **kwargs: Any) -> Client:
        settings = self.settings
        client = Client(
            settings.broker_url,
            settings.result_backend,
            shards=settings.shards,
            timeout=kwargs.pop("timeout", 30),
            **kwargs,
        )
        self.clients.append(client)
        return client

    def client_processes(self, jobs: list[tuple[str, str, int]]) -> list[list[int]]:
        """Run one client process per (sequence, key prefix, count), all at once."""
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", CLIENT_SCRIPT, sequence, prefix, str(count)],
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for sequence, prefix, count in jobs
        ]
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
            results.append(json.loads(out))
        return results

    def start_clients(self, jobs: list[tuple[str, str, int]]) -> ClientRun:
        """:meth:`client_processes` in the background, while a test injects faults."""
        return ClientRun(self, jobs)

    def close(self) -> None:
        for client in self.clients:
            client.close()
        for worker in self.workers:
            worker.kill()
            worker.handle.close()
