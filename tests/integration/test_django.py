"""numbering.django: django-sequences' API on Django's own connections, in the caller's
transaction, on PostgreSQL, SQLite and MariaDB.

Django is configured once for this process with one database alias per engine (SQLite
as ``default``, with ``transaction_mode = IMMEDIATE`` as docs/django.md asks, so that a
second writer waits instead of failing), each migrated by ``manage.py migrate``.

This file runs on the installed Django (5.2 LTS, the newest release the registry has)
and again, in a child process, on Django 4.2 LTS (test_django_4_2_lts).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

if os.environ.get("TEST_DJANGO_WITHOUT_PSYCOPG3"):
    # Django's PostgreSQL backend takes psycopg 3 when it can import it: hide it, so
    # that this run covers Django on psycopg2 (test_django_on_psycopg2 below).
    sys.modules["psycopg"] = None  # type: ignore[assignment]

import django
import pytest
from conftest import MARIADB_URL, _admin, _url_for
from integration.stack import Stack
from ledger_check import check_gapless
from sqlalchemy.engine import make_url

from numbering import Allocator, create_engine
from numbering.migrations import current_revision, head_revision

pytestmark = pytest.mark.integration
ALIASES = ["default", "postgresql", "mariadb"]  # default: SQLite
WAIT = 60  # seconds: generous bounds on waits for conditions, never sleeps


def _django_database(url: str, **extra: Any) -> dict[str, Any]:
    u = make_url(url)
    mysql = u.get_backend_name() == "mysql"
    return {
        "ENGINE": "django.db.backends.mysql" if mysql else "django.db.backends.postgresql",
        "NAME": u.database,
        "USER": u.username or ("root" if mysql else "postgres"),
        "PASSWORD": u.password or "",
        "HOST": u.host or "127.0.0.1",
        "PORT": str(u.port or (3306 if mysql else 5432)),
        **extra,
    }


@pytest.fixture(scope="module")
def databases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One fresh database per engine, Django configured on them and migrated; yields
    each alias's SQLAlchemy URL (for numbering's own allocator and the audit)."""
    from django.conf import settings

    suffix = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
    name = f"numbering_django_{suffix}"
    admin = _admin()
    maria_admin = create_engine(MARIADB_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    with maria_admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    sqlite_path = tmp_path_factory.mktemp("django") / "django.sqlite3"
    urls = {
        "default": f"sqlite:///{sqlite_path}",
        "postgresql": _url_for(name),
        "mariadb": f"{MARIADB_URL.rstrip('/')}/{name}",
    }
    if not settings.configured:
        settings.configure(
            DATABASES={
                "default": {
                    "ENGINE": "django.db.backends.sqlite3",
                    "NAME": str(sqlite_path),
                    # Django 5.1+ (docs/django.md); on 4.2 each test takes its number
                    # before it reads, which waits as well.
                    "OPTIONS": {"timeout": WAIT}
                    | ({"transaction_mode": "IMMEDIATE"} if django.VERSION >= (5, 1) else {}),
                },
                "postgresql": _django_database(urls["postgresql"]),
                "mariadb": _django_database(urls["mariadb"]),
            },
            # django-sequences too: the take-over test fills its table with it.
            INSTALLED_APPS=[
                "numbering.django",
                "sequences",
                "django.contrib.admin",
                "django.contrib.auth",
                "django.contrib.contenttypes",
                "django.contrib.sessions",
                "django.contrib.messages",
            ],
            MIDDLEWARE=[
                "django.contrib.sessions.middleware.SessionMiddleware",
                "django.middleware.csrf.CsrfViewMiddleware",
                "django.contrib.auth.middleware.AuthenticationMiddleware",
                "django.contrib.messages.middleware.MessageMiddleware",
            ],
            TEMPLATES=[
                {
                    "BACKEND": "django.template.backends.django.DjangoTemplates",
                    "APP_DIRS": True,
                    "OPTIONS": {
                        "context_processors": [
                            "django.template.context_processors.request",
                            "django.contrib.auth.context_processors.auth",
                            "django.contrib.messages.context_processors.messages",
                        ]
                    },
                }
            ],
            ROOT_URLCONF="integration.django_urls",
            SECRET_KEY="numbering-tests",
            ALLOWED_HOSTS=["testserver"],
            USE_TZ=True,
        )
        django.setup()
    from django.core.management import call_command
    from django.db import connections

    for alias in ALIASES:
        call_command("migrate", database=alias, verbosity=0)
    yield urls
    connections.close_all()
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    with maria_admin.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
    admin.dispose()
    maria_admin.dispose()


@pytest.fixture(params=ALIASES, ids=["sqlite", "postgresql", "mariadb"])
def alias(request: pytest.FixtureRequest, databases: dict[str, str]) -> str:
    return str(request.param)


@pytest.fixture(params=["postgresql", "mariadb"])
def server_alias(request: pytest.FixtureRequest, databases: dict[str, str]) -> str:
    return str(request.param)


def fresh() -> str:
    return f"seq-{uuid.uuid4().hex[:10]}"


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``fn`` in a thread with its own Django connections (closed at the end);
    its result or exception lands in the dict."""
    from django.db import connections

    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # asserted by the caller
            out["error"] = exc
        finally:
            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def waiting_for_lock(alias: str) -> bool:
    """Whether some session of ``alias`` waits for a row lock (none on SQLite: its
    second writer waits in BEGIN IMMEDIATE, before any statement)."""
    from django.db import connections

    sql = {
        "postgresql": "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND datname = current_database()",
        "mariadb": "SELECT COUNT(*) FROM information_schema.innodb_trx "
        "WHERE trx_state = 'LOCK WAIT'",
    }[alias]
    with connections[alias].cursor() as cursor:
        cursor.execute(sql)
        return bool(cursor.fetchone()[0])


def wait_until(condition: Callable[[], bool], what: str) -> None:
    import time

    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.2)  # InnoDB refreshes innodb_trx only when unread for 0.1 s


# -- the API, one caller ------------------------------------------------------------------


def test_migrate_creates_numbering_schema(databases: dict[str, str]) -> None:
    from django.core.management import call_command

    for alias in ALIASES:
        call_command("migrate", database=alias, verbosity=0)  # again: nothing to do
        engine = create_engine(databases[alias])
        assert current_revision(engine) == head_revision()
        engine.dispose()


def test_first_call_creates_then_increments(alias: str, databases: dict[str, str]) -> None:
    from numbering.django import get_last_value, get_next_value

    name = fresh()
    assert get_last_value(name, using=alias) is None
    assert [get_next_value(name, using=alias) for _ in range(3)] == [1, 2, 3]
    assert get_last_value(name, using=alias) == 3
    zero = fresh()
    assert get_next_value(zero, initial_value=0, using=alias) == 0
    assert get_next_value(zero, initial_value=0, using=alias) == 1
    check_gapless(create_engine(databases[alias]), name)


def test_batches_loops_and_bad_bounds(alias: str) -> None:
    from numbering.django import Sequence, get_last_value, get_next_value, get_next_values

    name = fresh()
    assert get_next_values(0, name, using=alias) == range(0)
    assert get_next_values(3, name, initial_value=10, using=alias) == range(10, 13)
    assert get_next_values(2, name, using=alias) == range(13, 15)
    looping = fresh()
    got = [get_next_value(looping, 1, 4, using=alias) for _ in range(7)]
    assert got == [1, 2, 3, 1, 2, 3, 1]
    bad = fresh()
    with pytest.raises(ValueError, match="reset_value must be greater"):
        get_next_value(bad, 5, 5, using=alias)
    with pytest.raises(ValueError, match="reset_value must be greater"):
        Sequence(bad, 5, 3)
    assert get_last_value(bad, using=alias) is None  # nothing was created


def test_sequence_class_iterates(alias: str) -> None:
    from numbering.django import Sequence

    seq = Sequence(fresh(), initial_value=100, using=alias)
    assert seq.get_last_value() is None
    assert [next(seq), next(seq)] == [100, 101]
    assert seq.get_next_values(2) == range(102, 104)
    assert seq.get_next_value() == 104
    assert seq.get_last_value() == 104
    assert list(zip(range(2), seq, strict=False)) == [(0, 105), (1, 106)]


def test_rollback_gives_the_value_again(alias: str) -> None:
    from django.db import transaction

    from numbering.django import get_next_value

    name = fresh()
    assert get_next_value(name, using=alias) == 1
    taken = []

    def document() -> None:
        with transaction.atomic(using=alias):
            taken.append(get_next_value(name, using=alias))
            raise RuntimeError("the document failed to save")

    with pytest.raises(RuntimeError):
        document()
    assert taken == [2]
    assert get_next_value(name, using=alias) == 2


def test_key_gives_the_same_number_again(alias: str, databases: dict[str, str]) -> None:
    from numbering.django import get_next_value

    name = fresh()
    first = get_next_value(name, using=alias, key="invoice:1")
    assert get_next_value(name, using=alias, key="invoice:2") == first + 1
    assert get_next_value(name, using=alias, key="invoice:1") == first
    check_gapless(create_engine(databases[alias]), name, keys=["invoice:1", "invoice:2"])


def test_delete_starts_again_and_keeps_the_ledger(alias: str, databases: dict[str, str]) -> None:
    from numbering.django import delete, get_last_value, get_next_value

    name = fresh()
    assert delete(name, using=alias) is False
    assert [get_next_value(name, using=alias) for _ in range(3)] == [1, 2, 3]
    assert delete(name, using=alias) is True
    assert get_last_value(name, using=alias) is None
    assert get_next_value(name, using=alias) == 1
    allocator = Allocator(databases[alias])
    try:
        reports = {r.sequence: r for r in allocator.audit() if r.sequence.startswith(name)}
        [archived] = [n for n in reports if n != name]
        assert archived.startswith(f"{name}:deleted:")
        assert reports[archived].ok
        assert reports[archived].values == 3
        assert reports[name].ok
        assert reports[name].values == 1
    finally:
        allocator.close()


def test_numbers_interleave_with_numbering_own_transactions(
    alias: str, databases: dict[str, str]
) -> None:
    """Django transactions and numbering's allocator on one sequence: one ledger."""
    from numbering.django import get_next_value

    name = fresh()
    allocator = Allocator(databases[alias])
    try:
        got = []
        for i in range(4):
            got.append(get_next_value(name, using=alias))
            got.append(allocator.next_value(name, key=f"own:{i}"))
        assert got == list(range(1, 9))
        check_gapless(allocator.engine, name)
    finally:
        allocator.close()


# -- two connections ---------------------------------------------------------------------


@contextlib.contextmanager
def held(alias: str, name: str, *, rollback: bool = False) -> Iterator[dict[str, Any]]:
    """Another thread takes the next value of ``name`` in a transaction and keeps it open
    for the block; at the end it commits (or rolls back) and is joined. Yields its outcome
    (the value it took, once it has finished)."""
    from django.db import transaction

    from numbering.django import get_next_value

    holding, release = threading.Event(), threading.Event()

    def first() -> int:
        with transaction.atomic(using=alias):
            value = get_next_value(name, using=alias)
            holding.set()
            assert release.wait(WAIT)
            if rollback:
                transaction.set_rollback(True, using=alias)
            return value

    thread, out = in_thread(first)
    assert holding.wait(WAIT), out
    try:
        yield out
    finally:
        release.set()
        thread.join(WAIT)


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_a_second_caller_waits_for_the_first(alias: str, outcome: str) -> None:
    from numbering.django import get_next_value

    name = fresh()
    assert get_next_value(name, using=alias) == 1
    with held(alias, name, rollback=outcome == "rollback") as a:
        thread_b, b = in_thread(lambda: get_next_value(name, using=alias))
        if alias != "default":
            wait_until(lambda: waiting_for_lock(alias), "the second caller waits for the lock")
        assert "value" not in b  # still waiting: it can only finish after the release
    thread_b.join(WAIT)
    assert a == {"value": 2}
    assert b == {"value": 3 if outcome == "commit" else 2}


def test_nowait_raises_at_once(server_alias: str) -> None:
    """(Not on SQLite: a second transaction waits in BEGIN IMMEDIATE, before any
    statement; django-sequences ignores nowait there too.)"""
    from django.db import OperationalError

    from numbering.django import get_next_value

    name = fresh()
    get_next_value(name, using=server_alias)
    with held(server_alias, name) as a:
        thread_b, b = in_thread(lambda: get_next_value(name, nowait=True, using=server_alias))
        thread_b.join(WAIT)  # returns at once, while the first still holds the sequence
    assert isinstance(b.get("error"), OperationalError), b
    assert a == {"value": 2}
    assert get_next_value(name, using=server_alias) == 3


def test_different_sequences_never_block_each_other(server_alias: str) -> None:
    """(Not on SQLite: one writer at a time, whatever the sequence.)"""
    from numbering.django import get_next_value

    one, two = fresh(), fresh()
    get_next_value(one, using=server_alias)
    get_next_value(two, using=server_alias)
    with held(server_alias, one) as a:
        # A new sequence too: creating it must not wait for the holder either.
        thread_b, b = in_thread(
            lambda: (
                get_next_value(two, using=server_alias),
                get_next_value(fresh(), using=server_alias),
            )
        )
        thread_b.join(WAIT)  # were it blocked, it would wait for the release: never comes
        finished = not thread_b.is_alive()
    assert finished, "taking another sequence's number waited for the holder"
    assert b == {"value": (2, 1)}
    assert a == {"value": 2}


def test_many_threads_one_sequence_gapless(alias: str, databases: dict[str, str]) -> None:
    from django.db import transaction

    from numbering.django import get_next_value

    name = fresh()

    def worker(n: int) -> list[int]:
        got = []
        for i in range(25):
            with transaction.atomic(using=alias):
                got.append(get_next_value(name, using=alias, key=f"t{n}:{i}"))
        return got

    threads = [in_thread(lambda n=n: worker(n)) for n in range(6)]
    for thread, _ in threads:
        thread.join(WAIT * 2)
    values = []
    for _, out in threads:
        assert "value" in out, out
        assert out["value"] == sorted(out["value"])
        values += out["value"]
    assert sorted(values) == list(range(1, 151))
    keys = [f"t{n}:{i}" for n in range(6) for i in range(25)]
    check_gapless(create_engine(databases[alias]), name, keys=keys)


def test_flush_sets_every_sequence_aside(alias: str, databases: dict[str, str]) -> None:
    """What Django's test runner does between TransactionTestCase tests: every name
    starts afresh, and the ledger keeps what it holds (renamed sequences), all audited
    gapless. (django-sequences' own test suite, run against numbering.django, needs it.)"""
    from django.core.management import call_command

    from numbering.django import get_last_value, get_next_value

    name, periodic = fresh(), fresh()
    assert [get_next_value(name, using=alias) for _ in range(2)] == [1, 2]
    allocator = Allocator(databases[alias])
    try:
        allocator.create_sequence(periodic, period="year", format="{period}-{number}")
        allocator.next_value(periodic, key=f"{periodic}:1", date="2026-03-01")
        call_command("flush", database=alias, interactive=False, verbosity=0)
        assert get_last_value(name, using=alias) is None
        assert get_next_value(name, using=alias) == 1
        names = {info.name for info in allocator.sequences()}
        assert periodic not in names
        assert any(n.startswith(f"{periodic}:deleted:") for n in names)
        reports = [r for r in allocator.audit() if r.sequence.startswith((name, periodic))]
        assert all(r.ok for r in reports), reports
        # name afresh (1), name set aside (1, 2), periodic set aside with its 2026 counter
        assert sorted(r.values for r in reports if r.values) == [1, 1, 2]
        assert any(r.sequence.endswith("/2026") and r.values == 1 for r in reports)
    finally:
        allocator.close()


def test_take_over_django_sequences(alias: str, databases: dict[str, str]) -> None:
    """Counters filled by the real django-sequences continue in numbering right after
    their last value; a dry run changes nothing; a second run does nothing; a counter
    moved on by old code after the take-over, or a name numbering cannot take, fails the
    whole run with the reason."""
    import sequences
    from django.core.management import CommandError, call_command

    from numbering.django import get_next_value

    def takeover(*args: str) -> str:
        out = io.StringIO()
        call_command("numbering_takeover", "--database", alias, *args, stdout=out)
        return out.getvalue()

    a, b = fresh(), f"Facture n\u00b0 {fresh()}"  # any text but "/" is a name
    for _ in range(3):
        sequences.get_next_value(a, using=alias)
    assert sequences.get_next_value(b, initial_value=100, using=alias) == 100
    sequences.get_next_value("bad/name", using=alias)
    with pytest.raises(CommandError, match="'bad/name': invalid sequence name"):
        takeover()
    sequences.delete("bad/name", using=alias)

    planned = takeover("--dry-run")
    assert f"{a}: django-sequences gave up to 3; numbering gives 4 next" in planned
    assert "dry run: nothing was changed" in planned
    assert get_next_value(fresh(), using=alias) == 1  # (numbering works meanwhile)
    output = takeover()
    assert f"{b}: django-sequences gave up to 100; numbering gives 101 next" in output
    assert get_next_value(a, using=alias) == 4
    assert get_next_value(b, using=alias) == 101
    assert f"{a}: already taken over after 3" in takeover()

    sequences.get_next_value(a, using=alias)  # old code still running: gives 4 again
    with pytest.raises(CommandError, match=r"values 4\.\.4 may have been given twice"):
        takeover()
    engine = create_engine(databases[alias])
    check_gapless(engine, a)  # numbering's ledger: 4 only (1..3 were django-sequences')
    check_gapless(engine, b)
    engine.dispose()
    sequences.delete(a, using=alias)  # so that later take-overs here do not fail on it


def test_looping_calls_agree_with_the_stored_bounds(alias: str, databases: dict[str, str]) -> None:
    """A looping call on a sequence that does not loop yet starts it looping at its
    bounds; a looping sequence taken over from django-sequences loops exactly where
    django-sequences would have, with its earlier values in the ledger as one block;
    bounds that cannot agree are refused, naming both."""
    import sequences
    from django.core.management import call_command
    from django.db import connections

    from numbering.django import get_next_value
    from numbering.errors import InvalidRequestError

    plain = fresh()
    assert [get_next_value(plain, using=alias) for _ in range(3)] == [1, 2, 3]
    got = [get_next_value(plain, 1, 5, using=alias) for _ in range(4)]
    assert got == [4, 1, 2, 3]
    with pytest.raises(
        InvalidRequestError, match=r"reset_value=5 .* asks for initial_value=1, reset_value=7"
    ):
        get_next_value(plain, 1, 7, using=alias)
    late = fresh()  # a plain sequence already past the call's reset_value
    assert [get_next_value(late, using=alias) for _ in range(5)] == [1, 2, 3, 4, 5]
    with pytest.raises(InvalidRequestError, match=r"does not loop \(initial_value=1\)"):
        get_next_value(late, 1, 5, using=alias)

    # The real django-sequences gives three values; numbering takes the counter over. (Its
    # looping path ignores `using`, so the values are taken by its upsert path, which
    # leaves the same row: last = 3.)
    ours, theirs = fresh(), fresh()
    for name in (ours, theirs):
        assert [sequences.get_next_value(name, using=alias) for _ in range(3)] == [1, 2, 3]
    call_command("numbering_takeover", "--database", alias, stdout=io.StringIO())
    # What django-sequences gives next at bounds 1..4: 4, then back to 1.
    expected = [4, 1, 2, 3, 4, 1]
    if alias == "default":  # there its looping path runs on the right database: check it
        assert [sequences.get_next_value(theirs, 1, 5) for _ in range(6)] == expected
    assert [get_next_value(ours, 1, 5, using=alias) for _ in range(6)] == expected
    engine = create_engine(databases[alias])
    by_key = check_gapless(engine, ours)
    assert by_key[next(key for key in by_key if key.startswith("takeover:"))] == [1, 2, 3]
    check_gapless(engine, plain)
    engine.dispose()
    out = io.StringIO()
    call_command("numbering_audit", ours, "--database", alias, stdout=out)
    assert f"{ours}: ok" in out.getvalue()
    with connections[alias].cursor() as cursor:  # (later take-overs here)
        cursor.execute("DELETE FROM sequences_sequence WHERE name = %s", [theirs])


def test_django_and_a_worker_interleave_on_one_sequence(
    alias: str, databases: dict[str, str], redis_urls: tuple[str, str], tmp_path: Path
) -> None:
    """One sequence, three kinds of callers at once: client processes through a real
    `numbering worker`, Django threads taking numbers in their own transactions, and
    Django threads asking the worker after their commit (number_on_commit). One ledger,
    gapless, each key one number, every client process's history checked."""
    from django.conf import settings
    from django.db import transaction

    from numbering.django import get_next_value, queue

    name = fresh()
    assert get_next_value(name, using=alias, key=f"{name}-first") == 1
    stack = Stack(databases[alias], *redis_urls, tmp_path)
    settings.NUMBERING = {"BROKER_URL": redis_urls[0], "RESULT_BACKEND": redis_urls[1]}
    queue.reset()
    try:
        stack.worker("--sequence", name)
        clients = stack.start_clients([(name, f"{name}-c{c}", 40) for c in range(2)])

        def django_caller(n: int) -> list[int]:
            for i in range(20):
                with transaction.atomic(using=alias):
                    get_next_value(name, using=alias, key=f"{name}-d{n}:{i}")
            answered: list[int] = []
            for i in range(10):
                with transaction.atomic(using=alias):
                    queue.number_on_commit(
                        name,
                        key=f"{name}-q{n}:{i}",
                        then=lambda block: answered.append(block.value),
                        using=alias,
                    )
            return answered

        threads = [in_thread(lambda n=n: django_caller(n)) for n in range(3)]
        results = clients.wait()
        for thread, out in threads:
            thread.join(WAIT * 2)
            assert len(out.get("value", ())) == 10, out
            assert out["value"] == sorted(out["value"])
        assert len(results) == 2
        django_keys = [f"{name}-first"] + [
            f"{name}-{kind}{n}:{i}"
            for n in range(3)
            for kind, count in (("d", 20), ("q", 10))
            for i in range(count)
        ]
        client_keys = [f"{name}-c{c}:{i}" for c in range(2) for i in range(40)]
        by_key = stack.check(name, client_keys + django_keys, unrecorded=django_keys)
        assert len(by_key) == 1 + 3 * 30 + 2 * 40
    finally:
        stack.close()
        del settings.NUMBERING
        queue.reset()


def test_manage_py_check_reports_bad_settings(databases: dict[str, str]) -> None:
    from django.test import override_settings

    from numbering.django.checks import numbering_settings, sqlite_warnings

    if django.VERSION >= (5, 1):
        assert numbering_settings() == []  # the tests' own settings are fine
    else:  # no transaction_mode before 5.1: the warning says what to do instead
        [warning] = numbering_settings()
        assert warning.id == "numbering.W001"
        assert "upgrade to Django 5.1+" in warning.hint
    with override_settings(NUMBERING={"SHARDS": "zero"}):
        [error] = [found for found in numbering_settings() if found.level >= 40]  # ERROR
        assert error.id == "numbering.E001"
        assert "NUMBERING_SHARDS must be a whole number" in error.msg
    deferred = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
    [warning] = sqlite_warnings(deferred)
    assert warning.id == "numbering.W001"


def test_the_admin_reads_freezes_and_voids(databases: dict[str, str]) -> None:
    """Sequences and the ledger in the admin: read-only lists, freeze and unfreeze, void
    with a reason (asked for first), nothing editable or deletable."""
    from django.contrib.auth.models import User
    from django.test import Client

    from numbering.django import get_next_value
    from numbering.django.models import Counter, LedgerEntry
    from numbering.errors import SequenceFrozenError

    name = fresh()
    allocator = Allocator(databases["default"])
    try:
        allocator.create_sequence(name, format="INV-{number:04d}")
        get_next_value(name, key=f"{name}:1")
        get_next_value(name, key=f"{name}:2")
        user = User.objects.create_superuser(fresh(), password="x")
        browser = Client()
        browser.force_login(user)

        page = browser.get("/admin/numbering/counter/", {"q": name})
        assert page.status_code == 200
        assert name in page.content.decode()
        assert "INV-0003" in page.content.decode()  # the preview of the next number
        counter = Counter.objects.get(name=name)
        assert browser.get(f"/admin/numbering/counter/{counter.pk}/delete/").status_code == 403
        freeze = {"action": "freeze", "_selected_action": [counter.pk]}
        assert browser.post("/admin/numbering/counter/", freeze).status_code == 302
        with pytest.raises(SequenceFrozenError):
            get_next_value(name)
        unfreeze = {"action": "unfreeze", "_selected_action": [counter.pk]}
        browser.post("/admin/numbering/counter/", unfreeze)
        assert get_next_value(name, key=f"{name}:3") == 3

        entry = LedgerEntry.objects.get(request_key=f"{name}:2")
        assert browser.get("/admin/numbering/ledgerentry/").status_code == 200
        void = {"action": "void", "_selected_action": [entry.pk]}
        asked = browser.post("/admin/numbering/ledgerentry/", void)
        assert asked.status_code == 200
        assert "Void numbers" in asked.content.decode()  # the reason is asked first
        assert LedgerEntry.objects.get(pk=entry.pk).status == "assigned"
        done = browser.post(
            "/admin/numbering/ledgerentry/", {**void, "apply": "Void", "reason": "typo"}
        )
        assert done.status_code == 302
        voided = LedgerEntry.objects.get(pk=entry.pk)
        assert (voided.status, voided.void_reason) == ("voided", "typo")
        change = f"/admin/numbering/ledgerentry/{entry.pk}/change/"
        assert browser.get(change).status_code == 200  # view only
        assert browser.post(change, {"status": "assigned"}).status_code == 403
        [report] = allocator.audit(name)
        assert report.ok
        assert report.voided == 1
    finally:
        allocator.close()


def test_manage_py_numbering_audit(alias: str) -> None:
    from django.core.management import CommandError, call_command
    from django.db import connections

    from numbering.django import get_next_value

    name = fresh()
    get_next_value(name, using=alias)
    get_next_value(name, using=alias)
    out = io.StringIO()
    call_command("numbering_audit", name, "--database", alias, stdout=out)
    assert f"{name}: ok: last value 2, cycle 0, 2 value(s)" in out.getvalue()
    with connections[alias].cursor() as cursor:  # a counter moved by hand
        cursor.execute("UPDATE numbering_sequence SET last_value = 3 WHERE name = %s", [name])
    out = io.StringIO()
    with pytest.raises(CommandError, match="1 of 1 sequence"):
        call_command("numbering_audit", name, "--database", alias, stdout=out)
    assert "counter disagrees with ledger" in out.getvalue()


def test_manage_py_numbering_status(
    alias: str, databases: dict[str, str], redis_urls: tuple[str, str], tmp_path: Path
) -> None:
    """Last and next value of every sequence; with the queue path set up, the queue and
    whether a worker consumes it (alive while one runs, NONE once it is killed)."""
    from django.conf import settings
    from django.core.management import CommandError, call_command

    from numbering.django import get_next_value, queue

    name = fresh()
    for _ in range(3):
        get_next_value(name, using=alias)
    out = io.StringIO()
    call_command("numbering_status", "--database", alias, stdout=out)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["SEQUENCE", "LAST", "NEXT"]
    assert [name, "3", "4"] in [line.split() for line in lines]

    stack = Stack(databases[alias], *redis_urls, tmp_path)
    settings.NUMBERING = {"BROKER_URL": redis_urls[0], "RESULT_BACKEND": redis_urls[1]}
    queue.reset()
    try:
        worker = stack.worker("--sequence", name)

        def status() -> dict[str, Any]:
            out = io.StringIO()
            call_command("numbering_status", "--database", alias, "--json", stdout=out)
            [row] = [row for row in json.loads(out.getvalue()) if row["sequence"] == name]
            return row

        row = status()
        assert (row["last_value"], row["next_value"], row["waiting"]) == (3, 4, 0)
        assert row["consumer"] is True
        out = io.StringIO()
        call_command("numbering_status", "--database", alias, "--check", stdout=out)
        header = out.getvalue().splitlines()[0].split()
        assert header[3:] == ["WAITING", "IN", "FLIGHT", "QUARANTINED", "CONSUMER", "OLDEST"]
        worker.kill()
        wait_until(lambda: status()["consumer"] is False, "the killed worker's lock released")
        with socket.socket() as probe:  # a port nothing listens on
            probe.bind(("127.0.0.1", 0))
            closed = probe.getsockname()[1]
        settings.NUMBERING = {"BROKER_URL": f"redis://127.0.0.1:{closed}/0"}
        with pytest.raises(CommandError, match=f"the broker at redis://127.0.0.1:{closed}/0 did"):
            call_command("numbering_status", "--database", alias, stdout=io.StringIO())
    finally:
        stack.close()
        del settings.NUMBERING
        queue.reset()


def test_postgresql_driver_is_the_one_meant(databases: dict[str, str]) -> None:
    from django.db import connections

    from numbering.backends import backend_for
    from numbering.backends.psycopg2 import Psycopg2Store
    from numbering.django import get_next_value
    from numbering.django.connection import borrowed

    get_next_value(fresh(), using="postgresql")
    driver = type(connections["postgresql"].connection).__module__.split(".")[0]
    assert driver == ("psycopg2" if os.environ.get("TEST_DJANGO_WITHOUT_PSYCOPG3") else "psycopg")
    # Either way the store sends several statements a round trip (Django's psycopg 3
    # connections bind on the client side, as psycopg2 does).
    with borrowed(connections["postgresql"]) as bind:
        assert isinstance(backend_for(bind).store(bind), Psycopg2Store)


def _inner_run(tmp_path: Path, env: dict[str, str], *select: str) -> str:
    """This file again, in a child process with ``env``; the child-run tests deselected."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-k", " and ".join(["not psycopg2 and not lts", *select]),
         "--basetemp", str(tmp_path / "inner")],
        env={**os.environ, **env},
        cwd=Path(__file__).parents[2],
        capture_output=True,
        text=True,
        timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout
    assert "skipped" not in done.stdout
    return done.stdout


def test_the_django_release_meant() -> None:
    """The child run of test_django_4_2_lts runs on Django 4.2 indeed."""
    wanted = os.environ.get("TEST_DJANGO_RELEASE")
    release = ".".join(map(str, django.VERSION[:2]))
    assert release == wanted if wanted else django.VERSION >= (5, 2)


def test_django_4_2_lts(tmp_path: Path) -> None:
    """This file again on Django 4.2 LTS, installed beside the project's own Django (in
    the virtualenv, ``django-4.2/``, once) and put first on the child's path."""
    target = Path(sys.prefix) / "django-4.2"
    if not (target / "django").is_dir():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target),
             "django>=4.2,<4.3"],
            check=True,
            timeout=600,
        )  # fmt: skip
    path = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))
    _inner_run(tmp_path, {"PYTHONPATH": path, "TEST_DJANGO_RELEASE": "4.2"})


def test_django_on_psycopg2(tmp_path: Path) -> None:
    """This file again, in a process where Django's PostgreSQL backend cannot import
    psycopg 3 and so runs on psycopg2 (this process's Django runs on psycopg 3)."""
    from django.db.backends.postgresql.psycopg_any import is_psycopg3

    assert is_psycopg3
    _inner_run(tmp_path, {"TEST_DJANGO_WITHOUT_PSYCOPG3": "1"}, "postgresql")
