"""Worker start-up: a Celery worker whose numbering queues are drained in bulk.

``numbering worker --sequence invoices`` starts a Celery worker (visible to ``celery
inspect`` and Flower, with remote control on the control queue) plus numbering's bulk
consumer, started and stopped with the worker as a bootstep: one consumer thread for
all of the process's queues, on Redis and on RabbitMQ.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Sequence
from typing import Any, ClassVar

from celery import Celery, bootsteps

from numbering.allocator import Allocator
from numbering.brokers import is_redis, redis_client
from numbering.config.celery import CONTROL_QUEUE
from numbering.errors import ConfigurationError
from numbering.routing import Shard, sequence_queue
from numbering.settings import Settings
from numbering.tasks.app import create_app
from numbering.tasks.consumer import BatchProcessor, Consumer
from numbering.tasks.events import TaskEvents, show_queues, task_events_switch
from numbering.tasks.failover import FailoverWatch
from numbering.tasks.metrics import WorkerMetrics
from numbering.tasks.preflight import check_ledgers, run_preflight
from numbering.tasks.transport import open_broker, open_transport

__all__ = ["NumberingWorker", "build_worker", "queues_for"]

log = logging.getLogger("numbering.worker")

# Celery's own pool runs one task at a time; numbering's consumers have threads of their own.
CONCURRENCY = 1


def queues_for(sequences: Sequence[str], shards: Sequence[Shard] = ()) -> list[str]:
    """The queues a worker for ``sequences`` and ``shards`` consumes."""
    queues = [sequence_queue(s) for s in sequences] + [shard.queue for shard in shards]
    if len({shard.count for shard in shards}) > 1:
        raise ConfigurationError("every --shard of a worker must have the same count K")
    if not queues:
        raise ConfigurationError("give at least one --sequence NAME or a --shard I/K")
    if len(set(queues)) != len(queues):
        raise ConfigurationError("a queue was named twice")
    return queues


class NumberingWorker:
    """The bulk consumers of one worker process (a thread each)."""

    def __init__(
        self,
        settings: Settings,
        queues: Sequence[str],
        shards: Sequence[Shard] | Shard | None,
        app: Celery,
        *,
        sequences: Sequence[str] = (),
        fleet: int | None = None,
    ) -> None:
        if not is_redis(settings.result_backend):
            raise ConfigurationError("numbering replies need a Redis NUMBERING_RESULT_BACKEND")
        self.settings = settings
        # Each queue's consumer keeps a connection for its lock (PostgreSQL advisory lock)
        # and takes another for each batch: room for both, so that a worker serving many
        # queues never waits on its own pool.
        self.allocator = Allocator.from_settings(settings, pool_size=2 * len(queues) + 1)
        self.replies = redis_client(settings.result_backend, settings.sentinel_master)
        self.stop = threading.Event()
        self.metrics = WorkerMetrics(self.allocator.stats)
        if isinstance(shards, Shard):
            shards = [shards]
        owner = {shard.queue: shard for shard in shards or ()}
        served = (list(sequences), list(shards or ()))
        engine = self.allocator.engine
        #: Notices a failover (a new timeline) and checks counters before numbering on.
        self.failover = FailoverWatch(engine, lambda: check_ledgers(engine, *served))

        # One consumer for all the queues, which refuses on each shard queue the sequences
        # of other shards: each turn takes what waits on any of them into one transaction.
        processor = BatchProcessor(self.allocator, self.replies, app, self.metrics)
        processor.failover = self.failover
        self.processor = processor
        transport = open_transport(
            settings, queues, engine=engine, replies=self.replies, stop=self.stop, fleet=fleet
        )
        # Consumer locks live in the database: after a failover, take them again on the
        # new primary before consuming on.
        self.failover.on_failover.append(transport.recheck)
        self.consumers = [
            Consumer(
                transport,
                processor,
                batch_size=settings.batch_size,
                stop=self.stop,
                shards=owner,
                in_flight=settings.batches_in_flight,
            )
        ]
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        if self.settings.metrics_port is not None:
            self.metrics.serve(self.settings.metrics_port)
            log.info("metrics on port %d (/metrics)", self.settings.metrics_port)
        for consumer in self.consumers:
            thread = threading.Thread(
                target=consumer.run, name=f"numbering:{consumer.name}", daemon=True
            )
            thread.start()
            self.threads.append(thread)

    def shutdown(self, timeout: float = 60) -> None:
        """Finish the batches in hand, then stop."""
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout)
        self.allocator.close()


def build_worker(
    settings: Settings,
    sequences: Sequence[str],
    shards: Sequence[Shard] | Shard | None = None,
    *,
    loglevel: str = "INFO",
    task_events: bool = False,
    fleet: bool = False,
) -> Any:
    """A Celery worker (``WorkController``) with numbering's bulk consumers attached.

    ``task_events`` (``-E``): send Celery task events for the requests it answers, for
    Flower and ``celery events`` (see :mod:`numbering.tasks.events`)."""
    if isinstance(shards, Shard):
        shards = [shards]
    shards = list(shards or ())
    for shard in shards:
        if settings.shards not in (None, shard.count):
            raise ConfigurationError(
                f"--shard {shard.index}/{shard.count} disagrees with "
                f"NUMBERING_SHARDS={settings.shards}"
            )
    queues = queues_for(sequences, shards)
    app = create_app(settings)
    numbering = NumberingWorker(
        settings, queues, shards, app, sequences=sequences, fleet=shards[0].count if fleet else None
    )

    class BulkConsumers(bootsteps.StartStopStep):
        requires: ClassVar[set[str]] = {"celery.worker.components:Pool"}

        def start(self, worker: Any) -> None:
            for warning in warnings:
                log.warning("%s", warning)
            log.info("numbering worker consuming %s", ", ".join(queues))
            numbering.processor.events = TaskEvents(
                app, worker.hostname, task_events_switch(worker)
            )
            numbering.start()

        def stop(self, worker: Any) -> None:
            numbering.shutdown()
            if numbering.processor.events is not None:
                numbering.processor.events.close()

    broker = open_broker(settings)
    try:
        warnings = run_preflight(
            app.conf,
            numbering.allocator.engine,
            broker,
            concurrency=CONCURRENCY,
            sequences=sequences,
            shards=shards,
            allow_async_standby=settings.allow_reissue_after_failover,
            redis_urls=[
                url for url in (settings.broker_url, settings.result_backend) if is_redis(url)
            ],
            sentinel_master=settings.sentinel_master,
            queues=queues,
        )
    finally:
        broker.close()
    numbering.failover.remember()  # the counters as they are: a failover must not go below
    app.steps["worker"].add(BulkConsumers)
    show_queues(
        queues, settings.queue_type
    )  # `celery inspect active_queues` lists them beside the control queue
    return app.Worker(
        task_events=task_events,
        queues=[CONTROL_QUEUE],
        concurrency=CONCURRENCY,
        pool="solo",
        loglevel=loglevel,
        hostname=f"numbering-{os.getpid()}@{socket.gethostname()}",
        without_mingle=True,
        without_gossip=True,
    )
