"""What one requester does for each system under test, one operation at a time.

Each ``System`` opens its connections in the requester process (after the fork) and then
performs operations ``op(i)``; ``check`` verifies afterwards that what it handed out is
gapless (where the system promises that).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from numbering import Client, create_engine

# The "other work" of the web scenario: 5 ms inside the document's own transaction.
WORK = {"postgresql": "SELECT pg_sleep(0.005)", "mysql": "DO SLEEP(0.005)"}


@dataclass
class Env:
    database_url: str
    redis_broker: str
    redis_replies: str
    amqp_broker: str
    celery_broker: str
    celery_backend: str
    #: Another database of the broker's Redis server, for the reply lists of the
    #: "replies in another database" layout (Celery's usual: broker 0, results 1).
    redis_replies_apart: str = ""


Op = Callable[[int], Any]


def documents_table(name: str) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {name} "
        "(doc_key VARCHAR(200) PRIMARY KEY, number BIGINT NOT NULL)"
    )


# -- numbering --------------------------------------------------------------------------------


def numbering_op(
    env: Env, broker: str, sequence: str, web: bool, shards: int | None, replies: str = ""
) -> Op:
    client = Client(broker, replies or env.redis_replies, shards=shards, timeout=60)
    engine = create_engine(env.database_url, pool_size=1) if web else None
    tag = f"{os.getpid()}"
    table = f"docs_{sequence.replace('-', '_')}"

    def op(i: int) -> Any:
        key = f"{sequence}:{tag}:{i}"
        number = client.next_value(sequence, key=key)
        if engine is not None:  # the document, in its own short transaction
            with engine.begin() as conn:
                conn.exec_driver_sql(WORK[conn.dialect.name])
                conn.exec_driver_sql(
                    f"INSERT INTO {table} (doc_key, number) VALUES (%(k)s, %(n)s)",
                    {"k": key, "n": number},
                )
        return number

    return op


def many_sequences_op(env: Env, broker: str, names: list[str], shards: int) -> Op:
    client = Client(broker, env.redis_replies, shards=shards, timeout=60)
    tag = f"{os.getpid()}"

    def op(i: int) -> Any:
        name = names[(hash(tag) + i) % len(names)]
        return client.next_value(name, key=f"{name}:{tag}:{i}")

    return op


# -- django-sequences ---------------------------------------------------------------------------


def setup_django(database_url: str) -> None:
    """Configure Django for django-sequences on the benchmark database (in the parent,
    before forking; connections are opened by each requester)."""
    import django
    from django.conf import settings

    if settings.configured:
        return
    url = make_url(database_url)
    mysql = url.get_backend_name() in ("mysql", "mariadb")
    settings.configure(
        DATABASES={
            "default": {
                # On MySQL, Django's backend on mysqlclient: django-sequences then takes
                # its INSERT ... ON DUPLICATE KEY UPDATE path.
                "ENGINE": "django.db.backends.mysql" if mysql else "django.db.backends.postgresql",
                "NAME": url.database,
                "USER": url.username or ("root" if mysql else "postgres"),
                "PASSWORD": url.password or "",
                "HOST": url.host or "127.0.0.1",
                "PORT": str(url.port or (3306 if mysql else 5432)),
            }
        },
        # numbering.django: the drop-in, measured on the same workload.
        INSTALLED_APPS=["sequences", "numbering.django"],
        USE_TZ=True,
    )
    django.setup()
    from django.core.management import call_command
    from django.db import connections

    call_command("migrate", verbosity=0)
    connections.close_all()


def django_sequences_op(sequence: str, web: bool, *, dropin: bool = False) -> Op:
    """django-sequences' recipe, or with ``dropin`` the same code on numbering.django's
    ``get_next_value`` (the import is the only difference)."""
    from django.db import connection, transaction

    if dropin:
        from numbering.django import get_next_value
    else:
        from sequences import get_next_value

    table = f"docs_{sequence.replace('-', '_')}"
    tag = f"{os.getpid()}"

    def op(i: int) -> Any:
        # The django-sequences recipe: the counter row stays locked until COMMIT.
        with transaction.atomic():
            number = get_next_value(sequence)
            if web:
                with connection.cursor() as cursor:
                    cursor.execute(WORK[connection.vendor])
                    cursor.execute(
                        f"INSERT INTO {table} (doc_key, number) VALUES (%s, %s)",
                        [f"{tag}:{i}", number],
                    )
        return number

    return op


# -- hand-written SELECT ... FOR UPDATE counter -------------------------------------------------


def for_update_op(env: Env, sequence: str, web: bool) -> Op:
    engine = create_engine(env.database_url, pool_size=1)
    table = f"docs_{sequence.replace('-', '_')}"
    tag = f"{os.getpid()}"

    def op(i: int) -> Any:
        with engine.begin() as conn:
            last = conn.exec_driver_sql(
                "SELECT last FROM bench_counter WHERE name = %(n)s FOR UPDATE", {"n": sequence}
            ).scalar_one()
            conn.exec_driver_sql(
                "UPDATE bench_counter SET last = %(l)s WHERE name = %(n)s",
                {"l": last + 1, "n": sequence},
            )
            if web:
                conn.exec_driver_sql(WORK[conn.dialect.name])
                conn.exec_driver_sql(
                    f"INSERT INTO {table} (doc_key, number) VALUES (%(k)s, %(v)s)",
                    {"k": f"{tag}:{i}", "v": last + 1},
                )
        return last + 1

    return op


# -- PostgreSQL nextval (not gapless: the ceiling) ----------------------------------------------


def nextval_op(env: Env) -> Op:
    engine = create_engine(env.database_url, pool_size=1, isolation_level="AUTOCOMMIT")
    conn = engine.connect()

    def op(i: int) -> Any:
        return conn.exec_driver_sql("SELECT nextval('bench_nextval')").scalar_one()

    return op


# -- stock Celery no-op round trip --------------------------------------------------------------


def celery_noop_op(env: Env) -> Op:
    from benchmarks.noop import make_app

    app = make_app(env.celery_broker, env.celery_backend)

    def op(i: int) -> Any:
        return app.send_task("bench.noop", queue="bench.noop").get(timeout=60)

    return op


def gapless_documents(database_url: str, sequence: str) -> tuple[int, bool]:
    """(documents, numbers are exactly 1..N) for a web scenario's documents table."""
    engine = create_engine(database_url)
    table = f"docs_{sequence.replace('-', '_')}"
    with engine.connect() as conn:
        count, distinct, low, high = conn.execute(
            sa.text(
                f"SELECT count(*), count(DISTINCT number), min(number), max(number) FROM {table}"
            )
        ).one()
    engine.dispose()
    return count, count == 0 or (count == distinct and low == 1 and high == count)
