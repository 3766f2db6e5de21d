"""What Celery's tools see of a numbering worker: its queues, and task events.

numbering's bulk consumer reads the sequence queues itself, so Celery's own consumer
knows only the control queue: ``celery inspect active_queues`` listed ``numbering.control``
alone, and Flower saw no task for a number request. Here:

- :func:`show_queues` makes ``active_queues`` list the queues the bulk consumer serves
  too, declared as the client declares them;
- :class:`TaskEvents` sends the Celery task events of every request a batch answered
  (``task-received``, ``task-started``, then ``task-succeeded`` or ``task-failed``) while
  the worker sends task events: started with ``-E``, or after ``celery control
  enable_events`` (Flower asks for it). The events of one batch travel as one message
  (Celery's buffered ``task.multi`` form, which Flower and ``celery events`` read), and a
  worker that sends no task events pays one attribute check per batch.

Events are best effort, as in Celery: one that cannot be sent is dropped and logged
once, and never holds a batch up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from celery import Celery
from celery.worker import control

from numbering.assignment import Outcome
from numbering.errors import NumberingError
from numbering.messages import BadMessage, Job
from numbering.replies import reply_for
from numbering.routing import TASK_NAME, kombu_queue

__all__ = ["TaskEvents", "show_queues"]

log = logging.getLogger("numbering.worker")

# The queues the bulk consumers of this process serve, for ``active_queues``.
_SERVED: list[str] = []
_QUEUE_TYPE = ["classic"]  # as the worker declares them (NUMBERING_QUEUE_TYPE)
_CELERY_ACTIVE_QUEUES = control.Panel.data["active_queues"]


def show_queues(queues: Sequence[str], queue_type: str = "classic") -> None:
    """Make ``celery inspect active_queues`` list ``queues`` beside Celery's own."""
    _SERVED[:] = list(queues)
    _QUEUE_TYPE[0] = queue_type
    control.inspect_command(name="active_queues")(_active_queues)


def _active_queues(state: Any) -> list[dict[str, Any]]:
    """List the task queues a worker is currently consuming from."""
    own: list[dict[str, Any]] = _CELERY_ACTIVE_QUEUES(state)
    named = {queue.get("name") for queue in own}
    return own + [
        dict(kombu_queue(queue, _QUEUE_TYPE[0]).as_dict(recurse=True))
        for queue in _SERVED
        if queue not in named
    ]


class TaskEvents:
    """The Celery task events of the requests a worker answers (see the module doc).

    ``switch`` says whether the worker sends task events now; it is read once per batch.
    """

    def __init__(self, app: Celery, hostname: str, switch: Callable[[], bool]) -> None:
        self.app = app
        self.hostname = hostname
        self.switch = switch
        self._connection: Any = None
        self._dispatcher: Any = None
        self._failing = False

    def batch(
        self,
        items: Sequence[Job | BadMessage],
        outcomes: dict[int, Outcome],
        received: float,
        runtime: float | None,
    ) -> None:
        """Send the events of one answered batch (nothing while events are off)."""
        if not self.switch():
            return
        try:
            dispatcher = self._open()
            finished = time.time()
            for index, item in enumerate(items):
                if item.task_id is None:
                    continue
                self._send_one(dispatcher, item, outcomes[index], received, finished, runtime)
            dispatcher.flush()
        except Exception as exc:
            if not self._failing:
                log.warning("could not send task events: %s; dropping them", exc)
            self._failing = True
            self.close()
            return
        if self._failing:
            log.warning("task events are sent again")
        self._failing = False

    def _send_one(
        self,
        dispatcher: Any,
        item: Job | BadMessage,
        outcome: Outcome,
        received: float,
        finished: float,
        runtime: float | None,
    ) -> None:
        uuid = item.task_id
        if isinstance(item, Job):
            request = item.request
            kwargs = {"sequence": item.sequence, "key": request.key, "count": request.count}
        else:
            kwargs = {"key": item.key}
        dispatcher.send(
            "task-received",
            uuid=uuid,
            name=TASK_NAME,
            args="()",
            kwargs=repr(kwargs),
            root_id=uuid,
            parent_id=None,
            retries=0,
            eta=None,
            expires=None,
            timestamp=received,
        )
        dispatcher.send("task-started", uuid=uuid, timestamp=received)
        if isinstance(outcome, NumberingError):
            dispatcher.send(
                "task-failed",
                uuid=uuid,
                exception=f"{type(outcome).__name__}({str(outcome)!r})",
                traceback="",
                timestamp=finished,
            )
        else:
            dispatcher.send(
                "task-succeeded",
                uuid=uuid,
                result=repr(reply_for(outcome.key, outcome)),
                runtime=runtime or 0.0,
                timestamp=finished,
            )

    def _open(self) -> Any:
        if self._dispatcher is None:
            self._connection = self.app.connection_for_write()
            self._dispatcher = self.app.events.Dispatcher(
                self._connection,
                hostname=self.hostname,
                enabled=True,
                buffer_while_offline=False,  # dropped, not piled up, while the broker is away
                buffer_group=["task"],
                buffer_limit=1_000_000,  # flushed once per batch, as one message
            )
        return self._dispatcher

    def close(self) -> None:
        """Close the events' own broker connection."""
        dispatcher, connection = self._dispatcher, self._connection
        self._dispatcher = self._connection = None
        for closing in (dispatcher, connection):
            if closing is not None:
                try:
                    closing.close()
                except Exception as exc:  # already broken; nothing more to do
                    log.debug("closing the task events' connection: %s", exc)


def task_events_switch(worker: Any) -> Callable[[], bool]:
    """Whether ``worker`` (a Celery ``WorkController``) sends task events right now: with
    ``-E``, or once a remote ``enable_events`` asked for them."""

    def sending() -> bool:
        consumer = getattr(worker, "consumer", None)
        dispatcher = getattr(consumer, "event_dispatcher", None)
        if dispatcher is None or not dispatcher.enabled:
            return False
        return not dispatcher.groups or "task" in dispatcher.groups

    return sending
