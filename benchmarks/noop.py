"""A stock Celery app with one no-op task: the cost of the queue hop itself.

Started by the benchmark as ``celery -A benchmarks.noop worker``; broker and result
backend come from BENCH_CELERY_BROKER and BENCH_CELERY_BACKEND.
"""

from __future__ import annotations

import os

from celery import Celery


def make_app(broker: str, backend: str) -> Celery:
    app = Celery("bench", broker=broker, backend=backend)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
    )

    @app.task(name="bench.noop")
    def noop() -> None:
        return None

    return app


app = make_app(
    os.environ.get("BENCH_CELERY_BROKER", "redis://127.0.0.1:6379/12"),
    os.environ.get("BENCH_CELERY_BACKEND", "redis://127.0.0.1:6379/13"),
)
