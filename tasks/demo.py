"""`numbering demo`: the whole path on one machine, with no servers by default.

Requests from many client threads go through a queue to a single consumer, which
assigns each batch in one database transaction with numbering's own batch processor,
answers every request, and the ledger is audited at the end. Then a table of documents
is numbered in bulk.

Without ``NUMBERING_BROKER_URL`` in the environment the queue is in-process (the
in-memory transport of :mod:`numbering.tasks.memory` between the client threads and the
worker's own consumer loop; messages are passed as objects, not encoded) and the ledger
is the SQLite file of ``NUMBERING_DATABASE_URL`` (default ``./numbering.db``). With
``NUMBERING_BROKER_URL`` set, the same demo runs a real numbering worker in this process
and the real client over that broker.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable

import sqlalchemy as sa

from numbering.allocator import Allocator
from numbering.assignment import Request
from numbering.backends import backend_for
from numbering.batch import BatchJob, number_rows
from numbering.errors import NumberingError
from numbering.ledger import AuditReport
from numbering.messages import Job
from numbering.migrations import upgrade
from numbering.replies import error_from_reply, new_reply_list
from numbering.routing import sequence_queue
from numbering.settings import ENV, Settings
from numbering.tasks.consumer import BatchProcessor, Consumer
from numbering.tasks.memory import MemoryBroker, MemoryReplies, MemoryTransport

__all__ = ["run_demo"]

SEQUENCE = "demo-invoices"
DOCUMENTS = "demo_documents"
CLIENTS, PER_CLIENT, DOCUMENT_ROWS = 8, 250, 5000

Say = Callable[[str], None]


class _LocalBroker:
    """The in-memory transport with one consumer thread: the worker's loop and batch
    processor, in-process queues instead of a broker."""

    def __init__(self, allocator: Allocator, batch_size: int) -> None:
        self.broker = MemoryBroker()
        self.replies = MemoryReplies()
        self.processor = BatchProcessor(allocator, self.replies)
        self.stop = threading.Event()
        self.consumer = Consumer(
            MemoryTransport(self.broker, [sequence_queue(SEQUENCE)]),
            self.processor,
            batch_size=batch_size,
            stop=self.stop,
        )
        self.thread = threading.Thread(target=self.consumer.run, name="numbering:demo", daemon=True)
        self.thread.start()

    @property
    def batches(self) -> int:
        """Transactions the consumer committed."""
        return self.processor.transactions

    def next_value(self, sequence: str, key: str) -> int:
        reply_to = new_reply_list()
        self.broker.publish(
            sequence_queue(sequence), Job(uuid.uuid4().hex, sequence, Request(key), reply_to)
        )
        reply = self.replies.wait(reply_to, 60)
        if reply is None:
            raise NumberingError(f"no answer for {key!r} in 60 s")
        if "error" in reply:
            raise error_from_reply(reply["error"])
        return int(reply["value"])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


class _RealBroker:
    """A numbering worker in this process, and the client, over the configured broker."""

    def __init__(self, settings: Settings) -> None:
        from numbering.client import Client
        from numbering.tasks.app import create_app
        from numbering.tasks.worker import NumberingWorker

        self.worker = NumberingWorker(
            settings, [sequence_queue(SEQUENCE)], None, create_app(settings)
        )
        self.worker.start()
        self.client = Client.from_settings(settings)

    @property
    def batches(self) -> int:
        """Transactions the worker committed (the demo's resend of one key included)."""
        return self.worker.processor.transactions

    def next_value(self, sequence: str, key: str) -> int:
        return self.client.next_value(sequence, key=key)

    def close(self) -> None:
        self.client.close()
        self.worker.shutdown()


def run_demo(settings: Settings, say: Say) -> list[AuditReport]:
    """Run the demo; return the audit of what it numbered."""
    engine_url = settings.database_url
    say(f"ledger: {engine_url.split('://')[0]} ({_where(engine_url)})")
    allocator = Allocator.from_settings(settings)
    schema = upgrade(allocator.engine)
    say(f"schema at revision {schema.after}")
    allocator.create_sequence(SEQUENCE, format="INV-{year}-{number:05d}", exist_ok=True)
    real = bool(os.environ.get(ENV["broker_url"]))
    broker: _LocalBroker | _RealBroker
    if real:
        say(f"queue: {settings.broker_url.split('://')[0]} broker, a numbering worker here")
        broker = _RealBroker(settings)
    else:
        say("queue: in-process (set NUMBERING_BROKER_URL to use Redis or RabbitMQ)")
        broker = _LocalBroker(allocator, settings.batch_size)
    run = uuid.uuid4().hex[:8]
    try:
        _burst(broker, run, say)
    finally:
        broker.close()
    say(f"  the single consumer assigned them in {broker.batches} transaction(s)")
    _documents(allocator, say)
    reports = allocator.audit(SEQUENCE)
    allocator.close()
    return reports


def _where(url: str) -> str:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return backend_for(parsed).location(parsed)


def _burst(broker: _LocalBroker | _RealBroker, run: str, say: Say) -> None:
    total = CLIENTS * PER_CLIENT
    say(f"{CLIENTS} clients each ask for {PER_CLIENT} invoice numbers at once")
    got: list[int] = []
    first: list[int] = []
    errors: list[BaseException] = []

    def clerk(c: int) -> None:
        try:
            for i in range(PER_CLIENT):
                got.append(broker.next_value(SEQUENCE, f"demo:{run}:{c}:{i}"))
                if (c, i) == (0, 0):
                    first.append(got[-1])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=clerk, args=(c,)) for c in range(CLIENTS)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        time.sleep(0.5)
        say(f"  {len(got):5d} / {total} numbered")
    if errors:
        raise errors[0]
    elapsed = time.monotonic() - started
    say(f"  {total} numbers in {elapsed:.1f} s: {min(got)}..{max(got)}, each once")
    again = broker.next_value(SEQUENCE, f"demo:{run}:0:0")
    say(f"  client 0's first request got {first[0]}; sent again with its key: {again}")


def _documents(allocator: Allocator, say: Say) -> None:
    with allocator.engine.begin() as conn:
        table = sa.Table(
            DOCUMENTS,
            sa.MetaData(),
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("number", sa.BigInteger, nullable=True),
        )
        table.create(conn, checkfirst=True)
        start = conn.execute(sa.select(sa.func.coalesce(sa.func.max(table.c.id), 0))).scalar_one()
        conn.execute(
            table.insert(), [{"id": start + i + 1, "number": None} for i in range(DOCUMENT_ROWS)]
        )
    say(f"numbering {DOCUMENT_ROWS} documents in table {DOCUMENTS}, 1,000 rows per transaction")
    done = number_rows(
        allocator,
        BatchJob(SEQUENCE, DOCUMENTS, chunk_size=1000),
        allowed_tables=[DOCUMENTS],
        progress=lambda p: say(f"  {p.numbered:5d} / {p.remaining_at_start} documents numbered"),
    )
    say(f"  documents got {done.first_value}..{done.last_value}")
