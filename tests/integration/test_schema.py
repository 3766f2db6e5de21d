"""The migrations build exactly the schema the code describes, on both backends."""

from __future__ import annotations

import os
import subprocess
import sys

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from together import at_once

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
    # Each thread its own engine (the engine connects on first use: after the barrier).
    at_once(4, lambda _: init_db(create_engine(pg_empty_url, poolclass=sa.pool.NullPool)))
    assert current_revision(create_engine(pg_empty_url)) == head_revision()


def _check_names(engine: sa.Engine) -> set[str]:
    inspector = sa.inspect(engine)
    return {
        check["name"]
        for table in ("numbering_sequence", "numbering_ledger")
        for check in inspector.get_check_constraints(table)
    }


def test_check_constraints_are_named_once(db_url: str) -> None:
    names = _check_names(create_engine(db_url))
    assert "ck_numbering_ledger_count_positive" in names
    assert "ck_numbering_sequence_reset_after_initial" in names
    assert not [name for name in names if name.count("ck_") > 1]


def test_upgrade_renames_the_doubled_names_of_older_databases(pg_empty_url: str) -> None:
    engine = create_engine(pg_empty_url)
    init_db(engine, "0002")
    names = _check_names(engine)
    with engine.begin() as conn:  # what revision 0001 made before its names were fixed
        for table in ("numbering_sequence", "numbering_ledger"):
            for name in names:
                if name.startswith(f"ck_{table}_") and name != "ck_numbering_sequence_period_known":
                    conn.execute(
                        sa.text(
                            f'ALTER TABLE {table} RENAME CONSTRAINT "{name}" TO "ck_{table}_{name}"'
                        )
                    )
    assert "ck_numbering_ledger_ck_numbering_ledger_count_positive" in _check_names(engine)
    assert init_db(engine).after == head_revision()
    names = _check_names(engine)
    assert "ck_numbering_ledger_count_positive" in names
    assert not [name for name in names if name.count("ck_") > 1]
