"""The worker refuses to start when it could not keep its promise, and says why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa
from integration.stack import Stack
from sqlalchemy.engine import make_url
from test_queue import setup_sequences

from numbering import create_engine
from numbering.config.celery import celery_config
from numbering.routing import Shard
from numbering.settings import Settings
from numbering.tasks.preflight import check_celery_config, check_database, check_ledgers


def start_worker(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``numbering worker ARGS`` expecting it to refuse (it would run for ever)."""
    return stack.numbering("worker", *args)


def assert_refused(done: subprocess.CompletedProcess[str], *phrases: str) -> None:
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("error: the worker refuses to start:"), done.stderr
    for phrase in phrases:
        assert phrase in done.stderr, done.stderr


def test_refuses_a_database_that_may_forget_commits(stack: Stack) -> None:
    setup_sequences(stack, "invoices")
    database = make_url(stack.settings.database_url).database
    admin = create_engine(stack.settings.database_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'ALTER DATABASE "{database}" SET synchronous_commit = off')
    admin.dispose()
    assert_refused(start_worker(stack, "--sequence", "invoices"), "synchronous_commit=off")


def test_refuses_a_counter_that_disagrees_with_its_ledger(stack: Stack) -> None:
    allocator = setup_sequences(stack, "invoices", "orders")
    allocator.next_values("invoices", 5)
    allocator.next_values("orders", 3)
    with allocator.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE numbering_sequence SET last_value = 7 WHERE name = 'invoices'")
        )
    expected = "'invoices': counter says last value 7 in cycle 0, ledger ends at 5 in cycle 0"
    assert_refused(start_worker(stack, "--sequence", "invoices"), expected)
    assert_refused(start_worker(stack, "--shard", "0/1"), expected)
    # A worker for the healthy sequence alone starts.
    worker = stack.worker("--sequence", "orders")
    assert "refuses" not in worker.output()
    assert "Redis keeps nothing on disk" in worker.output()  # this test Redis has no persistence


def test_the_ledger_check_covers_every_sequence_of_a_shard(stack: Stack) -> None:
    allocator = setup_sequences(stack, *(f"s{i}" for i in range(8)))
    with allocator.engine.begin() as conn:
        conn.execute(sa.text("UPDATE numbering_sequence SET last_value = 1"))  # no ledger rows
    engine = allocator.engine
    covered: set[str] = set()
    for shard in (Shard(i, 3) for i in range(3)):
        named = {problem.split("'")[1] for problem in check_ledgers(engine, shards=[shard])}
        assert named == {f"s{i}" for i in range(8) if shard.serves(f"s{i}")}
        covered |= named
    assert covered == {f"s{i}" for i in range(8)}
    [problem] = check_ledgers(engine, ["s0"])
    assert problem.startswith("sequence 's0': counter says last value 1 in cycle 0, ledger ends")


def test_the_shipped_celery_configuration_passes_and_each_weakening_is_named() -> None:
    conf = celery_config(Settings())
    assert check_celery_config(conf, 1) == []
    weakened = {
        "task_acks_late": False,
        "task_reject_on_worker_lost": False,
        "worker_prefetch_multiplier": 4,
        "task_time_limit": 900,
    }
    for setting, value in weakened.items():
        problems = check_celery_config({**conf, setting: value}, 1)
        [problem] = problems
        assert setting in problem
    assert "concurrency must be 1, not 4" in check_celery_config(conf, 4)
    problems = check_celery_config({**conf, "task_soft_time_limit": 300}, 1)
    assert problems == ["task_soft_time_limit (300) must be below task_time_limit (300)"]


def test_sqlite_must_sync_every_commit(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    assert check_database(engine).problems == []
    unsafe = sa.create_engine(sqlite_url)
    sa.event.listen(unsafe, "connect", lambda dbapi, _: dbapi.execute("PRAGMA synchronous=NORMAL"))
    [problem] = check_database(unsafe).problems
    assert "synchronous=1" in problem


DOCS = Path(__file__).resolve().parents[2] / "docs" / "deployment.md"


def documented_grants(database: str, role: str) -> list[str]:
    """The GRANT statements of docs/deployment.md, for ``database`` and ``role``."""
    block = DOCS.read_text().split("```sql\n", 1)[1].split("```", 1)[0]
    statements = [line.split("--")[0].strip() for line in block.splitlines()]
    return [
        s.replace("numbering_worker", role).replace("DATABASE app", f'DATABASE "{database}"')
        for s in statements
        if s.startswith("GRANT")
    ]


def test_workers_run_with_the_documented_least_privileges(stack: Stack) -> None:
    """A role with exactly the grants docs/deployment.md lists runs a worker, serves
    clients and numbers a table in bulk; the owner ran init-db and created the sequence."""
    owner_url = make_url(stack.settings.database_url)
    database = owner_url.database
    assert database is not None
    role = f"nw_{database[-12:]}".replace("-", "_")
    admin = create_engine(stack.settings.database_url, isolation_level="AUTOCOMMIT")
    setup_sequences(stack, "invoices")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
        conn.exec_driver_sql("CREATE TABLE invoices (id bigint PRIMARY KEY, number bigint)")
        conn.exec_driver_sql("INSERT INTO invoices SELECT g, NULL FROM generate_series(1, 50) g")
        for grant in documented_grants(database, role):
            conn.exec_driver_sql(grant)
    try:
        stack.env["NUMBERING_DATABASE_URL"] = owner_url.set(username=role).render_as_string(
            hide_password=False
        )
        stack.env["NUMBERING_BATCH_TABLES"] = "invoices"
        stack.worker("--sequence", "invoices")
        results = stack.client_processes([("invoices", "c", 30)])
        assert results == [list(range(1, 31))]
        batch = subprocess.run(
            [sys.executable, "-m", "numbering", "batch", "invoices", "--table", "invoices"],
            env=stack.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert batch.returncode == 0, batch.stderr
        with admin.connect() as conn:
            numbers = conn.exec_driver_sql("SELECT number FROM invoices ORDER BY id").scalars()
            assert list(numbers) == list(range(31, 81))
            denied = conn.exec_driver_sql(
                f"SELECT has_table_privilege('{role}', 'numbering_ledger', 'DELETE'), "
                f"has_table_privilege('{role}', 'numbering_ledger', 'UPDATE')"
            ).one()
            assert tuple(denied) == (False, False)  # the ledger is append-only for workers
        batch_key = "batch:invoices.number:1"
        stack.check("invoices", [*(f"c:{i}" for i in range(30)), batch_key], unrecorded=[batch_key])
    finally:
        stack.close()
        with admin.connect() as conn:
            conn.exec_driver_sql(f"REASSIGN OWNED BY {role} TO CURRENT_USER")
            conn.exec_driver_sql(f"DROP OWNED BY {role}")
            conn.exec_driver_sql(f"DROP ROLE {role}")
        admin.dispose()


def test_refuses_a_redis_cluster_node(stack: Stack, tmp_path: Path) -> None:
    """Celery and kombu do not speak Redis Cluster: a broker or reply URL that points at
    a cluster node is refused at start, by name, instead of failing request by request.
    A cluster-enabled redis-server of the test's own, on a free port."""
    import socket
    import time

    import redis

    ports = []
    for _ in range(2):  # the client port and the cluster bus port (else port + 10000,
        with socket.socket() as probe:  # past 65535 for a high free port: seen in CI)
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    port, bus = ports
    log = tmp_path / "redis.log"
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--cluster-port", str(bus),
         "--bind", "127.0.0.1", "--dir", str(tmp_path), "--logfile", str(log),
         "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 30
        while True:  # a condition, bounded: the server answers
            try:
                assert client.info("cluster")["cluster_enabled"] == 1
                break
            except redis.ConnectionError:
                alive = server.poll() is None
                assert alive, f"the cluster-enabled redis stopped:\n{log.read_text()[-2000:]}"
                assert time.monotonic() < deadline, "the cluster-enabled redis never answered"
                time.sleep(0.05)
        client.close()
        setup_sequences(stack, "invoices")
        stack.env["NUMBERING_RESULT_BACKEND"] = url  # the replies on the cluster node
        done = start_worker(stack, "--sequence", "invoices")
        assert_refused(done, f"{url} is a Redis Cluster node", "do not support Redis Cluster")
    finally:
        server.terminate()
        server.wait(30)
