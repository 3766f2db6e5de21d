"""The `numbering` command run as a user runs it: a subprocess, its output, its exit code."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from ledger_check import check_gapless

from numbering import create_engine
from numbering.migrations import head_revision

pytestmark = pytest.mark.acceptance


class CLI:
    def __init__(self, database_url: str, cwd: Path) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBERING_")}
        self.env["NUMBERING_DATABASE_URL"] = database_url
        self.cwd = cwd

    def __call__(
        self, *args: str, ok: bool = True, status: int = 1
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "numbering", *args],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.cwd,
            timeout=120,
        )
        if ok:
            assert done.returncode == 0, done.stderr
        else:
            assert done.returncode == status, (done.returncode, done.stdout, done.stderr)
            assert "Traceback" not in done.stderr
            assert len(done.stderr.strip().splitlines()) == 1, done.stderr
            assert done.stderr.startswith("error: ")
        return done


@pytest.fixture(params=["postgresql", "sqlite"])
def cli(request: pytest.FixtureRequest, tmp_path: Path) -> CLI:
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_empty_url")
    else:
        url = f"sqlite:///{tmp_path / 'cli.db'}"  # init-db below creates it
    return CLI(url, tmp_path)


def test_quick_start_path(cli: CLI) -> None:
    head = head_revision()
    assert f"schema upgraded from empty to revision {head}" in cli("init-db").stdout
    assert f"schema already at revision {head}" in cli("init-db").stdout
    assert "next value 1" in cli("sequence", "create", "invoices").stdout
    assert cli("next", "--direct", "invoices", "--key", "invoice:1").stdout == "1\n"
    assert cli("next", "--direct", "invoices", "--key", "invoice:1").stdout == "1\n"
    assert cli("next", "--direct", "invoices", "--count", "3", "--key", "batch").stdout == "2..4\n"
    shown = json.loads(
        cli("next", "--direct", "invoices", "--json", "--reference", '{"doc": 5}').stdout
    )
    assert (shown["value"], shown["resent"], shown["key"].startswith("auto:")) == (5, False, True)

    listing = cli("sequence", "list").stdout.splitlines()
    assert listing[1].split() == ["invoices", "5", "6", "0"]
    show = json.loads(cli("sequence", "show", "invoices", "--json").stdout)
    assert (show["last_value"], show["next_value"]) == (5, 6)

    audit = cli("audit")
    assert "invoices: ok: last value 5, cycle 0, 5 value(s) in 3 assignment(s)" in audit.stdout

    exported = list(csv.DictReader(io.StringIO(cli("export", "invoices").stdout)))
    assert [(r["value"], r["last"], r["request_key"]) for r in exported[:3]] == [
        ("1", "1", "invoice:1"),
        ("2", "4", "batch"),
        ("5", "5", shown["key"]),
    ]
    assert json.loads(exported[2]["reference"]) == {"doc": 5}
    as_json = json.loads(cli("export", "invoices", "--format", "json").stdout)
    assert [row["value"] for row in as_json] == [1, 2, 5]


def test_policies_from_the_command_line(cli: CLI) -> None:
    cli("init-db")
    created = cli(
        "sequence", "create", "inv", "--format", "INV-{year}-{number:05d}", "--period", "year",
        "--timezone", "Europe/Paris",
    )  # fmt: skip
    assert "sequence 'inv' ready; next value 1 (INV-" in created.stdout
    assert cli("next", "--direct", "inv", "--date", "2025-12-31").stdout == "1 INV-2025-00001\n"
    assert cli("next", "--direct", "inv", "--date", "2026-01-01", "--key", "d").stdout == (
        "1 INV-2026-00001\n"
    )
    shown = json.loads(cli("next", "--direct", "inv", "--date", "2025-05-05", "--json").stdout)
    assert (shown["formatted"], shown["period"]) == ("INV-2025-00002", "2025")
    assert (
        "sequence 'inv/2025' frozen" in cli("sequence", "freeze", "inv", "--period", "2025").stdout
    )
    refused = cli("next", "--direct", "inv", "--date", "2025-07-01", ok=False)
    assert "'inv/2025' is frozen" in refused.stderr
    cli("sequence", "unfreeze", "inv", "--period", "2025")
    assert cli("void", "inv", "--key", "d", "--reason", "duplicate invoice").stdout == (
        "voided 1 of 'inv' (key 'd'): duplicate invoice\n"
    )
    refused = cli("void", "inv", "--key", "d", "--reason", "again", ok=False)
    assert "already voided" in refused.stderr
    show = json.loads(cli("sequence", "show", "inv", "--date", "2025-03-01", "--json").stdout)
    assert (show["format"], show["period"], show["next_formatted"]) == (
        "INV-{year}-{number:05d}", "year", "INV-2025-00003"
    )  # fmt: skip
    period = json.loads(cli("sequence", "show", "inv", "--period", "2026", "--json").stdout)
    assert (period["name"], period["last_value"], period["next_value"]) == ("inv/2026", 1, 2)
    assert period["next_formatted"].endswith("-00002")
    audit = cli("audit", "inv").stdout
    assert "inv/2026: ok: last value 1, cycle 0, 1 value(s) in 1 assignment(s), 1 voided" in audit
    assert "  voided 1 (cycle 0, key 'd'): duplicate invoice" in audit
    exported = list(csv.DictReader(io.StringIO(cli("export", "inv").stdout)))
    assert [(r["sequence"], r["value"], r["status"], r["formatted"]) for r in exported] == [
        ("inv/2025", "1", "assigned", "INV-2025-00001"),
        ("inv/2025", "2", "assigned", "INV-2025-00002"),
        ("inv/2026", "1", "voided", "INV-2026-00001"),
    ]
    bad = cli("sequence", "create", "x", "--format", "{nope}", ok=False)
    assert "unknown field {nope}" in bad.stderr
    bad = cli("next", "--direct", "inv", "--date", "31/12/2025", ok=False)
    assert "invalid document date '31/12/2025'" in bad.stderr
    bad = cli("sequence", "create", "y", "--start-after", "nodot", ok=False)
    assert "--start-after takes TABLE.COLUMN" in bad.stderr


def test_bad_input_is_one_clear_line(cli: CLI) -> None:
    cli("init-db")
    cli("sequence", "create", "invoices")
    cases = {
        ("sequence", "create", "invoices"): "already exists",
        ("sequence", "create", "bad/name"): "invalid sequence name",
        ("sequence", "create", "loop", "--initial-value", "5", "--reset-value", "5"): (
            "must be greater than initial_value"
        ),
        ("sequence", "create", "neg", "--initial-value", "-3"): "at least 0",
        ("next", "--direct", "nosuch"): "'nosuch' does not exist",
        ("next", "--direct", "invoices", "--count", "0"): "count must be at least 1",
        ("next", "--direct", "invoices", "--key", ""): "must not be empty",
        ("next", "--direct", "invoices", "--key", "x" * 300): "300 characters long",
        ("next", "--direct", "invoices", "--reference", "{oops"): "not valid JSON",
        ("sequence", "show", "nosuch"): "does not exist",
        ("export", "nosuch"): "does not exist",
    }
    for args, message in cases.items():
        assert message in cli(*args, ok=False).stderr, args
    usage = {  # click's own parsing errors: one line too, exit status 2, with a hint
        ("next", "--direct", "invoices", "--count", "abc"): (
            "error: Invalid value for '--count': 'abc' is not a valid integer. "
            "(see 'numbering next --help')"
        ),
        ("next",): "error: Missing argument 'NAME'. (see 'numbering next --help')",
        ("nope",): "error: No such command 'nope'. (see 'numbering --help')",
        ("sequence", "create", "x", "--initial-value", "1.5"): "'1.5' is not a valid integer",
    }
    for args, message in usage.items():
        assert message in cli(*args, ok=False, status=2).stderr, args
    assert cli("audit").returncode == 0  # nothing was written by the failures


def test_bad_settings_and_unreachable_database(cli: CLI) -> None:
    cli.env["NUMBERING_ISOLATION_LEVEL"] = "read uncommitted"
    assert "READ UNCOMMITTED is refused" in cli("sequence", "list", ok=False).stderr
    del cli.env["NUMBERING_ISOLATION_LEVEL"]
    cli.env["NUMBERING_DATABASE_URL"] = "postgresql://app:hunter2@127.0.0.1:1/none"
    cli.env["NUMBERING_RETRY_TIMEOUT"] = "0.5"
    failed = cli("sequence", "list", ok=False)
    assert "cannot connect to the database" in failed.stderr
    assert "hunter2" not in failed.stderr
    config = cli("config")
    shown = config.stdout
    assert "NUMBERING_DATABASE_URL=postgresql://app:***@127.0.0.1:1/none" in shown
    assert "hunter2" not in shown
    # Where plain Celery callers must read their answers (issue 22).
    backend = next(line for line in shown.splitlines() if "RESULT_BACKEND=" in line)
    assert f"give them result_backend={backend.split('=', 1)[1]}" in config.stderr


def test_missing_schema_says_to_run_init_db(cli: CLI) -> None:
    assert "run `numbering init-db` first" in cli("sequence", "list", ok=False).stderr


def test_audit_finds_a_planted_gap_and_duplicate(cli: CLI) -> None:
    cli("init-db")
    cli("sequence", "create", "invoices")
    cli("sequence", "create", "clean")
    for i in range(6):
        cli("next", "--direct", "invoices", "--key", f"k{i}")
    cli("next", "--direct", "clean")
    engine = create_engine(cli.env["NUMBERING_DATABASE_URL"])
    check_gapless(engine, "invoices")
    with engine.begin() as conn:
        # The ledger refuses this (append-only trigger)...
        with pytest.raises(sa.exc.DatabaseError, match="append-only"), conn.begin_nested():
            conn.execute(sa.text("DELETE FROM numbering_ledger WHERE request_key = 'k2'"))
        # ... so the tamperer, with the owner's rights, removes the trigger first.
        if engine.dialect.name == "postgresql":
            conn.execute(sa.text("ALTER TABLE numbering_ledger DISABLE TRIGGER USER"))
        else:
            conn.execute(sa.text("DROP TRIGGER numbering_ledger_no_delete"))
            conn.execute(sa.text("DROP TRIGGER numbering_ledger_only_void"))
        # A gap: value 3 disappears. A duplicate: the unique constraint refuses a repeated
        # first value, but not a block that overlaps the next one, so k3 (value 4) grows
        # to cover 4..5, and 5 (k4) is given twice.
        conn.execute(sa.text("DELETE FROM numbering_ledger WHERE request_key = 'k2'"))
        conn.execute(sa.text("UPDATE numbering_ledger SET \"count\" = 2 WHERE request_key = 'k3'"))
    engine.dispose()

    done = subprocess.run(
        [sys.executable, "-m", "numbering", "audit"],
        capture_output=True,
        text=True,
        env=cli.env,
        cwd=cli.cwd,
        timeout=120,
    )
    assert done.returncode == 1
    assert "clean: ok" in done.stdout
    assert "invoices: PROBLEM" in done.stdout
    assert "gap: cycle 0 is missing values 3..3" in done.stdout
    assert "duplicate: cycle 0 gives values 5..5 more than once" in done.stdout
    assert done.stderr.strip() == "error: 1 of 2 sequence(s) failed the audit"
