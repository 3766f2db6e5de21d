"""Number the rows of a table in place, chunk by chunk, gaplessly and resumably.

Each chunk is one transaction: lock the next ``chunk_size`` rows that have no number yet
(in the requested order), take one block of values for them from the sequence (one
ledger row per chunk, keyed ``batch:<job>:<first id>``), and write the numbers into the
rows. Numbers and documents commit together, so the table is gapless at the document
level; a crash loses at most the chunk in hand, and running the job again skips the rows
already numbered. Memory stays flat: a chunk's ids are all that is held.

Table and column names are never pasted into SQL: the table must be on the deployment's
allow-list (``NUMBERING_BATCH_TABLES``), is reflected from the database, and columns are
looked up on the reflected table, which SQLAlchemy quotes. A filter is column/value
pairs compared for equality, not SQL text.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection, Table

from numbering.allocator import Allocator
from numbering.assignment import Request, assign
from numbering.backends import backend_for
from numbering.errors import InvalidKeyError, InvalidRequestError, NumberingError
from numbering.validation import MAX_COUNT, check_count, check_key, check_sequence_name

__all__ = ["DEFAULT_CHUNK_SIZE", "BatchJob", "BatchProgress", "number_rows"]

log = logging.getLogger("numbering.batch")

# Rows numbered per transaction: large enough to amortise the commit, small enough that a
# crash costs little and locks are short.
DEFAULT_CHUNK_SIZE = 10_000
# Batch job names become part of ledger keys ("batch:<job>:<first id>").
MAX_JOB_LENGTH = 100


@dataclass(frozen=True)
class BatchJob:
    """What to number: a table's rows without a number, in order, optionally filtered."""

    sequence: str
    table: str
    id_column: str = "id"
    number_column: str = "number"
    order_by: tuple[str, ...] = ()
    where: Mapping[str, Any] = field(default_factory=dict)
    job: str = ""
    chunk_size: int = DEFAULT_CHUNK_SIZE

    def __post_init__(self) -> None:
        check_sequence_name(self.sequence)
        for name in (self.table, self.id_column, self.number_column, *self.order_by):
            if not isinstance(name, str) or not name:
                raise InvalidRequestError("table and column names must be non-empty strings")
        if not isinstance(self.where, Mapping):
            raise InvalidRequestError("where must map column names to values")
        job = self.job or f"{self.table}.{self.number_column}"
        if len(job) > MAX_JOB_LENGTH:
            raise InvalidRequestError(f"job name is longer than {MAX_JOB_LENGTH} characters")
        check_key(f"batch:{job}:0")
        object.__setattr__(self, "job", job)
        if check_count(self.chunk_size) > MAX_COUNT:  # pragma: no cover - check_count caps
            raise InvalidRequestError("chunk size too large")


@dataclass
class BatchProgress:
    """How far a job is; handed to the progress callback after every chunk."""

    numbered: int = 0
    chunks: int = 0
    remaining_at_start: int = 0
    first_value: int | None = None
    last_value: int | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def rate(self) -> float:
        """Rows numbered per second so far."""
        elapsed = time.monotonic() - self.started
        return self.numbered / elapsed if elapsed > 0 else 0.0


def _reflect(connection: Connection, job: BatchJob, allowed: Sequence[str]) -> Table:
    if job.table not in allowed:
        raise InvalidRequestError(
            f"table {job.table!r} is not on the batch allow-list; list the tables numbering "
            f"may write in NUMBERING_BATCH_TABLES (now: {', '.join(allowed) or 'empty'})"
        )
    try:
        table = Table(job.table, sa.MetaData(), autoload_with=connection)
    except sa.exc.NoSuchTableError:
        raise InvalidRequestError(f"table {job.table!r} does not exist") from None
    for column in (job.id_column, job.number_column, *job.order_by, *job.where):
        if column not in table.c:
            raise InvalidRequestError(f"table {job.table!r} has no column {column!r}")
    return table


@dataclass(frozen=True)
class _Chunk:
    """The rows locked for one chunk: how many, the first and last id in numbering order,
    and the ids themselves (a list, or the engine's own array text: see
    :meth:`numbering.backends.base.Backend.lock_chunk`)."""

    count: int
    first_id: Any
    last_id: Any
    ids: list[Any] | str


def _chunk(connection: Connection, table: Table, job: BatchJob) -> _Chunk | None:
    ident = table.c[job.id_column]
    locked = (
        sa.select(ident, *(table.c[column] for column in job.order_by))
        .where(table.c[job.number_column].is_(None))
        .where(*(table.c[column] == value for column, value in job.where.items()))
        .order_by(*(table.c[column] for column in job.order_by), ident)
        .limit(job.chunk_size)
        .with_for_update()
    )
    found = backend_for(connection).lock_chunk(connection, locked, ident.name, job.order_by)
    return None if found is None else _Chunk(*found)


def _write_numbers(
    connection: Connection, table: Table, job: BatchJob, chunk: _Chunk, first: int
) -> int:
    return backend_for(connection).write_chunk(
        connection, table, table.c[job.id_column], table.c[job.number_column], chunk.ids, first
    )


def number_rows(
    allocator: Allocator,
    job: BatchJob,
    *,
    allowed_tables: Sequence[str],
    progress: Callable[[BatchProgress], None] | None = None,
) -> BatchProgress:
    """Number every row of ``job.table`` that has no number yet; return the final progress.

    Safe to run again after a crash or an interruption: it carries on where the last
    committed chunk ended. Each chunk's transaction is retried on conflicts like any
    other numbering transaction.
    """
    info = allocator.sequence(job.sequence)
    if info.period is not None:
        # Each chunk is one block from one counter: rows dated in two periods would be
        # numbered in one of them, silently.
        raise InvalidRequestError(
            f"sequence {job.sequence!r} starts again every {info.period}: a batch job "
            "takes each chunk from one counter and cannot put a table's rows in their own "
            "periods; number such documents one by one with their dates (allocate(..., "
            "date=...) or the client), or use a sequence without periods"
        )
    with allocator.engine.connect() as connection:
        table = _reflect(connection, job, allowed_tables)
        remaining = connection.execute(
            sa.select(sa.func.count())
            .select_from(table)
            .where(table.c[job.number_column].is_(None))
            .where(*(table.c[column] == value for column, value in job.where.items()))
        ).scalar_one()
    state = BatchProgress(remaining_at_start=int(remaining))

    def one_chunk(connection: Connection) -> tuple[int, int] | None:
        chunk = _chunk(connection, table, job)
        if chunk is None:
            return None
        key = _chunk_key(job.job, chunk.first_id)
        reference = {"table": job.table, "first_id": chunk.first_id, "last_id": chunk.last_id}
        [outcome] = assign(
            connection, job.sequence, [Request(key, chunk.count, _jsonable(reference))]
        )
        if isinstance(outcome, NumberingError):
            raise outcome
        if outcome.resent:
            raise InvalidRequestError(
                f"ledger key {key!r} was already used, yet its rows have no number: were "
                "numbers cleared by hand? Refusing to number them twice."
            )
        written = _write_numbers(connection, table, job, chunk, outcome.value)
        if written != chunk.count:
            raise NumberingError(
                f"wrote {written} numbers for {chunk.count} locked rows; rolled back"
            )
        return outcome.value, chunk.count

    while True:
        done = allocator.run(one_chunk, describe=f"batch chunk of {job.table}")
        if done is None:
            break
        first, count = done
        state.numbered += count
        state.chunks += 1
        state.first_value = first if state.first_value is None else state.first_value
        state.last_value = first + count - 1
        if progress is not None:
            progress(state)
    log.info("batch %s: numbered %d row(s) in %d chunk(s)", job.job, state.numbered, state.chunks)
    return state


def _chunk_key(job: str, first_id: str) -> str:
    """The ledger key of the chunk that starts at ``first_id``: ``batch:<job>:<first id>``,
    or, for an id that cannot be part of a key (control characters, edge whitespace,
    too long), ``batch~sha256:<job>:<digest of the id>``. The two forms cannot collide."""
    try:
        return check_key(f"batch:{job}:{first_id}")
    except InvalidKeyError:
        return f"batch~sha256:{job}:{hashlib.sha256(first_id.encode()).hexdigest()}"


def _jsonable(reference: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v if isinstance(v, int | str | float | None) else str(v) for k, v in reference.items()
    }
