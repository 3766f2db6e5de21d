"""The ``numbering`` command.

Every command reads the ``NUMBERING_*`` settings (``--database-url`` overrides the
database). Errors are one line on standard error and a non-zero exit status, never a
traceback (``--traceback`` shows one, for bug reports).
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, NoReturn, TypeVar

import click

from numbering import migrations
from numbering.allocator import Allocator
from numbering.batch import DEFAULT_CHUNK_SIZE, BatchJob, BatchProgress, number_rows
from numbering.errors import NumberingError
from numbering.ledger import EXPORT_FIELDS
from numbering.sequences import SequenceInfo
from numbering.settings import ENV, Settings, check_database_url, mask_url

F = TypeVar("F", bound=Callable[..., Any])

# Exit status of a command that failed (bad input, database error, audit problems).
EXIT_FAILURE = 1
# Exit status when the reader of our output went away: that of a process killed by SIGPIPE.
EXIT_BROKEN_PIPE = 128 + 13


class _Group(click.Group):
    """A click group that turns numbering's errors into one line and an exit status."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        **extra: Any,
    ) -> NoReturn:
        """Run the CLI; click's own usage errors become one line too, with a hint."""
        extra.pop("standalone_mode", None)
        try:
            result = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()  # `numbering sequence` alone: the help is the answer
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            click.echo(f"error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(EXIT_FAILURE)
        except BrokenPipeError:
            _reader_went_away()
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _reader_went_away()
        sys.exit(result if isinstance(result, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # before click's own handling, which exits with 1
            _reader_went_away()
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except NumberingError as exc:
            if ctx.meta.get("numbering.traceback"):
                raise
            _fail(str(exc))
        except Exception as exc:
            if ctx.meta.get("numbering.traceback"):
                raise
            _fail(f"unexpected {type(exc).__name__}: {exc} (run with --traceback for details)")


def _reader_went_away() -> NoReturn:
    """The command's output was piped into a reader that stopped reading (``| head``):
    end quietly, with the status a process killed by SIGPIPE has, as Unix tools do."""
    # Point stdout at /dev/null so that the interpreter's last flush cannot fail again.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(EXIT_BROKEN_PIPE)


def _warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_FAILURE)


def _settings(ctx: click.Context) -> Settings:
    settings: Settings = ctx.obj["settings"]
    return settings


def _allocator(ctx: click.Context) -> Allocator:
    if "allocator" not in ctx.obj:
        allocator = Allocator.from_settings(_settings(ctx))
        ctx.obj["allocator"] = allocator
        ctx.call_on_close(allocator.close)
    allocator_: Allocator = ctx.obj["allocator"]
    return allocator_


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--database-url",
    metavar="URL",
    help=f"Database to use (default: ${ENV['database_url']}, else ./numbering.db).",
)
@click.option("--verbose", "-v", is_flag=True, help="Log retries and progress to stderr.")
@click.option("--traceback", is_flag=True, help="Show a traceback on errors.")
@click.version_option(package_name="numbering")
@click.pass_context
def main(ctx: click.Context, database_url: str | None, verbose: bool, traceback: bool) -> None:
    """Gapless sequence numbers from a real database.

    \b
    Try it:
      numbering init-db
      numbering sequence create invoices
      numbering next invoices --key invoice:1
      numbering audit
    """
    ctx.meta["numbering.traceback"] = traceback
    # Errors reach the user once, as the command's own error line; logs are opt-in.
    logging.basicConfig(
        level=logging.INFO if verbose else logging.CRITICAL,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    settings = Settings.from_env()
    if database_url is not None:
        checked = check_database_url(database_url, "--database-url")
        settings = replace(settings, database_url=checked)
    ctx.obj = {"settings": settings}


@main.command("init-db")
@click.pass_context
def init_db(ctx: click.Context) -> None:
    """Create numbering's tables, or upgrade them to this version's schema.

    Safe to run again and from several processes at once.
    """
    done = migrations.upgrade(_allocator(ctx).engine)
    where = mask_url(_settings(ctx).database_url)
    if done.changed:
        click.echo(
            f"schema upgraded from {done.before or 'empty'} to revision {done.after} in {where}"
        )
    else:
        click.echo(f"schema already at revision {done.after} in {where}")
    from numbering.ledger import unchained_counters

    waiting = _allocator(ctx).run(unchained_counters, readonly=True)
    if waiting:
        click.echo(
            f"{len(waiting)} counter(s) hold numbers given before hash chains "
            f"({', '.join(waiting[:5])}{', ...' if len(waiting) > 5 else ''}): run "
            "`numbering chain backfill` once to chain them"
        )


@main.command("config")
@click.option(
    "--check",
    is_flag=True,
    help="Also ask the database what the worker's start-up check would: its durability "
    "and replication state, problems and warnings (exit 1 on a problem).",
)
@click.pass_context
def show_config(ctx: click.Context, check: bool) -> None:
    """Show the settings in effect (passwords masked); with --check, the database's
    state too (a standby, synchronous replication, unsafe settings)."""
    settings = _settings(ctx)
    shown = settings.masked()
    for variable, value in shown.items():
        click.echo(f"{variable}={value}")
    # On stderr: stdout stays VAR=value lines a script can read.
    click.echo(
        "note: plain Celery callers (other apps, other languages) find their answers in "
        f"numbering's result backend: give them result_backend={shown[ENV['result_backend']]}",
        err=True,
    )
    if not check:
        return
    from numbering.tasks.preflight import check_database

    found = check_database(
        _allocator(ctx).engine, allow_async_standby=settings.allow_reissue_after_failover
    )
    for fact in found.facts:
        click.echo(f"database: {fact}")
    for warning in found.warnings:
        click.echo(f"warning: database: {warning}", err=True)
    for problem in found.problems:
        click.echo(f"problem: database: {problem}", err=True)
    if found.problems:
        sys.exit(EXIT_FAILURE)


# -- sequences ---------------------------------------------------------------------------------


@main.group("sequence")
def sequence() -> None:
    """Create and inspect sequences."""


@sequence.command("create")
@click.argument("name")
@click.option("--initial-value", type=int, default=1, show_default=True, help="First value.")
@click.option(
    "--reset-value",
    type=int,
    help="Loop: after reset_value - 1 start again at the initial value (new cycle).",
)
@click.option("--max-value", type=int, help="Stop with 'sequence exhausted' past this value.")
@click.option("--exist-ok", is_flag=True, help="Succeed if it exists with the same definition.")
@click.option(
    "--format", "format_", metavar="FORMAT", help="Display format, e.g. INV-{year}-{number:06d}."
)
@click.option(
    "--period",
    type=click.Choice(["year", "month", "day"]),
    help="Restart numbering every year, month or day (of each request's document date).",
)
@click.option("--timezone", metavar="ZONE", help="Time zone of 'today' (IANA name; default UTC).")
@click.option(
    "--start-after",
    metavar="TABLE.COLUMN",
    help="Import: start after the highest number in TABLE.COLUMN (in NUMBERING_BATCH_TABLES).",
)
@click.pass_context
def sequence_create(
    ctx: click.Context,
    name: str,
    initial_value: int,
    reset_value: int | None,
    max_value: int | None,
    exist_ok: bool,
    format_: str | None,
    period: str | None,
    timezone: str | None,
    start_after: str | None,
) -> None:
    """Create sequence NAME.

    \b
    Examples:
      numbering sequence create invoices --format 'INV-{year}-{number:06d}' --period year
      numbering sequence create orders --start-after orders.number
    """
    source = None
    if start_after is not None:
        table, dot, column = start_after.rpartition(".")
        if not dot or not table or not column:
            _fail(f"--start-after takes TABLE.COLUMN, not {start_after!r}")
        source = (table, column)
    info = _allocator(ctx).create_sequence(
        name,
        initial_value=initial_value,
        reset_value=reset_value,
        max_value=max_value,
        exist_ok=exist_ok,
        format=format_,
        period=period,
        timezone=timezone,
        start_after=source,
        allowed_tables=_settings(ctx).batch_tables,
    )
    from numbering.policies import format_warning

    warning = format_warning(info.format, info.period)
    if warning is not None:
        _warn(warning)
    preview = info.preview()
    shown = _next(info) + (f" ({preview})" if preview else "")
    click.echo(f"sequence {info.name!r} ready; next value {shown}")


@sequence.command("show")
@click.argument("name")
@click.option("--period", help="Show one period's counter (2026, 2026-03, 2026-03-07).")
@click.option("--date", "day", metavar="YYYY-MM-DD", help="Preview the next number for this date.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def sequence_show(
    ctx: click.Context, name: str, period: str | None, day: str | None, as_json: bool
) -> None:
    """Show sequence NAME: its definition, last value, next value and a preview of the
    next formatted number (nothing is reserved)."""
    from numbering.sequences import current_counter, get_sequence, period_date

    def read(connection: Any) -> tuple[SequenceInfo, Any]:
        if period is None:  # a periodic sequence: the counter of the date's period
            return current_counter(connection, name, day)
        when = period_date(get_sequence(connection, name), period, day)
        return get_sequence(connection, name, period), when

    info, when = _allocator(ctx).run(read, readonly=True)
    shown = _describe(info)
    shown["next_formatted"] = info.preview(when)
    if as_json:
        click.echo(json.dumps(shown, indent=2))
        return
    for field, value in shown.items():
        if field == "next_value" and info.exhausted:
            value = "exhausted (no more values)"
        click.echo(f"{field + ':':<16}{'-' if value is None else value}")


def _describe(info: SequenceInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "initial_value": info.initial_value,
        "reset_value": info.reset_value,
        "max_value": info.max_value,
        "last_value": info.last_value,
        "next_value": info.next_value,
        "exhausted": info.exhausted,
        "cycle": info.cycle,
        "format": info.format,
        "period": info.period,
        "period_key": info.period_key,
        "timezone": info.timezone,
        "frozen": info.frozen,
        "created_at": info.created_at.isoformat(),
        "updated_at": info.updated_at.isoformat(),
    }


@sequence.command("delete")
@click.argument("name")
@click.pass_context
def sequence_delete(ctx: click.Context, name: str) -> None:
    """Delete sequence NAME if it has never given a number (a typo, a test).

    Refused once its ledger holds any number: those are records and stay; freeze the
    sequence instead to refuse new ones."""
    info = _allocator(ctx).delete_sequence(name)
    click.echo(f"sequence {info.name!r} deleted (it had given no numbers)")


@sequence.command("freeze")
@click.argument("name")
@click.option("--period", help="Freeze one period only (year-end close: --period 2025).")
@click.pass_context
def sequence_freeze(ctx: click.Context, name: str, period: str | None) -> None:
    """Refuse new numbers from NAME (or one of its periods) until it is unfrozen.

    Requests are answered with a 'frozen' error and nothing is assigned; numbers already
    given stay as they are, and resent requests still get them."""
    info = _allocator(ctx).freeze(name, period)
    click.echo(f"sequence {info.name!r} frozen")


@sequence.command("unfreeze")
@click.argument("name")
@click.option("--period", help="Unfreeze one period only.")
@click.pass_context
def sequence_unfreeze(ctx: click.Context, name: str, period: str | None) -> None:
    """Accept requests on NAME (or one of its periods) again."""
    allocator = _allocator(ctx)
    info = allocator.unfreeze(name, period)
    if info.period is not None and period is None:
        from numbering.sequences import current_counter

        today, _ = allocator.run(lambda c: current_counter(c, name), readonly=True)
        click.echo(
            f"sequence {info.name!r} unfrozen; next value {_next(today)} in period "
            f"{today.period_key} (today)"
        )
        return
    click.echo(f"sequence {info.name!r} unfrozen; next value {_next(info)}")


def _next(info: SequenceInfo) -> str:
    """A counter's next value as shown to a person: "exhausted" when there is none."""
    return "exhausted" if info.next_value is None else str(info.next_value)


@main.command("void")
@click.argument("name")
@click.option("--key", help="Void the assignment of this request key.")
@click.option("--value", type=int, help="Void this number.")
@click.option("--period", help="The period of --value, for a periodic sequence.")
@click.option("--cycle", type=int, help="The cycle of --value (default: the current one).")
@click.option("--reason", required=True, help="Why (kept in the ledger for auditors).")
@click.pass_context
def void(
    ctx: click.Context,
    name: str,
    key: str | None,
    value: int | None,
    period: str | None,
    cycle: int | None,
    reason: str,
) -> None:
    """Void a number of sequence NAME, by --key or --value, with a --reason.

    The number stays in the ledger, marked voided with the reason and time; it is never
    given again and never deleted. `numbering audit` counts it and `numbering export`
    lists it."""
    done = _allocator(ctx).void(
        name, reason=reason, key=key, value=value, period=period, cycle=cycle
    )
    values = f"{done.value}" if done.count == 1 else f"{done.value}..{done.value + done.count - 1}"
    click.echo(f"voided {values} of {done.sequence!r} (key {done.key!r}): {done.reason}")


@sequence.command("list")
@click.pass_context
def sequence_list(ctx: click.Context) -> None:
    """List every sequence with its last value."""
    infos = _allocator(ctx).sequences()
    if not infos:
        click.echo("no sequences yet (numbering sequence create NAME)")
        return
    width = max(len("NAME"), *(len(i.name) for i in infos))
    last_width = max(12, *(len(str(i.last_value)) for i in infos))
    click.echo(f"{'NAME':<{width}}  {'LAST':>{last_width}}  {'NEXT':>{last_width}}  CYCLE")
    for info in infos:
        last = "-" if info.last_value is None else str(info.last_value)
        # A periodic sequence's own row never gives numbers: its periods' rows do.
        following = "per period" if info.period is not None else _next(info)
        click.echo(
            f"{info.name:<{width}}  {last:>{last_width}}  {following:>{last_width}}  {info.cycle}"
        )


# -- numbers -----------------------------------------------------------------------------------


@main.command("next")
@click.argument("name")
@click.option("--key", help="Request key; the same key always gets the same number.")
@click.option("--count", type=int, default=1, show_default=True, help="Consecutive values.")
@click.option("--reference", metavar="JSON", help="A JSON note stored in the ledger.")
@click.option(
    "--timeout",
    type=float,
    help=f"Seconds to wait for a worker (default: ${ENV['request_timeout']}, else 10).",
)
@click.option(
    "--direct",
    is_flag=True,
    help="Assign in the database from this process instead of through the queue.",
)
@click.option("--date", "day", metavar="YYYY-MM-DD", help="The document's date (default: today).")
@click.option("--json", "as_json", is_flag=True, help="Print the assignment as JSON.")
@click.pass_context
def next_(
    ctx: click.Context,
    name: str,
    key: str | None,
    count: int,
    reference: str | None,
    timeout: float | None,
    direct: bool,
    day: str | None,
    as_json: bool,
) -> None:
    """Take the next value (or COUNT values) of sequence NAME.

    The request goes through the sequence's queue to its worker (start one with
    `numbering worker --sequence NAME`), or with --direct straight to the database.
    Prints the value, or FIRST..LAST for a block, then the formatted number if the
    sequence has a format.
    """
    note = None
    if reference is not None:
        try:
            note = json.loads(reference)
        except json.JSONDecodeError as exc:
            _fail(f"--reference is not valid JSON: {exc}")
    known = _known_sequence(ctx, name)  # None: this process cannot tell
    if known is not None and day is not None:
        from numbering.policies import date_fields

        if known.period is None and not date_fields(known.format):
            _warn(
                f"sequence {name!r} has no periods and its format uses no date: --date "
                "changes nothing"
            )
    if direct:
        assignment = _allocator(ctx).next_block(
            name, count=count, key=key, reference=note, date=day
        )
    else:
        from numbering.client import Client

        _show_client_warnings()
        client = Client.from_settings(_settings(ctx))
        ctx.call_on_close(client.close)
        assignment = client.next_block(
            name, count=count, key=key, reference=note, timeout=timeout, date=day
        )
    if as_json:
        click.echo(
            json.dumps(
                {
                    "sequence": assignment.sequence,
                    "key": assignment.key,
                    "value": assignment.value,
                    "last": assignment.last,
                    "count": assignment.count,
                    "cycle": assignment.cycle,
                    "resent": assignment.resent,
                    "formatted": assignment.formatted,
                    "period": assignment.period,
                }
            )
        )
        return
    shown = (
        str(assignment.value) if assignment.count == 1 else f"{assignment.value}..{assignment.last}"
    )
    click.echo(shown if assignment.formatted is None else f"{shown} {assignment.formatted}")


def _known_sequence(ctx: click.Context, name: str) -> SequenceInfo | None:
    """Sequence ``name`` as the database has it; raises SequenceNotFoundError when the
    database says there is none (a request for it through the queue would wait for a
    worker that never comes); None when this process cannot reach the database or its
    schema (then the worker's answer is what counts)."""
    from sqlalchemy.engine import make_url

    from numbering.backends import backend_for
    from numbering.database import begin
    from numbering.errors import DatabaseError
    from numbering.sequences import get_sequence

    url = make_url(_settings(ctx).database_url)
    if backend_for(url).database_absent(url):
        return None  # do not create an empty database file by looking
    try:
        engine = _allocator(ctx).engine
        with begin(engine, "READ COMMITTED", readonly=True) as connection:
            return get_sequence(connection, name)
    except DatabaseError:
        return None


def _show_client_warnings() -> None:
    """The client's warnings (the broker cannot be reached, ...) as `warning:` lines on
    stderr; it says each one once, not at every resend."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    handler.setLevel(logging.WARNING)
    client_log = logging.getLogger("numbering.client")
    client_log.addHandler(handler)
    client_log.setLevel(min(client_log.getEffectiveLevel(), logging.WARNING))
    client_log.propagate = False


@main.command("worker")
@click.option(
    "--sequence",
    "sequences",
    multiple=True,
    metavar="NAME",
    help="Consume this sequence's queue (repeatable).",
)
@click.option(
    "--shard",
    "shards",
    multiple=True,
    metavar="I/K",
    help="Consume shard queue I of K (see NUMBERING_SHARDS; repeatable: one process can "
    "serve several shards, drained together).",
)
@click.option(
    "--shards",
    "fleet",
    type=int,
    metavar="K",
    help="Join the fleet of workers that serve all K shard queues together: each takes "
    "about K/N of them, and the others take a stopped worker's within seconds (K must "
    "match NUMBERING_SHARDS if set).",
)
@click.option(
    "--batch-size",
    type=int,
    help=f"Most requests per transaction (default: ${ENV['batch_size']}, else 500).",
)
@click.option(
    "--in-flight",
    "batches_in_flight",
    type=click.IntRange(1, 2),
    help="Batches in flight at once: 1 is one turn at a time, 2 takes the next batch while "
    f"the last one commits (default: ${ENV['batches_in_flight']}, else 1; SQLite: 1).",
)
@click.option("--loglevel", default="INFO", show_default=True, help="Celery worker log level.")
@click.option(
    "--events",
    "-E",
    "task_events",
    is_flag=True,
    help="Send Celery task events for the requests it answers (Flower, celery events).",
)
@click.pass_context
def worker(
    ctx: click.Context,
    sequences: tuple[str, ...],
    shards: tuple[str, ...],
    fleet: int | None,
    batch_size: int | None,
    batches_in_flight: int | None,
    loglevel: str,
    task_events: bool,
) -> None:
    """Run the single consumer for the given sequence queues.

    A Celery worker with a bulk consumer for its queues: it drains up to --batch-size
    waiting requests (from all its queues at once), assigns them in one
    transaction, answers each one, then acknowledges; with --in-flight 2 the next batch
    is taken, and its transaction started, while the last one commits. A
    second worker on the same queue waits as a standby for it and takes over if the
    first dies. With --shards K, any
    number of workers share the K shard queues, each the active consumer of about K/N.
    Stop it with Ctrl-C or SIGTERM: it finishes the batch in hand first.
    """
    from numbering.routing import Shard
    from numbering.tasks.app import worker_output
    from numbering.tasks.worker import build_worker

    settings = _settings(ctx)
    if batch_size is not None:
        settings = replace(settings, batch_size=batch_size)
    if batches_in_flight is not None:
        settings = replace(settings, batches_in_flight=batches_in_flight)
    worker_output(settings)  # as any worker of numbering's app gets it (tasks/app.py)
    parsed = [Shard.parse(shard) for shard in shards]
    if fleet is not None:
        if sequences or parsed:
            _fail("--shards K serves every shard queue: give no --sequence or --shard with it")
        if settings.shards not in (None, fleet):
            _fail(f"--shards {fleet} disagrees with NUMBERING_SHARDS={settings.shards}")
        Shard(0, fleet)  # K in range, or a clear error
        parsed = [Shard(index, fleet) for index in range(fleet)]
    if not sequences and not parsed:
        _fail("give at least one --sequence NAME, a --shard I/K, or --shards K")
    build_worker(
        settings,
        sequences,
        parsed,
        loglevel=loglevel,
        task_events=task_events,
        fleet=fleet is not None,
    ).start()


@main.command("batch")
@click.argument("sequence")
@click.option("--table", required=True, help="Table to number (must be in NUMBERING_BATCH_TABLES).")
@click.option("--id-column", default="id", show_default=True, help="Unique id column.")
@click.option(
    "--number-column", default="number", show_default=True, help="Column that gets the number."
)
@click.option(
    "--order-by",
    multiple=True,
    metavar="COLUMN",
    help="Number in this column's order (repeatable; ties by id). Default: id.",
)
@click.option(
    "--where",
    multiple=True,
    metavar="COLUMN=VALUE",
    help="Only rows where COLUMN equals VALUE (JSON if it parses, else text); repeatable.",
)
@click.option("--job", help="Job name for the ledger keys (default: TABLE.NUMBER_COLUMN).")
@click.option("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, show_default=True)
@click.pass_context
def batch(
    ctx: click.Context,
    sequence: str,
    table: str,
    id_column: str,
    number_column: str,
    order_by: tuple[str, ...],
    where: tuple[str, ...],
    job: str | None,
    chunk_size: int,
) -> None:
    """Number every row of --table that has no number yet from SEQUENCE, in place.

    One transaction per chunk writes the numbers and the ledger together; run the same
    command again after an interruption and it carries on where it stopped.
    """
    filters: dict[str, Any] = {}
    for pair in where:
        column, sep, raw = pair.partition("=")
        if not sep or not column:
            _fail(f"--where takes COLUMN=VALUE, got {pair!r}")
        try:
            filters[column] = json.loads(raw)
        except json.JSONDecodeError:
            filters[column] = raw
    spec = BatchJob(
        sequence=sequence,
        table=table,
        id_column=id_column,
        number_column=number_column,
        order_by=order_by,
        where=filters,
        job=job or "",
        chunk_size=chunk_size,
    )

    def show(progress: BatchProgress) -> None:
        total = max(progress.remaining_at_start, progress.numbered)
        percent = 100 * progress.numbered / total if total else 100
        click.echo(
            f"numbered {progress.numbered}/{total} rows ({percent:.0f}%), "
            f"{progress.rate:,.0f} rows/s, last number {progress.last_value}",
            err=True,
        )

    done = number_rows(
        _allocator(ctx), spec, allowed_tables=_settings(ctx).batch_tables, progress=show
    )
    if done.numbered:
        click.echo(
            f"numbered {done.numbered} row(s) of {table}: {done.first_value}..{done.last_value}"
        )
    else:
        click.echo(f"nothing to number: every matching row of {table} has a number")


# -- audit -------------------------------------------------------------------------------------


@main.command("demo")
@click.pass_context
def demo(ctx: click.Context) -> None:
    """Run the whole path on this machine: concurrent clients, a queue, the single
    consumer, the ledger, a table numbered in bulk, and the audit.

    With no settings it needs no server: an in-process queue and an SQLite file
    (./numbering.db). With NUMBERING_DATABASE_URL and NUMBERING_BROKER_URL set, it uses
    that database and broker, with a numbering worker running in this process.
    Exits 1 if the audit finds a problem."""
    from numbering.tasks.demo import run_demo

    reports = run_demo(_settings(ctx), click.echo)
    for report in reports:
        state = "ok" if report.ok else "PROBLEM"
        click.echo(
            f"audit {report.sequence}: {state}: {report.values} value(s) in "
            f"{report.assignments} assignment(s), gapless: {'yes' if report.ok else 'no'}"
        )
        if report.chain:
            click.echo(
                f"  hash chain: {report.chain} (numbering chain head, docs/tamper-evidence.md)"
            )
        for problem in report.problems:
            click.echo(f"  - {problem}")
    if not all(report.ok for report in reports):
        _fail("the audit found a problem")


@main.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option(
    "--check",
    is_flag=True,
    help="Exit 1 if requests wait with no consumer, or any are quarantined.",
)
@click.pass_context
def status(ctx: click.Context, as_json: bool, check: bool) -> None:
    """Show each sequence's last value, waiting and in-flight requests, quarantined
    requests, whether its active consumer is alive, and the age of its oldest waiting
    request. Changes nothing; --check makes it usable as a health check."""
    from numbering.tasks.preflight import check_database
    from numbering.tasks.status import collect

    settings, allocator = _settings(ctx), _allocator(ctx)
    statuses = collect(settings, allocator.engine)
    database = check_database(
        allocator.engine, allow_async_standby=settings.allow_reissue_after_failover
    )
    problems = [f"{s.sequence}: {p}" for s in statuses for p in s.problems]
    problems += [f"database: {p}" for p in database.problems]
    if as_json:
        click.echo(json.dumps([s.to_json() for s in statuses], indent=2))
    elif not statuses:
        click.echo("no sequences yet (numbering sequence create NAME)")
    else:
        rows = [
            (
                s.sequence + (" (frozen)" if s.frozen else ""),
                "-"
                if s.last_value is None
                else f"{s.last_value}" + (f" ({s.last_period})" if s.last_period else ""),
                _count(s.waiting),
                _count(s.in_flight),
                _count(s.quarantined),
                (f"alive: {s.holder}" if s.holder else "alive") if s.consumer else "NONE",
                "-" if s.oldest_waiting_seconds is None else f"{s.oldest_waiting_seconds:.1f}s",
            )
            for s in statuses
        ]
        header = ("SEQUENCE", "LAST", "WAITING", "IN FLIGHT", "QUARANTINED", "CONSUMER", "OLDEST")
        widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
        for row in (header, *rows):
            click.echo(
                "  ".join(
                    str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)
                ).rstrip()
            )
    if not as_json:
        # The database's state (replication, durability), as the worker's start-up check
        # sees it now: a failover, a standby gone or a setting changed shows here.
        for fact in database.facts:
            click.echo(f"database: {fact}")
        for problem in problems:
            click.echo(f"problem: {problem}", err=True)
        for warning in database.warnings:
            click.echo(f"warning: database: {warning}", err=True)
    if check and problems:
        sys.exit(EXIT_FAILURE)


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


@main.group("quarantine")
def quarantine() -> None:
    """List and replay requests quarantined after they stopped the worker."""


@quarantine.command("list")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def quarantine_list(ctx: click.Context, name: str | None, as_json: bool) -> None:
    """List quarantined requests (of sequence NAME, or all), oldest first."""
    from dataclasses import asdict

    from numbering.tasks.quarantine import list_quarantined

    found = list_quarantined(_settings(ctx), name)
    if as_json:
        click.echo(json.dumps([asdict(q) for q in found], indent=2))
        return
    if not found:
        click.echo("no quarantined requests")
        return
    for q in found:
        what = q.problem or f"sequence {q.sequence!r}, key {q.key!r}"
        click.echo(f"{q.queue}: task {q.task_id or '-'}: {what}")


@quarantine.command("replay")
@click.argument("name")
@click.pass_context
def quarantine_replay(ctx: click.Context, name: str) -> None:
    """Put sequence NAME's quarantined requests back in its queue, with fresh attempts.

    Do it once what stopped the worker is fixed. Safe for the ledger: a request that was
    in fact assigned gets its number back by key."""
    from numbering.tasks.quarantine import replay

    _allocator(ctx).sequence(name)  # an unknown sequence is an error, not "0 put back"
    moved = replay(_settings(ctx), name)
    if not moved:
        click.echo(f"nothing to replay: no quarantined requests of {name!r}")
        return
    click.echo(f"{moved} request(s) put back in the queue of {name!r}")


@main.command("audit")
@click.argument("name", required=False)
@click.pass_context
def audit(ctx: click.Context, name: str | None) -> None:
    """Check that every ledger (or NAME's) is gapless and agrees with its counter.

    Exits with status 1 if any sequence has a problem.
    """
    reports = _allocator(ctx).audit(name)
    if not reports:
        click.echo("no sequences to audit")
        return
    from numbering.ledger import describe

    bad = 0
    for report in reports:
        for line in describe(report):
            click.echo(line)
        bad += not report.ok
    if bad:
        _fail(f"{bad} of {len(reports)} sequence(s) failed the audit")


@main.command("export")
@click.argument("name")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "json", "chain"]),
    default="csv",
    show_default=True,
    help="Output format. chain: the hash chain of each counter, one JSON record a line, in "
    "link order, for `numbering chain verifier`'s script.",
)
@click.option(
    "--period", help="Export one period of a periodic sequence (2025, 2025-03, 2025-03-07)."
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, allow_dash=True),
    default="-",
    help="File to write (default: stdout); written only once the sequence is found.",
)
@click.pass_context
def export(ctx: click.Context, name: str, fmt: str, period: str | None, output: str) -> None:
    """Write sequence NAME's ledger for auditors, one row per assignment, in value order
    (csv, json), or its hash chain (chain).

    NAME/PERIOD (invoices/2025) is the same as NAME --period PERIOD."""
    from numbering.validation import PERIOD_SEPARATOR

    if PERIOD_SEPARATOR in name:
        name, _, named = name.partition(PERIOD_SEPARATOR)
        if period is not None and period != named:
            _fail(f"{name}{PERIOD_SEPARATOR}{named} and --period {period} name two periods")
        period = named
    allocator = _allocator(ctx)
    rows = (
        allocator.export_chain(name, period) if fmt == "chain" else allocator.export(name, period)
    )
    first = next(rows, None)  # an unknown sequence or period fails here, before any output
    with click.open_file(output, "w", encoding="utf-8") as out:
        _write_export(out, fmt, first, rows)
    if fmt == "chain" and first is None:
        click.echo(
            f"note: {name!r} has no hash chain yet (no number given since chains, or not "
            "back-filled: `numbering chain backfill`)",
            err=True,
        )


def _write_export(out: Any, fmt: str, first: dict[str, Any] | None, rest: Any) -> None:
    rows = [] if first is None else itertools.chain([first], rest)
    if fmt == "chain":
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=EXPORT_FIELDS)
        writer.writeheader()
        for row in rows:
            row["reference"] = None if row["reference"] is None else json.dumps(row["reference"])
            writer.writerow(row)
        return
    out.write("[")
    for index, row in enumerate(rows):
        out.write(("," if index else "") + "\n  " + json.dumps(row))
    out.write("\n]\n")


# -- the hash chain ------------------------------------------------------------------------------


@main.group("chain")
def chain_group() -> None:
    """The hash chain of each counter: back-fill, heads, the auditor's verifier.

    Every number, void and rename is chained to the record before it by a SHA-256
    fingerprint; `numbering audit` checks the chains (docs/tamper-evidence.md)."""


@chain_group.command("backfill")
@click.option(
    "--chunk",
    type=click.IntRange(1, 1_000_000),
    default=10_000,
    show_default=True,
    help="Rows chained per transaction (each holds its counter's lock that long).",
)
@click.pass_context
def chain_backfill(ctx: click.Context, chunk: int) -> None:
    """Chain the numbers given before hash chains existed (a database upgraded from an
    earlier version). Each counter's chain starts with a record saying how many numbers
    it held then. Safe to stop and run again; workers carry on meanwhile."""
    from numbering.ledger import Backfilled

    def show(step: Backfilled) -> None:
        started = " (chain started)" if step.started else ""
        click.echo(f"{step.counter}: {step.chained} chained{started}, {step.left} left")

    total = _allocator(ctx).backfill_chains(chunk=chunk, progress=show)
    click.echo(
        f"{total} number(s) chained" if total else "nothing to back-fill: every number is chained"
    )


@chain_group.command("head")
@click.argument("name", required=False)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one JSON object a line, the form the verifier's --heads reads.",
)
@click.pass_context
def chain_head(ctx: click.Context, name: str | None, fmt: str) -> None:
    """Print the head of every counter's chain (or NAME's counters'): its last link and
    fingerprint. Keep it somewhere the database's owners cannot write (a mail, a
    timestamping service, another system): a later export must still contain it, or
    the ledger was rewritten."""
    heads = _allocator(ctx).chain_heads(name)
    for head in heads:
        if fmt == "json":
            click.echo(json.dumps(head, ensure_ascii=False))
        else:
            click.echo(
                f"{head['counter']}: link {head['link']} {head['fingerprint']} at {head['at']}"
            )
    if not heads and fmt == "text":
        click.echo("no chains yet", err=True)


@chain_group.command("verifier")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, allow_dash=True),
    default="-",
    help="File to write (default: stdout).",
)
def chain_verifier(output: str) -> None:
    """Write the standalone verifier: a Python script that checks a chain export
    (`numbering export NAME --format chain`) with nothing but Python's standard
    library. Run it as `python verify_chain.py EXPORT [--heads HEADS]`."""
    from importlib import resources

    source = resources.files("numbering").joinpath("chain.py").read_text(encoding="utf-8")
    with click.open_file(output, "w", encoding="utf-8") as out:
        out.write(source)


if __name__ == "__main__":  # pragma: no cover
    main()
