"""Fixtures: a real database per test, on PostgreSQL and on SQLite.

PostgreSQL tests each get a fresh database cloned from a template that was migrated once
per test session (the procrastinate approach). The server comes from TEST_DATABASE_URL
(an admin connection; default: the local server as user postgres). When CI is set, a
missing server fails the run instead of skipping, and so does any skipped test.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from integration.stack import Stack
from kombu.connection import Connection
from sqlalchemy.engine import Engine, make_url

from numbering import NumberingError, RetryPolicy, create_engine, init_db
from numbering.routing import dead_letter_queue, kombu_queue

ADMIN_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
# Tests own two Redis databases (broker and replies) and flush them around each test.
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")
TEST_BROKER_DB, TEST_REPLY_DB = 14, 15
AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
MARIADB_URL = os.environ.get("TEST_MARIADB_URL", "mysql://root@127.0.0.1:3306/")
IN_CI = bool(os.environ.get("CI"))
TEMPLATE = f"numbering_template_{os.getpid()}"

# Retry waits kept short so that tests do not sleep, but not zero: colliding threads need
# a little jitter to stop colliding.
FAST_RETRY = RetryPolicy(attempts=200, timeout=60, wait_initial=0.001, wait_max=0.02)


def _admin() -> Engine:
    return create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)


def _url_for(database: str) -> str:
    return make_url(ADMIN_URL).set(database=database).render_as_string(hide_password=False)


def _migrate(url: str) -> None:
    """Bring the database at ``url`` to numbering's current schema."""
    engine = create_engine(url, poolclass=sa.pool.NullPool)
    try:
        init_db(engine)
    finally:
        engine.dispose()


def _unavailable(reason: str, server: str = "PostgreSQL") -> None:
    if IN_CI:
        pytest.fail(f"{server} is required under CI but unavailable: {reason}")
    pytest.skip(f"{server} unavailable: {reason}")


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """Name of a database migrated to the current schema, to clone per test."""
    admin = _admin()
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{TEMPLATE}"')
            conn.exec_driver_sql(f'CREATE DATABASE "{TEMPLATE}"')
    except sa.exc.OperationalError as exc:
        _unavailable(str(exc.orig).strip())
    _migrate(_url_for(TEMPLATE))
    yield TEMPLATE
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)')
    admin.dispose()


def _fresh_database(template: str | None) -> Iterator[str]:
    name = f"numbering_test_{uuid.uuid4().hex[:12]}"
    admin = _admin()
    clone = f' TEMPLATE "{template}" STRATEGY FILE_COPY' if template else ""
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"{clone}')
    except sa.exc.OperationalError as exc:
        _unavailable(str(exc.orig).strip())
    yield _url_for(name)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture
def pg_url(pg_template: str) -> Iterator[str]:
    """URL of a fresh, migrated PostgreSQL database for this test alone."""
    yield from _fresh_database(pg_template)


@pytest.fixture
def pg_empty_url() -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL database (no schema) for this test alone."""
    yield from _fresh_database(None)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a fresh, migrated SQLite file for this test alone."""
    url = f"sqlite:///{tmp_path / 'numbering.db'}"
    _migrate(url)
    return url


@pytest.fixture
def mariadb_url() -> Iterator[str]:
    """URL of a fresh, migrated MariaDB database for this test alone (InnoDB, utf8mb4)."""
    name = f"numbering_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(MARIADB_URL, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    except (sa.exc.DBAPIError, NumberingError) as exc:
        _unavailable(str(exc), "MariaDB")
    url = f"{MARIADB_URL.rstrip('/')}/{name}"
    _migrate(url)
    yield url
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
    admin.dispose()


@pytest.fixture(params=["postgresql", "sqlite", "mariadb"])
def db_url(request: pytest.FixtureRequest) -> str:
    """A fresh, migrated database on each backend in turn."""
    fixture = {"postgresql": "pg_url", "sqlite": "sqlite_url", "mariadb": "mariadb_url"}
    url: str = request.getfixturevalue(fixture[request.param])
    return url


@pytest.fixture(params=["postgresql", "mariadb"])
def server_url(request: pytest.FixtureRequest) -> str:
    """A fresh, migrated database on each server engine in turn (not SQLite)."""
    url: str = request.getfixturevalue(
        {"postgresql": "pg_url", "mariadb": "mariadb_url"}[request.param]
    )
    return url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = create_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def redis_urls() -> Iterator[tuple[str, str]]:
    """(broker URL, reply URL) on two Redis databases flushed before and after the test."""
    urls = (f"{REDIS_URL}/{TEST_BROKER_DB}", f"{REDIS_URL}/{TEST_REPLY_DB}")
    clients = [redis.Redis.from_url(url) for url in urls]
    try:
        for client in clients:
            client.flushdb()
    except redis.RedisError as exc:
        _unavailable(str(exc), "Redis")
    yield urls
    for client in clients:
        client.flushdb()
        client.close()


@pytest.fixture
def stack(pg_url: str, redis_urls: tuple[str, str], tmp_path: Path) -> Iterator[Stack]:
    """A real stack: PostgreSQL database, Redis broker and replies; start workers on it."""
    stack = Stack(pg_url, *redis_urls, tmp_path)
    yield stack
    stack.close()


@pytest.fixture
def mariadb_stack(mariadb_url: str, redis_urls: tuple[str, str], tmp_path: Path) -> Iterator[Stack]:
    """:func:`stack` on a MariaDB database."""
    stack = Stack(mariadb_url, *redis_urls, tmp_path)
    yield stack
    stack.close()


@pytest.fixture(params=["postgresql", "mariadb"])
def engine_stack(request: pytest.FixtureRequest) -> Stack:
    """:func:`stack` on each server engine in turn (for the fault tests that both run)."""
    fixture = {"postgresql": "stack", "mariadb": "mariadb_stack"}[request.param]
    stack: Stack = request.getfixturevalue(fixture)
    return stack


@pytest.fixture(params=["replies-apart", "replies-on-broker", "replies-elsewhere"])
def client_stack(
    request: pytest.FixtureRequest, pg_url: str, redis_urls: tuple[str, str], tmp_path: Path
) -> Iterator[Stack]:
    """:func:`stack` with the reply lists in another Redis database than the broker's, or
    in the broker's own (the default), or on what the client takes for another server
    (the same one, named otherwise). In the first two a client sends a request and
    starts waiting for its answer in one round trip; in the last, in two."""
    broker, replies = redis_urls
    if request.param == "replies-on-broker":
        replies = broker
    elif request.param == "replies-elsewhere":
        replies = replies.replace("127.0.0.1", "localhost")
        assert replies != redis_urls[1], "the test Redis must be named by 127.0.0.1"
    stack = Stack(pg_url, broker, replies, tmp_path)
    yield stack
    stack.close()


def _amqp_stack(
    pg_url: str, redis_urls: tuple[str, str], tmp_path: Path, queue_type: str
) -> Iterator[Stack]:
    try:
        with Connection(AMQP_URL, connect_timeout=5) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        _unavailable(str(exc), "RabbitMQ")
    stack = Stack(pg_url, AMQP_URL, redis_urls[1], tmp_path)
    stack.env["NUMBERING_QUEUE_TYPE"] = queue_type
    yield stack
    stack.close()
    with Connection(AMQP_URL) as conn:
        channel = conn.channel()
        for queue in stack.queues:
            kombu_queue(queue)(channel).delete()
        if queue_type == "quorum":
            # The dead-letter queue is the vhost's: take this test's dead letters out.
            dead = dead_letter_queue()(conn.channel())
            dead.declare()
            while (message := dead.get(no_ack=False)) is not None:
                if message.headers.get("x-first-death-queue") in stack.queues:
                    message.ack()


@pytest.fixture
def amqp_stack(pg_url: str, redis_urls: tuple[str, str], tmp_path: Path) -> Iterator[Stack]:
    """Like ``stack`` with RabbitMQ as the broker (replies still travel over Redis), its
    queues classic."""
    yield from _amqp_stack(pg_url, redis_urls, tmp_path, "classic")


@pytest.fixture
def quorum_stack(pg_url: str, redis_urls: tuple[str, str], tmp_path: Path) -> Iterator[Stack]:
    """``amqp_stack`` with quorum queues (NUMBERING_QUEUE_TYPE=quorum)."""
    yield from _amqp_stack(pg_url, redis_urls, tmp_path, "quorum")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if {
            "pg_url",
            "pg_empty_url",
            "pg_template",
            "redis_urls",
            "amqp_stack",
            "quorum_stack",
            "mariadb_url",
        } & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    if IN_CI and skipped:
        terminalreporter.write_line(
            f"CI is set and {len(skipped)} test(s) were skipped: failing the run", red=True
        )


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if IN_CI and skipped and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
