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
from test_queue import setup_sequences

from numbering.brokers import redis_client
from numbering.errors import ConfigurationError
from numbering.settings import Settings

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
