"""The tamper-evident ledger (issue 23): every counter's hash chain, on every engine.

A tamperer here has the owner's rights: the append-only triggers are dropped first, as
anyone who owns the tables can. Every change, deletion, insertion or reordering of a
record must then be found and named by ``numbering audit`` (numbering.ledger) and by the
standalone verifier on an export (numbering.chain), and a rewrite of the whole chain by a
head kept elsewhere. Ledgers written before chains are back-filled, resumably, while
numbers keep being given.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import MARIADB_URL
from ledger_check import check_chain, check_gapless
from sqlalchemy.engine import Engine

from numbering import Allocator, allocate, chain, create_engine
from numbering.backends import backend_for
from numbering.chaining import assign_record
from numbering.ledger import audit, backfill_step, export_chain
from numbering.migrations import upgrade

REFERENCES = [
    {"issuer": "ACME SL", "date": "2026-12-08", "total": "121.00"},
    {"issuer": "ACME SL", "total": 99.5, "lines": [1, 2.25, None, True]},
    "a note with 'quotes', \"double quotes\", a newline\nand ünïcode",
    1e21,
    None,
    {"nested": {"z": 1, "a": [0.1, -0.0, 1.5e-7]}},
]


def _drop_triggers(engine: Engine) -> None:
    """What a tamperer with the owner's rights does first."""
    with engine.begin() as conn:
        for statement in backend_for(conn).drop_ledger_triggers(chain=True):
            conn.exec_driver_sql(statement)


def _issue(engine: Engine) -> Allocator:
    """Sequence ``inv``: six numbers with references of every kind, 3 voided."""
    numbers = Allocator(engine)
    numbers.create_sequence("inv")
    for i, reference in enumerate(REFERENCES):
        numbers.next_value("inv", key=f"k{i + 1}", reference=reference)
    numbers.void("inv", key="k3", reason="issued twice")
    return numbers


def _chain_problems(conn: sa.Connection) -> tuple[list[str], list[str]]:
    """(what the audit says about ``inv``, what the verifier says about its export)."""
    [report] = audit(conn, "inv")
    exported = list(export_chain(conn, "inv"))
    reports = chain.verify(enumerate(exported, 1))
    return report.problems, [problem for found in reports for problem in found.problems]


Tamper = Callable[[sa.Connection], None]


def _change_a_field(conn: sa.Connection) -> None:
    conn.execute(
        sa.text("UPDATE numbering_ledger SET reference = :r WHERE request_key = 'k2'"),
        {"r": json.dumps({"issuer": "ACME SL", "total": 9.5, "lines": [1]})},
    )


def _delete_a_row(conn: sa.Connection) -> None:
    conn.execute(sa.text("DELETE FROM numbering_ledger WHERE request_key = 'k5'"))


def _insert_a_row(conn: sa.Connection) -> None:
    """A seventh number slipped in at the end, in the chain's form, head moved too."""
    seq = conn.execute(
        sa.text("SELECT id, chain_link, chain_head FROM numbering_sequence WHERE name = 'inv'")
    ).one()
    row = {
        "sequence_id": seq.id, "cycle": 0, "value": 7, "count": 1, "request_key": "forged",
        "reference": None, "status": "assigned", "assigned_at": datetime.now(UTC),
        "formatted": None, "link": seq.chain_link + 1,
    }  # fmt: skip
    # Fingerprinted after a made-up record: the tamperer cannot keep the real
    # fingerprints of what follows and move the head without redoing the whole chain.
    row["fingerprint"] = chain.fingerprint("f" * 64, assign_record(row, row["link"]))
    from numbering.schema import ledger

    conn.execute(sa.insert(ledger).values(row))
    conn.execute(
        sa.text("UPDATE numbering_sequence SET last_value = 7, chain_link = :l WHERE id = :i"),
        {"l": row["link"], "i": seq.id},
    )


def _swap_two_rows(conn: sa.Connection) -> None:
    """k1 and k4 trade places in the chain (their links and fingerprints)."""
    rows = conn.execute(
        sa.text(
            "SELECT request_key, link, fingerprint FROM numbering_ledger "
            "WHERE request_key IN ('k1', 'k4') ORDER BY request_key"
        )
    ).all()
    conn.execute(sa.text("UPDATE numbering_ledger SET link = -link WHERE request_key = 'k1'"))
    for mine, theirs in ((rows[1], rows[0]), (rows[0], rows[1])):
        conn.execute(
            sa.text(
                "UPDATE numbering_ledger SET link = :l, fingerprint = :f WHERE request_key = :k"
            ),
            {"l": theirs.link, "f": theirs.fingerprint, "k": mine.request_key},
        )


def _unvoid(conn: sa.Connection) -> None:
    conn.execute(
        sa.text(
            "UPDATE numbering_ledger SET status = 'assigned', void_reason = NULL, "
            "voided_at = NULL WHERE request_key = 'k3'"
        )
    )


def _delete_the_void_record(conn: sa.Connection) -> None:
    conn.execute(sa.text("DELETE FROM numbering_chain WHERE kind = 'void'"))


# What each tampering must make the audit and the verifier say (a piece of the line that
# names the record). A row un-voided in the database leaves the chain whole (it still
# says when and why the number was voided, and the export carries that): the audit,
# which reads the row too, is what finds it.
TAMPERING: dict[str, tuple[Tamper, str, str | None]] = {
    "change": (_change_a_field, "key 'k2'", "key 'k2'"),
    "delete": (_delete_a_row, "records are missing", "a record was deleted"),
    "insert": (_insert_a_row, "key 'forged'", "key 'forged'"),
    "swap": (_swap_two_rows, "key 'k4'", "key 'k4'"),
    "unvoid": (_unvoid, "voids key 'k3'", None),
    "void-deleted": (_delete_the_void_record, "key 'k3'", "key 'k3'"),
}


def test_every_tampering_is_found_and_named(engine: Engine) -> None:
    """One ledger, each tampering applied in a transaction that is rolled back: the
    untouched chain verifies, every tampered one fails where it was changed."""
    _issue(engine)
    check_gapless(engine, "inv")
    with engine.connect() as conn:
        assert _chain_problems(conn) == ([], [])
    _drop_triggers(engine)
    for what, (tamper, by_audit, by_verifier) in TAMPERING.items():
        with engine.connect() as conn:
            trans = conn.begin()
            tamper(conn)
            audited, verified = _chain_problems(conn)
            trans.rollback()
        assert any(by_audit in problem for problem in audited), (what, audited)
        if by_verifier is None:
            assert verified == [], (what, verified)
        else:
            assert any(by_verifier in problem for problem in verified), (what, verified)
    with engine.connect() as conn:  # everything rolled back: whole again
        assert _chain_problems(conn) == ([], [])


def test_a_consistent_rewrite_is_caught_by_a_head_kept_elsewhere(engine: Engine) -> None:
    """A tamperer who rewrites the whole chain (every fingerprint and the counter's head
    recomputed after changing a total) passes the audit; the head printed before does
    not appear in the new export, and the verifier says so."""
    numbers = _issue(engine)
    [kept] = numbers.chain_heads("inv")
    _drop_triggers(engine)
    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE numbering_ledger SET reference = :r WHERE request_key = 'k1'"),
            {"r": json.dumps({"issuer": "ACME SL", "date": "2026-12-08", "total": "1.00"})},
        )
        _rechain(conn)
    [report] = numbers.audit("inv")
    assert report.ok, report.problems  # consistent: only the kept head tells
    exported = list(numbers.export_chain("inv"))
    [verified] = chain.verify(enumerate(exported, 1))
    assert verified.ok
    at_kept = next(e for e in exported if e["link"] == kept["link"])
    assert at_kept["fingerprint"] != kept["fingerprint"]


def _rechain(conn: sa.Connection) -> None:
    """Recompute every fingerprint of ``inv``'s chain from its content, as a tamperer would."""
    seq = conn.execute(sa.text("SELECT id FROM numbering_sequence WHERE name = 'inv'")).one()
    exported = list(export_chain(conn, "inv"))
    head = chain.GENESIS
    for entry in exported:
        entry.pop("fingerprint")
        head = chain.fingerprint(head, entry)
        table = "numbering_ledger" if entry["kind"] == "assign" else "numbering_chain"
        conn.execute(
            sa.text(f"UPDATE {table} SET fingerprint = :f WHERE sequence_id = :s AND link = :l"),
            {"f": head, "s": seq.id, "l": entry["link"]},
        )
    conn.execute(
        sa.text("UPDATE numbering_sequence SET chain_head = :h WHERE id = :s"),
        {"h": head, "s": seq.id},
    )


def test_the_triggers_keep_the_chain_append_only(engine: Engine) -> None:
    """Without the tamperer's DDL nothing of a chain can change: a chained row's link
    and fingerprint, a chain record; only a void goes through."""
    _issue(engine)
    statements = [
        "UPDATE numbering_ledger SET fingerprint = 'x' WHERE request_key = 'k1'",
        "UPDATE numbering_ledger SET link = NULL, fingerprint = NULL WHERE request_key = 'k1'",
        "UPDATE numbering_chain SET record = '{}' WHERE kind = 'start'",
        "DELETE FROM numbering_chain WHERE kind = 'void'",
        "DELETE FROM numbering_chain WHERE kind = 'start'",  # its chain holds numbers
    ]
    for statement in statements:
        with engine.connect() as conn, pytest.raises(sa.exc.DatabaseError, match="append-only"):
            conn.execute(sa.text(statement))
    check_gapless(engine, "inv")
    # The start of a chain that holds nothing else goes with its counter: a sequence
    # created by mistake is deleted before it gave a number.
    numbers = Allocator(engine)
    numbers.create_sequence("typo")
    numbers.delete_sequence("typo")
    assert "typo" not in [info.name for info in numbers.sequences()]


def test_renames_and_periods_have_chains_of_their_own(engine: Engine) -> None:
    """Each period of a periodic sequence is its own chain; a sequence set aside keeps
    its chain under its new name, with the rename in it."""
    numbers = Allocator(engine)
    numbers.create_sequence("fy", period="year", format="F-{year}-{number:03d}")
    for day in ("2025-06-01", "2026-01-02", "2026-03-04", "2025-12-31"):
        numbers.next_value("fy", date=day, reference={"day": day})
    numbers.create_sequence("old")
    numbers.next_value("old", key="o1")
    with engine.begin() as conn:
        from numbering.sequences import archive_sequence

        archived = archive_sequence(conn, "old")
    assert archived is not None
    assert archived.startswith("old:deleted:")
    assert check_chain(engine, "fy/2025") == 3  # start and two numbers
    assert check_chain(engine, "fy/2026") == 3
    assert check_chain(engine, archived) == 3  # start, o1, rename
    assert all(report.ok for report in numbers.audit()), [r.problems for r in numbers.audit()]


# -- ledgers written before chains ----------------------------------------------------------


@pytest.fixture(params=["postgresql", "sqlite", "mariadb"])
def old_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A database at schema revision 0003, the last one before chains."""
    admin, name = None, ""
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_empty_url")
    elif request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'old.db'}"
    else:
        name = f"numbering_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        admin = create_engine(MARIADB_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        url = f"{MARIADB_URL.rstrip('/')}/{name}"
    engine = create_engine(url)
    upgrade(engine, "0003")
    yield engine
    engine.dispose()
    if admin is not None:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
        admin.dispose()


def _write_old_ledger(engine: Engine, values: int) -> None:
    """What an earlier version wrote: sequence ``inv`` with ``values`` numbers, 2 voided."""
    now = datetime.now(UTC)
    if engine.dialect.name != "postgresql":  # stored as UTC without a zone there
        now = now.replace(tzinfo=None)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO numbering_sequence (name, initial_value, last_value, cycle, "
                "created_at, updated_at, frozen) VALUES ('inv', 1, :n, 0, :t, :t, :f)"
            ),
            {"n": values, "t": now, "f": False},
        )
        seq = conn.execute(sa.text("SELECT id FROM numbering_sequence")).scalar_one()
        count = conn.dialect.identifier_preparer.quote_identifier("count")
        for value in range(1, values + 1):
            voided = value == 2
            conn.execute(
                sa.text(
                    f"INSERT INTO numbering_ledger (sequence_id, cycle, value, {count}, "
                    "request_key, reference, status, void_reason, assigned_at, voided_at) "
                    "VALUES (:s, 0, :v, 1, :k, :r, :st, :why, :t, :vt)"
                ),
                {
                    "s": seq, "v": value, "k": f"old-{value}",
                    "r": json.dumps({"n": value}), "st": "voided" if voided else "assigned",
                    "why": "cancelled" if voided else None, "t": now,
                    "vt": now if voided else None,
                },
            )  # fmt: skip


def test_an_old_ledger_is_back_filled_while_numbers_keep_coming(old_engine: Engine) -> None:
    """A ledger from before chains, upgraded: its counter stays unchained (the audit
    says to back-fill) until the back-fill starts its chain with a record of how many
    numbers it held, then chains them chunk by chunk, resumably, while numbers are
    given in between: at the end every row is in one valid chain."""
    _write_old_ledger(old_engine, 7)
    upgrade(old_engine)
    numbers = Allocator(old_engine)
    [report] = numbers.audit("inv")
    assert report.ok, report.problems
    assert "not started: 7 assignment(s) predate chains" in report.chain
    with old_engine.begin() as conn:
        assert allocate(conn, "inv", key="between-1") == 8  # still unchained
    with old_engine.begin() as conn:
        first = backfill_step(conn, "inv", 3)  # then the back-fill stops (a crash)
    assert (first.chained, first.left, first.started) == (3, 5, True)
    [report] = numbers.audit("inv")
    assert report.ok, report.problems
    assert "5 of the 8 earlier assignment(s) await the back-fill" in report.chain
    with old_engine.begin() as conn:
        assert allocate(conn, "inv", key="between-2") == 9  # chained after link 4
    numbers.void("inv", key="old-7", reason="voided before its turn came")
    steps: list[tuple[int, int]] = []
    done = numbers.backfill_chains(chunk=2, progress=lambda s: steps.append((s.chained, s.left)))
    assert done == 5
    assert steps == [(2, 3), (2, 1), (1, 0)]
    assert numbers.backfill_chains() == 0  # done: nothing left
    assert all(report.ok for report in numbers.audit())
    check_gapless(old_engine, "inv")  # the chain check included: every row is in it
    [start] = [e for e in numbers.export_chain("inv") if e["kind"] == "start"]
    assert (start["earlier"], start["last_value"], start["link"]) == (8, 8, 1)


def test_the_verifier_runs_alone_on_an_export(pg_url: str, tmp_path: Path) -> None:
    """The auditor's side: ``numbering chain verifier`` writes a script that a Python
    with nothing installed (a fresh virtual environment) runs on ``numbering export
    --format chain``, with the heads printed earlier; it fails, naming the line, when
    the export was changed."""
    engine = create_engine(pg_url)
    _issue(engine)
    env = {**os.environ, "NUMBERING_DATABASE_URL": pg_url}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "numbering", *args],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done

    heads = tmp_path / "heads.jsonl"
    heads.write_text(cli("chain", "head", "--format", "json").stdout)
    cli("export", "inv", "--format", "chain", "-o", "inv.chain.jsonl")
    cli("chain", "verifier", "-o", "verify_chain.py")
    venv = tmp_path / "clean"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    missing = subprocess.run([python, "-c", "import numbering"], capture_output=True, timeout=60)
    assert missing.returncode != 0  # nothing of numbering there

    def verify(export: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [python, "verify_chain.py", export, "--heads", "heads.jsonl"],
            capture_output=True, text=True, cwd=tmp_path, timeout=60, env={"PATH": "/usr/bin"},
        )  # fmt: skip

    done = verify("inv.chain.jsonl")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "inv: ok: 8 record(s), 6 assignment(s), 1 void(s)" in done.stdout
    assert "head inv link 8: ok" in done.stdout
    lines = (tmp_path / "inv.chain.jsonl").read_text().splitlines()
    changed = json.loads(lines[3])
    changed["reference"] = "a note with other words"
    lines[3] = json.dumps(changed)
    (tmp_path / "tampered.jsonl").write_text("\n".join(lines) + "\n")
    done = verify("tampered.jsonl")
    assert done.returncode == 1
    assert "line 4: link 4, assignment of 3 (cycle 0, key 'k3')" in done.stdout
    engine.dispose()
