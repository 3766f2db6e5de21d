"""What a new user tripped over on the command line (issue 15), run as a user runs it."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest
import sqlalchemy as sa
from ledger_check import check_gapless
from test_cli import CLI

from numbering import Allocator, Request, create_engine
from numbering.tasks.preflight import check_ledgers

pytestmark = pytest.mark.acceptance

MAX = 2**63 - 1


@pytest.fixture(params=["postgresql", "sqlite"])
def cli(request: pytest.FixtureRequest, tmp_path: Path) -> CLI:
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_empty_url")
    else:
        url = f"sqlite:///{tmp_path / 'cli.db'}"
    tool = CLI(url, tmp_path)
    tool("init-db")
    return tool


def test_a_sequence_at_the_64_bit_maximum_harms_nothing_else(cli: CLI) -> None:
    cli("sequence", "create", "near", "--initial-value", str(MAX - 9))
    assert cli("next", "near", "--direct", "--count", "10").stdout == f"{MAX - 9}..{MAX}\n"
    cli("sequence", "create", "demo-invoices")
    cli("sequence", "create", "tickets", "--max-value", "3")
    cli("next", "tickets", "--direct", "--count", "3")
    # The worker's start-up check for another sequence (it once failed with "bigint out
    # of range" for every worker on the database), and for the full one itself.
    engine = create_engine(cli.env["NUMBERING_DATABASE_URL"])
    try:
        assert check_ledgers(engine, ["demo-invoices"]) == []
        assert check_ledgers(engine, ["near", "tickets"]) == []
    finally:
        engine.dispose()
    rows = {
        line.split()[0]: line.split()[1:] for line in cli("sequence", "list").stdout.splitlines()
    }
    assert rows["near"] == [str(MAX), "exhausted", "0"]
    assert rows["tickets"] == ["3", "exhausted", "0"]
    assert rows["demo-invoices"] == ["-", "1", "0"]
    shown = json.loads(cli("sequence", "show", "near", "--json").stdout)
    assert (shown["next_value"], shown["exhausted"]) == (None, True)
    assert "next_value:     exhausted" in cli("sequence", "show", "tickets").stdout
    refused = cli("next", "near", "--direct", ok=False)
    assert "sequence exhausted" in refused.stderr
    assert f"near: ok: last value {MAX}" in cli("audit").stdout
    exported = list(csv.DictReader(io.StringIO(cli("export", "near").stdout)))
    assert [(r["value"], r["last"]) for r in exported] == [(str(MAX - 9), str(MAX))]


def test_a_resend_with_another_date_is_refused(cli: CLI) -> None:
    cli("sequence", "create", "fy", "--format", "INV-{year}-{number:06d}", "--period", "year")
    first = cli("next", "fy", "--direct", "--date", "2027-01-01", "--key", "d2").stdout
    assert first == "1 INV-2027-000001\n"
    refused = cli("next", "fy", "--direct", "--key", "d2", "--date", "2025-01-01", ok=False)
    assert "request key 'd2' was already used for a request in period 2027, not 2025" in (
        refused.stderr
    )
    # The same date, or none (the caller left it to the worker), is a plain resend.
    assert cli("next", "fy", "--direct", "--key", "d2", "--date", "2027-06-30").stdout == first
    assert cli("next", "fy", "--direct", "--key", "d2").stdout == first
    cli("sequence", "create", "daily", "--format", "D-{year}{month}{day}-{number}")
    assert cli("next", "daily", "--direct", "--key", "x", "--date", "2026-03-07").stdout == (
        "1 D-20260307-1\n"
    )
    refused = cli("next", "daily", "--direct", "--key", "x", "--date", "2026-03-08", ok=False)
    assert "was already used for D-20260307-1, which a request dated 2026-03-08" in (refused.stderr)
    check_gapless(create_engine(cli.env["NUMBERING_DATABASE_URL"]), "fy")


def test_previews_show_the_number_a_period_would_really_give(cli: CLI) -> None:
    cli("sequence", "create", "fy", "--format", "INV-{year}-{number:06d}", "--period", "year")
    for key in ("a", "b"):
        cli("next", "fy", "--direct", "--date", "2025-03-01", "--key", key)
    cli("next", "fy", "--direct", "--date", "2027-01-01", "--key", "c")
    shown = json.loads(cli("sequence", "show", "fy", "--period", "2025", "--json").stdout)
    assert (shown["name"], shown["next_value"], shown["next_formatted"]) == (
        "fy/2025", 3, "INV-2025-000003"
    )  # fmt: skip
    contradiction = cli(
        "sequence", "show", "fy", "--period", "2025", "--date", "2027-06-01", ok=False
    )
    assert "the date 2027-06-01 is not in period 2025" in contradiction.stderr
    dated = json.loads(cli("sequence", "show", "fy", "--date", "2027-05-05", "--json").stdout)
    assert (dated["next_value"], dated["next_formatted"]) == (2, "INV-2027-000002")
    unused = json.loads(cli("sequence", "show", "fy", "--date", "2031-05-05", "--json").stdout)
    assert (unused["next_value"], unused["next_formatted"]) == (1, "INV-2031-000001")
    listing = cli("sequence", "list").stdout
    assert "per period" in listing.splitlines()[1]  # the sequence's own row gives nothing
    cli("sequence", "freeze", "fy")
    year = str(date.today().year)
    unfrozen = cli("sequence", "unfreeze", "fy").stdout
    assert unfrozen == f"sequence 'fy' unfrozen; next value 1 in period {year} (today)\n"
    cli("sequence", "freeze", "fy", "--period", "2025")
    unfrozen = cli("sequence", "unfreeze", "fy", "--period", "2025").stdout
    assert unfrozen == "sequence 'fy/2025' unfrozen; next value 3\n"


def test_export_validates_before_writing_and_exports_one_period(cli: CLI, tmp_path: Path) -> None:
    cli("sequence", "create", "fy", "--format", "F{year}-{number}", "--period", "year")
    cli("next", "fy", "--direct", "--date", "2025-03-01")
    cli("next", "fy", "--direct", "--date", "2026-03-01")
    for args in (("export", "fy/2025"), ("export", "fy", "--period", "2025")):
        rows = list(csv.DictReader(io.StringIO(cli(*args).stdout)))
        assert [(r["sequence"], r["formatted"]) for r in rows] == [("fy/2025", "F2025-1")]
    as_json = json.loads(cli("export", "fy/2030", "--format", "json").stdout)
    assert as_json == []  # a period with no numbers yet
    target = tmp_path / "x.csv"
    refused = cli("export", "nosuch", "-o", str(target), ok=False)
    assert "'nosuch' does not exist" in refused.stderr
    assert not target.exists()
    assert "invalid year '20x5'" in cli("export", "fy", "--period", "20x5", ok=False).stderr
    cli("export", "fy", "-o", str(target))
    assert len(target.read_text().splitlines()) == 3


def test_output_piped_into_head_ends_quietly(cli: CLI) -> None:
    allocator = Allocator(cli.env["NUMBERING_DATABASE_URL"])
    allocator.create_sequence("many")
    # Far more than a pipe holds (64 KiB), so the writer is still writing when head quits.
    allocator.assign("many", [Request(f"document:{i}") for i in range(3000)])
    allocator.close()
    pipeline = subprocess.run(
        f"{sys.executable} -m numbering export many --format json | head -n 1",
        shell=True,
        env={**cli.env, "PYTHONUNBUFFERED": "1"},
        cwd=cli.cwd,
        capture_output=True,
        text=True,
        timeout=120,
        executable="/bin/bash",
    )
    assert pipeline.stdout == "[\n"
    assert pipeline.stderr == ""
    # The same with nobody reading at all: no BrokenPipeError, the status of SIGPIPE.
    proc = subprocess.Popen(
        [sys.executable, "-m", "numbering", "export", "many"],
        env={**cli.env, "PYTHONUNBUFFERED": "1"},
        cwd=cli.cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.stdout.close()
    assert proc.wait(timeout=120) == 141
    assert proc.stderr.read() == b""


def test_likely_mistakes_are_warned_about_or_refused(cli: CLI) -> None:
    created = cli("sequence", "create", "y", "--format", "{year}-{number}")
    assert "warning: the format uses {year} but the sequence has no period" in created.stderr
    assert "give --period year" in created.stderr
    quiet = cli("sequence", "create", "z", "--format", "{year}-{number}", "--period", "year")
    assert quiet.stderr == ""
    cli("sequence", "create", "plain")
    dated = cli("next", "plain", "--direct", "--date", "2026-01-01")
    assert dated.stderr == (
        "warning: sequence 'plain' has no periods and its format uses no date: "
        "--date changes nothing\n"
    )
    assert cli("next", "z", "--direct", "--date", "2026-01-01").stderr == ""
    refused = cli("quarantine", "replay", "nosuch", ok=False)
    assert "sequence 'nosuch' does not exist" in refused.stderr
    bad = cli("--database-url", "garbage", "sequence", "list", ok=False)
    assert "error: --database-url is not a database URL: 'garbage'" in bad.stderr
    cli.env["NUMBERING_RESULT_BACKEND"] = "rpc://"
    refused = cli("config", ok=False)
    assert "NUMBERING_RESULT_BACKEND must be a URL starting with" in refused.stderr
    del cli.env["NUMBERING_RESULT_BACKEND"]
    url = cli.env.pop("NUMBERING_DATABASE_URL")
    cli.env["NUMBERING_DATABASE_URL"] = ""
    refused = cli("sequence", "list", ok=False)
    assert "NUMBERING_DATABASE_URL is set but empty" in refused.stderr
    assert not (cli.cwd / "numbering.db").exists()
    cli.env["NUMBERING_DATABASE_URL"] = url


def test_batch_refuses_a_periodic_sequence(cli: CLI) -> None:
    engine = create_engine(cli.env["NUMBERING_DATABASE_URL"])
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE docs (id INTEGER PRIMARY KEY, number BIGINT)"))
        conn.execute(sa.text("INSERT INTO docs (id) VALUES (1), (2)"))
    engine.dispose()
    cli.env["NUMBERING_BATCH_TABLES"] = "docs"
    cli("sequence", "create", "fy", "--period", "year")
    refused = cli("batch", "fy", "--table", "docs", ok=False)
    assert "sequence 'fy' starts again every year: a batch job" in refused.stderr


def test_a_sequence_created_by_mistake_can_be_deleted_until_it_is_used(cli: CLI) -> None:
    cli("sequence", "create", "invoces")  # a typo
    assert cli("sequence", "delete", "invoces").stdout == (
        "sequence 'invoces' deleted (it had given no numbers)\n"
    )
    assert "does not exist" in cli("sequence", "show", "invoces", ok=False).stderr
    cli("sequence", "create", "fy", "--period", "year")
    cli("sequence", "freeze", "fy", "--period", "2030")  # an unused period's counter
    cli("sequence", "delete", "fy")
    assert cli("sequence", "list").stdout.startswith("no sequences yet")
    cli("sequence", "create", "invoices")
    cli("next", "invoices", "--direct")
    refused = cli("sequence", "delete", "invoices", ok=False)
    assert "'invoices' has 1 assignment(s) in the ledger" in refused.stderr
    assert "freeze it instead" in refused.stderr
    assert "invoices: ok" in cli("audit").stdout
    assert "does not exist" in cli("sequence", "delete", "nosuch", ok=False).stderr
