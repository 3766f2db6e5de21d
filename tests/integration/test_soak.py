"""A seeded random fault soak: thousands of requests while faults strike at random.

Slow (``make slow``). SOAK_SEED picks the fault schedule (default 1), SOAK_PER_CLIENT
the requests per client process (default 2000; 6 processes on 2 sequences). Clients
wait only SOAK_OP_TIMEOUT seconds (default 5) for an answer, so long faults produce
unknown outcomes that they resend later, and the history checker sees them.

The last recorded result is in docs/faults.md.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest
import redis
import sqlalchemy as sa
from integration.stack import Stack, Worker
from test_queue import assert_increasing, setup_sequences

from numbering import create_engine

pytestmark = pytest.mark.slow

SEQUENCES = ("invoices", "credit-notes")


def test_random_fault_soak(stack: Stack) -> None:
    seed = int(os.environ.get("SOAK_SEED", "1"))
    per_client = int(os.environ.get("SOAK_PER_CLIENT", "2000"))
    stack.op_timeout = float(os.environ.get("SOAK_OP_TIMEOUT", "5"))
    stack.env["NUMBERING_IDLE_TRANSACTION_TIMEOUT"] = "2"
    rng = random.Random(seed)
    setup_sequences(stack, *SEQUENCES)
    worker_args = [arg for name in SEQUENCES for arg in ("--sequence", name)]
    live: list[Worker] = [stack.worker(*worker_args)]
    lock = threading.Lock()
    admin = create_engine(stack.settings.database_url, isolation_level="AUTOCOMMIT")
    broker = redis.Redis.from_url(stack.settings.broker_url)

    def replace(worker: Worker, how: Callable[[Worker], object]) -> None:
        how(worker)
        with lock:
            live.remove(worker)
            if not live:
                live.append(stack.worker(*worker_args))

    def kill_worker() -> None:
        replace(live[0], Worker.kill)

    def terminate_worker() -> None:
        replace(live[0], Worker.terminate)

    def add_standby() -> None:
        if len(live) < 2:
            live.append(stack.worker(*worker_args, active=False))

    def freeze_worker() -> None:  # past the idle-in-transaction timeout, then resume
        worker = live[0]
        os.killpg(worker.proc.pid, signal.SIGSTOP)
        time.sleep(rng.uniform(0.5, 8))  # longer than SOAK_OP_TIMEOUT now and then
        os.killpg(worker.proc.pid, signal.SIGCONT)

    def terminate_backends() -> None:
        with admin.connect() as conn:
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )

    def kill_redis_clients() -> None:
        broker.execute_command("CLIENT KILL TYPE normal SKIPME yes")

    def pause_redis() -> None:
        broker.execute_command(f"CLIENT PAUSE {rng.randint(200, 2000)} ALL")

    faults: list[Callable[[], None]] = [
        kill_worker,
        terminate_worker,
        add_standby,
        freeze_worker,
        terminate_backends,
        kill_redis_clients,
        pause_redis,
    ]
    jobs = [(name, f"{name}-{c}", per_client) for name in SEQUENCES for c in range(3)]
    started = time.monotonic()
    clients = stack.start_clients(jobs)
    struck: Counter[str] = Counter()
    while clients.thread.is_alive():
        time.sleep(rng.uniform(0.2, 3))
        fault = rng.choice(faults)
        fault()
        struck[fault.__name__] += 1
    results = clients.wait(60)
    elapsed = time.monotonic() - started

    assert_increasing(results)
    for name in SEQUENCES:
        stack.check(name, [f"{name}-{c}:{i}" for c in range(3) for i in range(per_client)])
    outcomes = Counter(op.type for op in stack.history)
    print(
        f"\nsoak seed={seed}: {len(jobs) * per_client} keys on {len(SEQUENCES)} sequences in "
        f"{elapsed:.0f} s; operations {dict(outcomes)}; faults {dict(struck)}; "
        "gapless, each key once, history checked"
    )
