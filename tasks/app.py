"""The Celery app and the ``numbering.assign`` task.

A numbering worker drains its queues in bulk (see :mod:`numbering.tasks.consumer`). The
task registered here is the same operation for a message that a stock Celery worker
consumes one at a time (``celery -A numbering.tasks.app worker -Q numbering.invoices``):
slower, equally correct, because the database does the serialising.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from celery import Celery
from celery.signals import after_setup_logger, celeryd_init

from numbering.allocator import Allocator
from numbering.batch import BatchJob, number_rows
from numbering.config.celery import celery_config
from numbering.errors import InvalidRequestError, NumberingError
from numbering.replies import reply_for
from numbering.routing import BATCH_TASK_NAME, FREEZE_TASK_NAME, TASK_NAME, VOID_TASK_NAME
from numbering.settings import Settings

__all__ = ["create_app", "worker_output"]  # and `app`, created on first access (__getattr__)

_WIRED: list[bool] = []


def worker_output(settings: Settings) -> None:
    """Set up a worker's output: line-buffered streams (a service's log must reach its
    file, journald or ``docker logs`` line by line, not in 8 KiB blocks that die with the
    process) and, with ``NUMBERING_LOG_FORMAT=json``, JSON log lines on every handler,
    Celery's included. ``numbering worker`` calls it; any worker of an app made by
    :func:`create_app` (``celery -A numbering.tasks.app worker``) gets it on start-up.
    Once per process."""
    if _WIRED:
        return
    _WIRED.append(True)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    if settings.log_format == "json":
        from numbering.logs import JsonFormatter

        def json_lines(logger: logging.Logger, **_: object) -> None:
            for handler in logger.handlers:
                handler.setFormatter(JsonFormatter())

        json_lines(logging.getLogger())  # the handlers set up so far ...
        after_setup_logger.connect(json_lines, weak=False)  # ... and any Celery adds


def create_app(settings: Settings | None = None) -> Celery:
    """A Celery app configured for numbering, with the ``numbering.assign`` task."""
    settings = settings or Settings.from_env()
    celery = Celery("numbering", set_as_current=False)
    celery.conf.update(celery_config(settings))

    def on_worker_init(**_: object) -> None:
        worker_output(settings)

    celeryd_init.connect(on_worker_init, weak=False, dispatch_uid="numbering.worker_output")
    allocators: dict[int, Allocator] = {}

    def shared_allocator() -> Allocator:
        """One allocator (and connection pool) per worker process, made on first use."""
        allocator = allocators.get(0)
        if allocator is None:
            allocator = allocators.setdefault(0, Allocator.from_settings(settings))
        return allocator

    @celery.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True, max_retries=0)
    def assign(
        sequence: str, key: str, count: int = 1, reference: Any = None, date: str | None = None
    ) -> dict[str, Any]:
        allocator = shared_allocator()
        try:
            block = allocator.next_block(
                sequence, count=count, key=key, reference=reference, date=date
            )
        except NumberingError as error:
            return reply_for(key, error)
        return reply_for(key, block)

    @celery.task(name=BATCH_TASK_NAME, acks_late=True, reject_on_worker_lost=True, max_retries=0)
    def batch(**spec: Any) -> dict[str, Any]:
        # The broker is not trusted: BatchJob validates every field, and the table must
        # be on this deployment's allow-list.
        allocator = shared_allocator()
        if "order_by" in spec and isinstance(spec["order_by"], list):
            spec["order_by"] = tuple(spec["order_by"])
        try:
            done = number_rows(allocator, BatchJob(**spec), allowed_tables=settings.batch_tables)
        except TypeError as exc:
            raise InvalidRequestError(f"invalid batch job: {exc}") from None
        return {
            "numbered": done.numbered,
            "chunks": done.chunks,
            "first_value": done.first_value,
            "last_value": done.last_value,
        }

    @celery.task(name=VOID_TASK_NAME, acks_late=True, reject_on_worker_lost=True, max_retries=0)
    def void(
        sequence: str,
        reason: str,
        key: str | None = None,
        value: int | None = None,
        period: str | None = None,
        cycle: int | None = None,
    ) -> dict[str, Any]:
        # Idempotent enough for redelivery: a second copy answers "already voided".
        allocator = shared_allocator()
        try:
            done = allocator.void(
                sequence, reason=reason, key=key, value=value, period=period, cycle=cycle
            )
        except NumberingError as error:
            return reply_for(key, error)
        return {
            "sequence": done.sequence,
            "key": done.key,
            "value": done.value,
            "count": done.count,
            "cycle": done.cycle,
            "reason": done.reason,
            "voided_at": done.voided_at.isoformat(),
        }

    @celery.task(name=FREEZE_TASK_NAME, acks_late=True, reject_on_worker_lost=True, max_retries=0)
    def freeze(sequence: str, period: str | None = None, frozen: Any = True) -> dict[str, Any]:
        allocator = shared_allocator()
        if not isinstance(frozen, bool):  # the broker is not trusted: "false" is not False
            return reply_for(None, InvalidRequestError("frozen must be true or false"))
        try:
            if frozen:
                info = allocator.freeze(sequence, period)
            else:
                info = allocator.unfreeze(sequence, period)
        except NumberingError as error:
            return reply_for(None, error)
        return {"sequence": info.name, "frozen": info.frozen}

    return celery


def __getattr__(name: str) -> Any:
    # `celery -A numbering.tasks.app` finds `app` here, configured from NUMBERING_*.
    # Created on first use only: numbering's own worker builds its app from its settings,
    # and two apps registering the same task names would warn.
    if name == "app":
        globals()["app"] = created = create_app()
        return created
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
