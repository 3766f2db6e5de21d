"""numbering on Redis Sentinel: broker and replies found through the sentinels.

A Redis master and a sentinel of the test's own, on free loopback ports (the shared
Redis is never touched): ``sentinel://`` URLs with ``NUMBERING_SENTINEL_MASTER`` for the
worker, the client processes and ``numbering status``; the ledger ends gapless.
(Failover under load is the next slice of issue 20.)
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from integration.stack import Stack
from ledger_check import check_gapless
from test_queue import setup_sequences

from numbering import create_engine
from numbering.brokers import redis_client
from numbering.config.celery import CONTROL_QUEUE
from numbering.errors import BrokerUnavailable, ConfigurationError
from numbering.routing import FREEZE_TASK_NAME
from numbering.settings import Settings
from numbering.tasks.app import create_app

MASTER = "numbering"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait(condition: object, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():  # type: ignore[operator]
                return
        except (redis.ConnectionError, redis.ResponseError):
            pass
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


@pytest.fixture
def sentinel_url(tmp_path: Path) -> Iterator[str]:
    """``sentinel://`` URL of a sentinel watching a Redis master, both the test's own."""
    master_port, sentinel_port = _free_port(), _free_port()
    (tmp_path / "master").mkdir()
    (tmp_path / "sentinel").mkdir()
    config = tmp_path / "sentinel" / "sentinel.conf"
    config.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path / 'sentinel'}\n"
        f"sentinel monitor {MASTER} 127.0.0.1 {master_port} 1\n"
        f"sentinel down-after-milliseconds {MASTER} 1000\n"
    )
    procs = [
        subprocess.Popen(
            ["redis-server", "--port", str(master_port), "--bind", "127.0.0.1",
             "--dir", str(tmp_path / "master"), "--save", "", "--appendonly", "yes"],
            stdout=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            ["redis-server", str(config), "--sentinel"], stdout=subprocess.DEVNULL
        ),
    ]  # fmt: skip
    try:
        sentinel = redis.Redis(port=sentinel_port, decode_responses=True)
        _wait(
            lambda: sentinel.sentinel_get_master_addr_by_name(MASTER) == ("127.0.0.1", master_port),
            "the sentinel knows the master",
        )
        sentinel.close()
        yield f"sentinel://127.0.0.1:{sentinel_port}/0"
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


def test_the_master_s_name_is_required_and_used(sentinel_url: str) -> None:
    with pytest.raises(ConfigurationError, match="set NUMBERING_SENTINEL_MASTER"):
        Settings(broker_url=sentinel_url)
    with pytest.raises(ConfigurationError, match="neither NUMBERING_BROKER_URL"):
        Settings(broker_url="redis://127.0.0.1:6379/0", sentinel_master=MASTER)
    client = redis_client(sentinel_url, MASTER)
    client.set("numbering-test", "1")  # written on the master the sentinel names
    assert client.get("numbering-test") == b"1"
    client.close()


def test_numbers_through_sentinel(pg_url: str, sentinel_url: str, tmp_path: Path) -> None:
    """A worker and four client processes on Redis found through its sentinel, for the
    queue and the answers: every number once, the ledger gapless, and `numbering status`
    on the same settings."""
    stack = Stack(pg_url, sentinel_url, sentinel_url, tmp_path)
    stack.env["NUMBERING_SENTINEL_MASTER"] = MASTER
    try:
        setup_sequences(stack, "invoices")
        stack.worker("--sequence", "invoices")
        results = stack.client_processes([("invoices", f"c{c}", 100) for c in range(4)])
        stack.check("invoices", [f"c{c}:{i}" for c in range(4) for i in range(100)])
        assert sorted(v for values in results for v in values) == list(range(1, 401))
        client = stack.client()
        assert client.next_value("invoices", key="in-process") == 401
        done = stack.numbering("status")
        assert done.returncode == 0, done.stderr
        assert "invoices" in done.stdout
        assert "alive" in done.stdout
    finally:
        stack.close()


@pytest.fixture
def sentinel_group(tmp_path: Path) -> Iterator[dict[str, object]]:
    """A master, a replica and three sentinels (quorum 2), the test's own: what a
    failover needs. Yields the sentinel URL and the processes by role."""
    ports = {name: _free_port() for name in ("master", "replica", "s1", "s2", "s3")}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    for role in ("master", "replica"):
        (tmp_path / role).mkdir()
        extra = ["--replicaof", "127.0.0.1", str(ports["master"])] if role == "replica" else []
        procs[role] = subprocess.Popen(
            ["redis-server", "--port", str(ports[role]), "--bind", "127.0.0.1",
             "--dir", str(tmp_path / role), "--save", "", "--appendonly", "yes", *extra],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
    for name in ("s1", "s2", "s3"):
        (tmp_path / name).mkdir()
        config = tmp_path / name / "sentinel.conf"
        config.write_text(
            f"port {ports[name]}\nbind 127.0.0.1\ndir {tmp_path / name}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {ports['master']} 2\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 5000\n"
        )
        procs[name] = subprocess.Popen(
            ["redis-server", str(config), "--sentinel"], stdout=subprocess.DEVNULL
        )
    try:
        sentinel = redis.Redis(port=ports["s1"], decode_responses=True)
        _wait(
            lambda: (
                int(sentinel.sentinel_master(MASTER)["num-other-sentinels"]) == 2
                and int(sentinel.sentinel_master(MASTER)["num-slaves"]) == 1
            ),
            "the sentinels know each other and the replica",
        )
        urls = ";".join(f"sentinel://127.0.0.1:{ports[name]}" for name in ("s1", "s2", "s3"))
        yield {"url": f"{urls}/0", "procs": procs, "ports": ports, "sentinel": sentinel}
        sentinel.close()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in procs.values():
            proc.wait(30)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill", "switchover"])
def test_a_failover_under_load(
    pg_url: str, sentinel_group: dict[str, object], tmp_path: Path, fault: str
) -> None:
    """The master is SIGKILLed (or demoted by SENTINEL FAILOVER: blocked commands on it
    then fail with UNBLOCKED, writes with READONLY) while four client processes ask for
    numbers: the sentinels promote the replica, the worker and the clients find it, and
    every request ends with one number; what the old master had not replicated is resent
    by its key. Gapless."""
    url = str(sentinel_group["url"])
    procs: dict[str, subprocess.Popen[bytes]] = sentinel_group["procs"]  # type: ignore[assignment]
    ports: dict[str, int] = sentinel_group["ports"]  # type: ignore[assignment]
    sentinel: redis.Redis = sentinel_group["sentinel"]  # type: ignore[assignment]
    stack = Stack(pg_url, url, url, tmp_path)
    stack.env["NUMBERING_SENTINEL_MASTER"] = MASTER
    stack.env["NUMBERING_REQUEST_TIMEOUT"] = "120"
    try:
        setup_sequences(stack, "invoices")
        worker = stack.worker("--sequence", "invoices")
        run = stack.start_clients([("invoices", f"c{c}", 300) for c in range(4)])
        engine = create_engine(pg_url)

        def numbered() -> int:
            with engine.connect() as conn:
                return int(conn.exec_driver_sql("SELECT count(*) FROM numbering_ledger").scalar())

        _wait(lambda: numbered() >= 100, "numbers flowing before the fault", 120)
        engine.dispose()
        if fault == "kill":
            procs["master"].kill()
        else:
            sentinel.sentinel_failover(MASTER)
        _wait(
            lambda: sentinel.sentinel_get_master_addr_by_name(MASTER)[1] == ports["replica"],
            "the replica promoted",
            60,
        )
        results = run.wait(300)
        assert worker.proc.poll() is None, worker.output()  # it carried on
        stack.check("invoices", [f"c{c}:{i}" for c in range(4) for i in range(300)])
        assert sorted(v for values in results for v in values) == list(range(1, 1201))
    finally:
        stack.close()


def test_a_master_without_its_replicas_refuses_writes_and_the_worker_waits(
    pg_url: str, sentinel_url: str, tmp_path: Path
) -> None:
    """min-replicas-to-write: a master that has lost its replicas answers NOREPLICAS to
    every write (here set by hand on a master without replicas). A caller is told at
    once that nothing was sent; the worker, Celery's consumer of the control queue
    included, keeps running and serves again when writes are taken; gapless."""
    stack = Stack(pg_url, sentinel_url, sentinel_url, tmp_path)
    stack.env["NUMBERING_SENTINEL_MASTER"] = MASTER
    master = redis_client(sentinel_url, MASTER)
    try:
        setup_sequences(stack, "invoices")
        worker = stack.worker("--sequence", "invoices")
        client = stack.client()
        assert client.next_value("invoices", key="before") == 1
        master.config_set("min-replicas-to-write", 1)
        with pytest.raises(BrokerUnavailable, match=r"NOREPLICAS.*nothing was sent") as info:
            client.next_value("invoices", key="during", timeout=2)
        assert "min-replicas-to-write" in str(info.value)

        def refused(line: str) -> bool:
            return "NOREPLICAS" in line

        _wait(  # both of the worker's consumers met the refusal, and carried on
            lambda: (
                any(refused(line) and "celery" in line for line in worker.output().splitlines())
                and any(
                    refused(line) and "consumer of numbering.invoices" in line
                    for line in worker.output().splitlines()
                )
            ),
            "the worker met NOREPLICAS",
        )
        master.config_set("min-replicas-to-write", 0)
        assert client.next_value("invoices", key="during") == 2
        app = create_app(stack.settings)
        frozen = app.send_task(
            FREEZE_TASK_NAME, kwargs={"sequence": "invoices"}, queue=CONTROL_QUEUE
        )
        assert frozen.get(timeout=60) == {"sequence": "invoices", "frozen": True}
        assert worker.proc.poll() is None, worker.output()
        check_gapless(create_engine(pg_url), "invoices", keys=["before", "during"])
    finally:
        master.close()
        stack.close()
