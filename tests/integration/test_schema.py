"""The migrations build exactly the schema the code describes, on both backends."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from numbering import create_engine, init_db
from numbering.config import ENV
from numbering.migrations import VERSION_TABLE, current_revision, head_revision
from numbering.schema import metadata


def test_migrations_match_the_models(db_url: str) -> None:
    engine = create_engine(db_url)
    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"version_table": VERSION_TABLE, "compare_type": True}
        )
        differences = compare_metadata(context, metadata)
    assert differences == []
    assert current_revision(engine) == head_revision()
    tables = set(sa.inspect(engine).get_table_names())
    assert {"numbering_sequence", "numbering_ledger", VERSION_TABLE} <= tables
    assert "alembic_version" not in tables  # the application's own Alembic table stays free


def test_concurrent_init_db_from_several_processes(pg_empty_url: str) -> None:
    """Several workers starting at once on an empty database all succeed."""
    env = {**os.environ, "NUMBERING_DATABASE_URL": pg_empty_url}
    env = {k: v for k, v in env.items() if not k.startswith("NUMBERING_") or k in ENV.values()}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "numbering", "init-db"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0, 0], outputs
    said = sorted(out.split(" to revision")[0].split(" at revision")[0] for out, _ in outputs)
    assert said == [
        "schema already",
        "schema already",
        "schema already",
        "schema upgraded from empty",
    ]
    assert current_revision(create_engine(pg_empty_url)) == head_revision()


def test_concurrent_init_db_from_threads(pg_empty_url: str) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def migrate() -> None:
        engine = create_engine(pg_empty_url, poolclass=sa.pool.NullPool)
        barrier.wait()
        try:
            init_db(engine)
        except BaseException as exc:  # asserted below
            errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert current_revision(create_engine(pg_empty_url)) == head_revision()
