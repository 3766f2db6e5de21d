"""The registry of database engines, and the rule that engine branches live in it."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa

from numbering.backends import (
    UnsupportedDatabase,
    backend_for,
    backend_named,
    names,
    normalize_url,
)
from numbering.database import translate_error
from numbering.errors import ConfigurationError, DatabaseError, LockNotAvailable
from numbering.settings import check_database_url

ROOT = Path(__file__).resolve().parents[2]


def test_registry_knows_every_engine() -> None:
    assert names() == ("postgresql", "sqlite", "mysql", "mariadb")
    assert backend_named("mariadb") is backend_named("mysql")  # SQLAlchemy's two names
    assert backend_for("mariadb://u@h/db").label == "MariaDB/MySQL"
    assert backend_for("sqlite:///x.db") is backend_named("sqlite")
    assert backend_for("postgresql+psycopg2://h/db").label == "PostgreSQL"
    assert backend_for("postgres://h/db").name == "postgresql"
    assert normalize_url("postgres://u@h/db") == "postgresql://u@h/db"


def test_unsupported_engine_is_one_clear_error_everywhere() -> None:
    with pytest.raises(
        UnsupportedDatabase, match="numbering supports postgresql, sqlite, mysql, mariadb"
    ):
        backend_for("oracle://h/db")
    with pytest.raises(ConfigurationError, match="unsupported database 'oracle'"):
        check_database_url("oracle://h/db")
    from numbering.database import create_engine

    with pytest.raises(DatabaseError, match="unsupported database 'oracle'"):
        create_engine("oracle://h/db")


def test_urls_choose_numbering_driver() -> None:
    url = sa.engine.make_url("postgresql://h/db")
    assert backend_for(url).normalize_url(url).drivername == "postgresql+psycopg2"
    other = sa.engine.make_url("postgresql+psycopg://h/db")
    assert backend_for(other).normalize_url(other) == other


def test_errors_go_to_the_engine_that_raised_them() -> None:
    busy = sa.exc.OperationalError("SELECT 1", {}, sqlite3.OperationalError("database is locked"))
    assert isinstance(translate_error(busy), LockNotAvailable)
    unknown = sa.exc.DBAPIError("SELECT 1", {}, RuntimeError("something else"))
    error = translate_error(unknown)
    assert type(error) is DatabaseError
    assert "something else" in str(error)


def test_sqlite_file_that_does_not_exist_is_absent(tmp_path: Path) -> None:
    backend = backend_named("sqlite")
    missing = sa.engine.make_url(f"sqlite:///{tmp_path / 'none.db'}")
    assert backend.database_absent(missing)
    (tmp_path / "some.db").touch()
    assert not backend.database_absent(sa.engine.make_url(f"sqlite:///{tmp_path / 'some.db'}"))
    assert not backend_named("postgresql").database_absent(sa.engine.make_url("postgresql://h/d"))


# Engine checks that belong in numbering/backends/: a branch on the engine's name.
_ENGINE_BRANCH = re.compile(
    r"dialect\.name\s*[!=]=|is_sqlite|get_backend_name\(\)\s*[!=]=|"
    r"drivername\.startswith|dialect\.driver\s*[!=]="
)


def test_no_engine_branch_outside_the_backends() -> None:
    """Every engine-specific decision is the backend's (the redesign issue): a new engine
    is one module, not one more branch in many."""
    found = []
    for directory in ("numbering", "tasks", "config"):
        for path in sorted((ROOT / directory).rglob("*.py")):
            if "backends" in path.relative_to(ROOT).parts:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if _ENGINE_BRANCH.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == []


@pytest.mark.parametrize(
    ("number", "message", "expected"),
    [
        (1213, "Deadlock found when trying to get lock", "DeadlockConflict"),
        (1205, "Lock wait timeout exceeded; try restarting transaction", "LockNotAvailable"),
        (3572, "Statement aborted because lock(s) could not be acquired", "LockNotAvailable"),
        (1020, "Record has changed since last read in table 'numbering_sequence'",
         "SerializationConflict"),
        (2013, "Lost connection to server during query", "ConnectionLost"),
        (2003, "Can't connect to server on '127.0.0.1'", "DatabaseUnavailable"),
        (1062, "Duplicate entry 'k' for key 'uq_numbering_ledger_request_key'",
         "KeyRaceConflict"),
        (1146, "Table 'app.numbering_sequence' doesn't exist", "DatabaseError"),
    ],
)  # fmt: skip
def test_mariadb_errors_are_told_apart_by_number(number: int, message: str, expected: str) -> None:
    MySQLdb = pytest.importorskip("MySQLdb")  # the mysql extra
    error = translate_error(
        sa.exc.OperationalError("SELECT 1", {}, MySQLdb.OperationalError(number, message))
    )
    assert type(error).__name__ == expected
    if number == 1146:
        assert "run `numbering init-db`" in str(error)
