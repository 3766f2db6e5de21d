"""Quorum queues on a three-node RabbitMQ cluster of the test's own: the node that leads
a queue is killed under load.

The nodes (``numbering-ha1..3-<run>@localhost``) run from the machine's RabbitMQ install with
their own Erlang cookie, ports and data directory, so the shared ``rabbit@`` node is
never touched; they form a cluster before any queue is declared. Slow (a node takes
seconds to start): ``pytest -m slow``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from integration.stack import Stack
from test_queue import assert_increasing, setup_sequences

from numbering.routing import sequence_queue

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Cluster:
    """Three RabbitMQ nodes clustered on loopback (see the module doc)."""

    def __init__(self, root: Path) -> None:
        server = shutil.which("rabbitmq-server")
        if server is None:
            pytest.skip("RabbitMQ is not installed")
        self.bin = Path(server).resolve().parent
        self.root = root
        home = root / "home"
        home.mkdir(parents=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(10).upper())
        cookie.chmod(0o400)
        self.env = {**os.environ, "HOME": str(home), "ERL_EPMD_ADDRESS": "127.0.0.1"}
        # Names of this run's own: a node left over by a run that was killed cannot clash.
        run = secrets.token_hex(3)
        self.nodes = tuple(f"numbering-ha{i}-{run}" for i in (1, 2, 3))
        self.ports = {node: _free_port() for node in self.nodes}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def node_dir(self, node: str) -> Path:
        return self.root / node

    def start(self, node: str) -> None:
        where = self.node_dir(node)
        where.mkdir(exist_ok=True)
        (where / "env").write_text("")
        (where / "plugins").write_text("")
        (where / "rabbitmq.conf").write_text(f"listeners.tcp.1 = 127.0.0.1:{self.ports[node]}\n")
        env = {
            **self.env,
            "RABBITMQ_NODENAME": f"{node}@localhost",
            "RABBITMQ_NODE_PORT": str(self.ports[node]),
            "RABBITMQ_DIST_PORT": str(_free_port()),
            "RABBITMQ_CONF_ENV_FILE": str(where / "env"),
            "RABBITMQ_CONFIG_FILE": str(where / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(where / "plugins"),
            "RABBITMQ_MNESIA_BASE": str(where / "db"),
            "RABBITMQ_LOG_BASE": str(where / "log"),
        }
        # In the foreground, in a session of its own: the whole node is killed with it.
        self.procs[node] = subprocess.Popen(
            [self.bin / "rabbitmq-server"],
            env=env,
            cwd=where,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        # await_startup fails at once until the node has registered with epmd.
        deadline = time.monotonic() + 180
        while self._ctl(node, "await_startup", "--timeout", "60").returncode != 0:
            assert time.monotonic() < deadline, f"RabbitMQ node {node} did not start"
            time.sleep(1)

    def _ctl(self, node: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.bin / "rabbitmqctl", "-n", f"{node}@localhost", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,  # where a failing CLI leaves its erl_crash.dump
        )

    def ctl(self, node: str, *args: str, timeout: float = 120) -> str:
        done = self._ctl(node, *args, timeout=timeout)
        assert done.returncode == 0, f"rabbitmqctl {' '.join(args)}: {done.stderr}"
        return done.stdout

    def kill(self, node: str) -> None:
        """SIGKILL the node: its Erlang VM and everything it started."""
        proc = self.procs[node]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)

    def url(self) -> str:
        return ";".join(f"amqp://guest:guest@127.0.0.1:{self.ports[n]}//" for n in self.nodes)

    def leader(self, queue: str, asking: str) -> str:
        """The node that leads quorum queue ``queue`` (asked of node ``asking``)."""
        rows = self.ctl(asking, "list_queues", "name", "leader", "--quiet", "--no-table-headers")
        for line in rows.splitlines():
            name, _, leader = line.rpartition("\t")
            if name == queue:
                return leader.partition("@")[0]
        raise AssertionError(f"no queue {queue} among:\n{rows}")

    def stop_all(self) -> None:
        for node in self.procs:
            self.kill(node)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    nodes = Cluster(tmp_path / "rabbit")
    first, *others = nodes.nodes
    try:
        for node in nodes.nodes:
            nodes.start(node)
        # guest may log in from loopback only: these nodes are on loopback.
        for node in others:
            nodes.ctl(node, "stop_app")
            nodes.ctl(node, "join_cluster", f"{first}@localhost")
            nodes.ctl(node, "start_app")
        status = nodes.ctl(first, "cluster_status")
        assert all(f"{node}@localhost" in status for node in nodes.nodes), status
        yield nodes
    finally:
        nodes.stop_all()


def test_the_queue_leader_killed_under_load(
    cluster: Cluster, pg_url: str, redis_urls: tuple[str, str], tmp_path: Path
) -> None:
    """Quorum queues over three nodes, a worker and three client processes on the
    cluster's URL (every node listed): the node leading the sequence's queue is
    SIGKILLed; a new leader is elected, the worker and the clients reconnect to the
    nodes left, every request ends with one number, and the ledger is gapless."""
    stack = Stack(pg_url, cluster.url(), redis_urls[1], tmp_path)
    stack.env["NUMBERING_QUEUE_TYPE"] = "quorum"
    try:
        setup_sequences(stack, "invoices")
        worker = stack.worker("--sequence", "invoices")
        queue = sequence_queue("invoices")
        first = cluster.nodes[0]
        members = cluster.ctl(first, "list_queues", "name", "type", "members", "--quiet")
        assert "quorum" in members, members
        assert all(node in members for node in cluster.nodes), members
        run = stack.start_clients([("invoices", f"c{c}", 200) for c in range(3)])
        stack.wait_for_numbers("invoices", 100)
        leader = cluster.leader(queue, first)
        cluster.kill(leader)
        survivor = next(node for node in cluster.nodes if node != leader)
        deadline = time.monotonic() + 120
        while True:  # a new leader among the nodes left
            try:
                if cluster.leader(queue, survivor) != leader:
                    break
            except AssertionError:
                pass
            assert time.monotonic() < deadline, "no new leader was elected"
            time.sleep(0.5)
        results = run.wait(300)
        assert worker.proc.poll() is None, worker.output()
        assert_increasing(results)
        stack.check("invoices", [f"c{c}:{i}" for c in range(3) for i in range(200)])
        assert sorted(v for values in results for v in values) == list(range(1, 601))
    finally:
        stack.close()
