"""Batch document numbering in place: exactly once, gapless, in order, resumable."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa
from celery import Celery
from integration.stack import Stack
from ledger_check import check_gapless
from sqlalchemy.engine import Engine

from numbering import Allocator, InvalidRequestError, create_engine
from numbering.batch import BatchJob, BatchProgress, number_rows
from numbering.config import ENV
from numbering.config.celery import CONTROL_QUEUE
from numbering.routing import BATCH_TASK_NAME


def make_documents(engine: Engine, rows: int) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE documents (id INTEGER PRIMARY KEY, kind VARCHAR(10), "
            "issued INTEGER, number BIGINT)"
        )
        if conn.dialect.name == "postgresql":  # the same rows, made by the server: seconds less
            conn.execute(
                sa.text(
                    "INSERT INTO documents (id, kind, issued) SELECT g, CASE WHEN g % 10 = 0 "
                    "THEN 'draft' ELSE 'final' END, (g::bigint * 7919) % :rows "
                    "FROM generate_series(1, :rows) g"
                ),
                {"rows": rows},
            )
            return
        conn.execute(
            sa.text("INSERT INTO documents (id, kind, issued) VALUES (:id, :kind, :issued)"),
            [
                {"id": i, "kind": "draft" if i % 10 == 0 else "final", "issued": (i * 7919) % rows}
                for i in range(1, rows + 1)
            ],
        )


def numbers_by(engine: Engine, order: str, where: str = "TRUE") -> list[int | None]:
    with engine.connect() as conn:
        return list(
            conn.execute(sa.text(f"SELECT number FROM documents WHERE {where} ORDER BY {order}"))
            .scalars()
            .all()
        )


def test_hundred_thousand_rows_numbered_once_in_order(server_url: str) -> None:
    engine = create_engine(server_url)
    make_documents(engine, 100_000)
    numbers = Allocator(engine)
    numbers.create_sequence("docs")
    seen: list[int] = []
    job = BatchJob(sequence="docs", table="documents")
    done = number_rows(
        numbers, job, allowed_tables=["documents"], progress=lambda p: seen.append(p.numbered)
    )
    assert (done.numbered, done.chunks, done.first_value, done.last_value) == (
        100_000,
        10,
        1,
        100_000,
    )
    assert seen == list(range(10_000, 100_001, 10_000))
    assert numbers_by(engine, "id") == list(range(1, 100_001))
    by_key = check_gapless(engine, "docs")
    assert len(by_key) == 10  # one ledger row per chunk, not per document
    again = number_rows(numbers, job, allowed_tables=["documents"])
    assert again.numbered == 0


def test_filter_and_order(db_url: str) -> None:
    engine = create_engine(db_url)
    make_documents(engine, 1_000)
    numbers = Allocator(engine)
    numbers.create_sequence("finals", initial_value=500)
    job = BatchJob(
        sequence="finals",
        table="documents",
        order_by=("issued",),
        where={"kind": "final"},
        chunk_size=128,
    )
    done = number_rows(numbers, job, allowed_tables=["documents"])
    assert done.numbered == 900
    assert numbers_by(engine, "issued, id", "kind = 'final'") == list(range(500, 1400))
    assert set(numbers_by(engine, "id", "kind = 'draft'")) == {None}
    check_gapless(engine, "finals")


def notes_with_ids(engine: Engine, ids: list[str]) -> tuple[Allocator, BatchJob]:
    """A table ``notes`` keyed by the text ``ids``, its sequence, and the job numbering it
    (chunks of 7 rows)."""
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE notes (code VARCHAR(400) PRIMARY KEY, number BIGINT)")
        conn.execute(sa.text("INSERT INTO notes (code) VALUES (:c)"), [{"c": c} for c in ids])
    numbers = Allocator(engine)
    numbers.create_sequence("notes")
    return numbers, BatchJob(sequence="notes", table="notes", id_column="code", chunk_size=7)


def test_text_ids_that_need_quoting_round_trip(db_url: str) -> None:
    """On PostgreSQL a chunk's ids travel as the server's own array text and back: ids
    with quotes, commas, braces, backslashes, spaces and NULL-like words must survive."""
    engine = create_engine(db_url)
    awkward = ['a"b', "c,d", "{e}", "f\\g", " h ", "NULL", "i'j", "", "ü"]
    ids = [f"{text}#{i}" for i, text in enumerate(awkward * 3)] + ["NULL", ""]
    numbers, job = notes_with_ids(engine, ids)
    assert number_rows(numbers, job, allowed_tables=["notes"]).numbered == len(ids)
    with engine.connect() as conn:
        got = conn.execute(sa.text("SELECT code, number FROM notes ORDER BY number")).all()
    assert [number for _, number in got] == list(range(1, len(ids) + 1))
    assert sorted(code for code, _ in got) == sorted(ids)
    # Numbered in the id's order, as the database sorts it.
    with engine.connect() as conn:
        in_order = conn.execute(sa.text("SELECT code FROM notes ORDER BY code")).scalars().all()
    assert [code for code, _ in got] == list(in_order)
    check_gapless(engine, "notes")


def test_ids_that_cannot_be_part_of_a_key_still_number(db_url: str) -> None:
    """A chunk's ledger key holds its first id; an id that a key cannot hold (a newline,
    a tab, edge whitespace, 300 characters) gets a digest of the id in its key instead."""
    engine = create_engine(db_url)
    ids = ["a\nb", "c\td", "e ", "x" * 300, "plain", "z\x01"]
    numbers, job = notes_with_ids(engine, ids)
    job = dataclasses.replace(job, chunk_size=1)  # every id starts a chunk
    assert number_rows(numbers, job, allowed_tables=["notes"]).numbered == len(ids)
    by_key = check_gapless(engine, "notes")
    assert len(by_key) == len(ids)
    assert sum(key.startswith("batch~sha256:notes.number:") for key in by_key) == 5
    assert "batch:notes.number:plain" in by_key  # the job is named table.column
    # Run again: nothing left to number, nothing numbered twice.
    assert number_rows(numbers, job, allowed_tables=["notes"]).numbered == 0
    check_gapless(engine, "notes")


def test_killed_half_way_then_resumed(server_url: str, tmp_path: object) -> None:
    engine = create_engine(server_url)
    make_documents(engine, 100_000)
    Allocator(engine).create_sequence("docs")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBERING_")}
    env.update({ENV["database_url"]: server_url, ENV["batch_tables"]: "documents"})
    command = [
        sys.executable,
        "-m",
        "numbering",
        "batch",
        "docs",
        "--table",
        "documents",
        "--chunk-size",
        "2000",
    ]
    first = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + 60
    numbered = 0
    while numbered < 30_000 and time.monotonic() < deadline:
        with engine.connect() as conn:
            numbered = conn.execute(sa.text("SELECT count(number) FROM documents")).scalar_one()
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(10)
    with engine.connect() as conn:
        partial = conn.execute(sa.text("SELECT count(number) FROM documents")).scalar_one()
    assert 30_000 <= partial < 100_000, "the job was not interrupted half-way"
    assert partial % 2000 == 0, "a chunk was half committed"

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert f"numbered {100_000 - partial} row(s)" in second.stdout
    assert "rows/s" in second.stderr  # progress was shown
    assert numbers_by(engine, "id") == list(range(1, 100_001))
    check_gapless(engine, "docs")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"table": "numbering_ledger"}, "not on the batch allow-list"),
        ({"table": "documents; DROP TABLE documents"}, "not on the batch allow-list"),
        ({"number_column": "number = 0; --"}, "has no column 'number = 0; --'"),
        ({"order_by": ("issued DESC",)}, "has no column 'issued DESC'"),
        ({"where": {"kind = kind OR 1": 1}}, "has no column"),
        ({"id_column": "missing"}, "has no column 'missing'"),
    ],
)
def test_names_come_from_the_allow_list_and_the_table(
    db_url: str, change: dict[str, object], message: str
) -> None:
    engine = create_engine(db_url)
    make_documents(engine, 10)
    numbers = Allocator(engine)
    numbers.create_sequence("docs")
    spec = {"sequence": "docs", "table": "documents", **change}
    with pytest.raises(InvalidRequestError, match=message):
        number_rows(numbers, BatchJob(**spec), allowed_tables=["documents"])  # type: ignore[arg-type]
    assert set(numbers_by(engine, "id")) == {None}
    assert numbers.last_value("docs") is None


def test_filter_values_are_values_not_sql(db_url: str) -> None:
    engine = create_engine(db_url)
    make_documents(engine, 10)
    numbers = Allocator(engine)
    numbers.create_sequence("docs")
    job = BatchJob(sequence="docs", table="documents", where={"kind": "x' OR '1'='1"})
    progress: BatchProgress = number_rows(numbers, job, allowed_tables=["documents"])
    assert progress.numbered == 0
    assert set(numbers_by(engine, "id")) == {None}


def test_batch_job_as_a_celery_task(stack: Stack) -> None:
    engine = create_engine(stack.settings.database_url)
    make_documents(engine, 5_000)
    Allocator(engine).create_sequence("docs")
    stack.env[ENV["batch_tables"]] = "documents"
    stack.worker("--sequence", "docs")
    settings = stack.settings
    app = Celery(broker=settings.broker_url, backend=settings.result_backend)
    result = app.send_task(
        BATCH_TASK_NAME,
        kwargs={"sequence": "docs", "table": "documents", "chunk_size": 1000},
        queue=CONTROL_QUEUE,
    )
    assert result.get(timeout=60) == {
        "numbered": 5000,
        "chunks": 5,
        "first_value": 1,
        "last_value": 5000,
    }
    # Meanwhile the same worker keeps answering single requests from the queue.
    assert stack.client().next_value("docs", key="after-batch") == 5001
    assert numbers_by(engine, "id") == list(range(1, 5001))
    check_gapless(engine, "docs")
