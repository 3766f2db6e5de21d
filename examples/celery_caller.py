"""A plain Celery app asks numbering for a number, without numbering's client.

This is what an app that already uses Celery does (or any Celery client, in any
language: the task, its arguments and the queue are all there is). Run it with a
numbering worker for the sequence running, and the worker's ``NUMBERING_*`` settings:

    python -m examples.celery_caller invoices invoice:42
    python -m examples.celery_caller invoices invoice:42      # the same number, resent
    python -m examples.celery_caller invoices batch:7 --count 100

Two things a plain caller must get right:

1. **The queue**: the sequence's own, ``numbering.<sequence>`` (or its shard's), declared
   as numbering declares it. ``kombu_queue`` gives the declaration; on RabbitMQ a queue
   declared with other arguments is refused.
2. **The result backend**: the worker stores a plain caller's answer in *numbering's*
   result backend, ``NUMBERING_RESULT_BACKEND`` (``numbering config`` prints it),
   whatever backend the caller would pick. So the caller reads its results there. (On
   RabbitMQ a caller on ``rpc://`` is answered on its own reply queue as well.) The
   worker logs once per caller where its answers go.

The key makes the request safe to send again: after a timeout or a crash, asking with
the same key returns the number already assigned (``resent: true``), never a second one.
"""

from __future__ import annotations

import argparse
import json
import sys

from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout

from numbering.errors import NumberingError
from numbering.routing import TASK_NAME, kombu_queue, queue_for
from numbering.settings import Settings, mask_url


def celery_app(settings: Settings) -> Celery:
    """A plain Celery app on numbering's broker that reads numbering's result backend."""
    return Celery(
        "caller",
        broker=settings.broker_url,
        backend=settings.result_backend,  # numbering's: where the worker answers
        set_as_current=False,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("sequence")
    parser.add_argument("key", help="the request key: the same key gets the same number")
    parser.add_argument("--count", type=int, default=1, help="a block of COUNT numbers")
    parser.add_argument("--reference", help="stored with the number in the ledger")
    parser.add_argument("--date", help="ISO date, for periodic sequences (default: today)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    kwargs = {"sequence": args.sequence, "key": args.key, "count": args.count}
    if args.reference is not None:
        kwargs["reference"] = args.reference
    if args.date is not None:
        kwargs["date"] = args.date
    queue = kombu_queue(queue_for(args.sequence, settings.shards), settings.queue_type)
    result = celery_app(settings).send_task(TASK_NAME, kwargs=kwargs, queue=queue)
    try:
        answer = result.get(timeout=args.timeout)
    except NumberingError as error:  # refused: the task failed with numbering's error
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    except CeleryTimeout:
        print(
            f"error: no answer in {args.timeout:g} s. Is a worker serving {queue.name}? "
            f"This app reads {mask_url(settings.result_backend)}, which must be the "
            "worker's NUMBERING_RESULT_BACKEND. Asking again with the same key is safe.",
            file=sys.stderr,
        )
        return 2
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
