"""The Celery configuration numbering's workers and clients run with.

Each setting below is mandated, and the comment says why. Numbering requests are
idempotent by request key, so at-least-once delivery is safe and at-most-once is not:
every choice prefers a redelivery to a lost request.
"""

from __future__ import annotations

from typing import Any

from numbering.brokers import broker_kind, is_sentinel
from numbering.routing import QUEUE_PREFIX
from numbering.settings import Settings

__all__ = ["CONTROL_QUEUE", "TASK_TIME_LIMIT", "VISIBILITY_TIMEOUT", "celery_config"]

# Seconds before Redis hands an unacknowledged message to another consumer. Must exceed
# the longest a task can run, or a slow task would be delivered twice while it runs.
VISIBILITY_TIMEOUT = 600
# Hard limit on one task; below the visibility timeout (see above).
TASK_TIME_LIMIT = 300
# Soft limit: the task gets SoftTimeLimitExceeded first and can end cleanly.
TASK_SOFT_TIME_LIMIT = 270
# Celery's own consumer in a numbering worker listens here (remote control and admin
# tasks); number requests are drained in bulk by numbering's consumer, not by Celery's.
CONTROL_QUEUE = QUEUE_PREFIX + "control"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for ``settings``' broker and result backend."""
    transport: dict[str, Any] = {"visibility_timeout": VISIBILITY_TIMEOUT}
    backend: dict[str, Any] = {}
    if is_sentinel(settings.broker_url):
        transport["master_name"] = settings.sentinel_master
    if broker_kind(settings.broker_url) == "amqp":
        # Publisher confirms: a request counts as sent once RabbitMQ has it (on a quorum
        # queue, once a majority of its nodes have it), so a message lost at a node's
        # failure is sent again at once rather than after the caller's resend interval.
        transport["confirm_publish"] = True
    if is_sentinel(settings.result_backend):
        backend["master_name"] = settings.sentinel_master
    return {
        "broker_url": settings.broker_url,
        "result_backend_transport_options": backend,
        "result_backend": settings.result_backend,
        # JSON only: the broker is not trusted, and pickle would run code from it.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Acknowledge after the number is committed and answered, never before: a worker
        # that dies mid-request leaves the message to be redelivered.
        "task_acks_late": True,
        # ... including when the worker process is killed (SIGKILL, OOM).
        "task_reject_on_worker_lost": True,
        # One message reserved at a time by Celery's own consumer: nothing waits in a
        # dead worker's buffer.
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": transport,
        "task_time_limit": TASK_TIME_LIMIT,
        "task_soft_time_limit": TASK_SOFT_TIME_LIMIT,
        "task_default_queue": CONTROL_QUEUE,
        # Results are a convenience for plain Celery callers; the ledger is the record.
        "result_expires": 3600,
        "broker_connection_retry_on_startup": True,
        # A broker error on a channel is passing, not fatal: a Redis master that lost its
        # replicas answers NOREPLICAS (min-replicas-to-write), one demoted by a failover
        # READONLY or UNBLOCKED. Without this, Celery's consumer stopped the whole worker
        # ("Unrecoverable error: ResponseError"); with it, it reconnects, through the
        # sentinels to the new master.
        "broker_channel_error_retry": True,
        "worker_hijack_root_logger": False,
    }
