"""Number requests as Celery task messages (the replies are in :mod:`numbering.replies`).

A request is a Celery (protocol 2) task message for :data:`~numbering.routing.TASK_NAME`
with keyword arguments ``sequence``, ``key``, ``count`` (default 1) and ``reference``
(optional JSON). The broker is not trusted: every message is parsed and validated like
user input (content type, sizes, types) before it gets near the database, and a
malformed one fails alone.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

from numbering.assignment import Request
from numbering.brokers import REPLY_LIST_PREFIX
from numbering.errors import InvalidRequestError, NumberingError
from numbering.replies import error_from_reply, reply_for
from numbering.routing import REPLY_HEADER, TASK_NAME
from numbering.validation import MAX_REFERENCE_BYTES, check_sequence_name

__all__ = [
    "MAX_MESSAGE_BYTES",
    "Job",
    "decode_redis_message",
    "encode_redis_message",
    "envelope",
    "SENT_AT_HEADER",
    "error_from_reply",
    "parse_task",
    "reply_for",
]

# A request message is small; anything bigger is refused before JSON parsing.
MAX_MESSAGE_BYTES = 16 * 1024 + 2 * MAX_REFERENCE_BYTES
# Reply lists are Redis keys of this shape.
_REPLY_PREFIX = REPLY_LIST_PREFIX
# Unix time the client sent the request at (a hint for operators; never trusted).
SENT_AT_HEADER = "numbering_sent_at"
_KWARGS = {"sequence", "key", "count", "reference", "date"}


@dataclass(frozen=True)
class Job:
    """A parsed request: what to assign, and where the answer goes."""

    task_id: str
    sequence: str
    request: Request
    reply_to: str | None  # the client's Redis reply list, or None: use the result backend
    #: A plain Celery caller's AMQP ``reply_to`` queue and correlation id: where a caller
    #: on Celery's ``rpc://`` result backend waits for its answer.
    rpc: tuple[str, str] | None = None
    #: The caller's Celery ``origin`` header (``gen<pid>@<host>``), to name it in logs.
    origin: str | None = None


@dataclass(frozen=True)
class BadMessage:
    """A message that could not be parsed; it fails alone with ``error``."""

    task_id: str | None
    key: str | None
    reply_to: str | None
    error: NumberingError
    rpc: tuple[str, str] | None = None  # as :attr:`Job.rpc`
    origin: str | None = None  # as :attr:`Job.origin`


def decode_redis_message(raw: bytes | str) -> tuple[dict[str, Any], Any]:
    """Split a kombu Redis envelope into (headers, decoded body)."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise InvalidRequestError(f"message is {len(raw)} bytes; the limit is {MAX_MESSAGE_BYTES}")
    try:
        envelope = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequestError("message is not a JSON kombu envelope") from None
    if not isinstance(envelope, dict):
        raise InvalidRequestError("message is not a JSON kombu envelope")
    headers = envelope.get("headers")
    properties = envelope.get("properties")
    if not isinstance(headers, dict) or not isinstance(properties, dict):
        raise InvalidRequestError("message has no headers or properties")
    if envelope.get("content-type") != "application/json":
        raise InvalidRequestError(
            f"message content type {envelope.get('content-type')!r} refused: JSON only"
        )
    body = envelope.get("body")
    if not isinstance(body, str):
        raise InvalidRequestError("message body is missing")
    if properties.get("body_encoding") == "base64":
        try:
            body = base64.b64decode(body, validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise InvalidRequestError("message body is not valid base64") from None
    try:
        return headers, json.loads(body)
    except (ValueError, TypeError, UnicodeDecodeError):
        raise InvalidRequestError("message body is not JSON") from None


def encode_redis_message(queue: str, kwargs: dict[str, Any], reply_to: str | None) -> str:
    """A Celery protocol 2 task message in kombu's Redis envelope, ready to LPUSH.

    Field for field what ``app.amqp.as_task_v2`` builds for this task (a unit test holds
    the two side by side), written out here because building it through Celery cost the
    client 0.22 ms of CPU a request, a sixth of its whole cost on a 2-core machine (see
    docs/benchmarks.md); publishing is one LPUSH instead of kombu's exchange look-up.
    """
    task_id = str(uuid.uuid4())
    headers: dict[str, Any] = {
        "lang": "py",
        "task": TASK_NAME,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": "()",
        "kwargsrepr": repr(kwargs)[:_REPR_MAX],
        "origin": _origin(),
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
        SENT_AT_HEADER: round(time.time(), 3),  # for `numbering status`: oldest waiting
    }
    if reply_to is not None:
        headers[REPLY_HEADER] = reply_to
    body = json.dumps([[], kwargs, _EMBED], separators=(",", ":")).encode()
    return envelope(queue, headers, body, content_type="application/json", correlation_id=task_id)


def envelope(
    queue: str,
    headers: dict[str, Any],
    body: bytes,
    *,
    content_type: str | None,
    content_encoding: str | None = "utf-8",
    correlation_id: str | None = None,
) -> str:
    """A message that came another way (RabbitMQ) in kombu's Redis envelope: the one
    format of dead letters, which ``numbering quarantine list`` reads and a Redis queue
    takes back as it is."""
    return json.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": content_encoding,
            "content-type": content_type,
            "headers": headers,
            "properties": {
                "correlation_id": correlation_id,
                "reply_to": "",
                "delivery_mode": 2,
                "delivery_info": {"exchange": queue, "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        },
        separators=(",", ":"),
    )


# Celery's defaults for a task sent with no callbacks, and for the length of kwargsrepr.
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_REPR_MAX = 1024


@functools.cache
def _origin_of(pid: int) -> str:
    return f"gen{pid}@{socket.gethostname()}"


def _origin() -> str:
    """Celery's ``origin`` header: ``gen<pid>@<host>`` (the pid changes after a fork)."""
    return _origin_of(os.getpid())


def _reply_to(headers: dict[str, Any]) -> str | None:
    value = headers.get(REPLY_HEADER)
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith(_REPLY_PREFIX) or len(value) > 100:
        raise InvalidRequestError(f"invalid {REPLY_HEADER} header")
    return value


def parse_task(headers: dict[str, Any], body: Any) -> Job | BadMessage:
    """Turn a decoded Celery task message into a :class:`Job`, or why it is refused."""
    task_id = headers.get("id") if isinstance(headers.get("id"), str) else None
    origin = headers.get("origin")
    origin = origin[:200] if isinstance(origin, str) and origin else None
    key = None
    reply_to = None
    try:
        reply_to = _reply_to(headers)
        if headers.get("task") != TASK_NAME:
            raise InvalidRequestError(f"task {headers.get('task')!r} is not {TASK_NAME}")
        if task_id is None or not 0 < len(task_id) <= 200:
            raise InvalidRequestError("message has no valid task id")
        if headers.get("eta") or headers.get("countdown"):
            raise InvalidRequestError("numbering requests take no ETA or countdown")
        if not isinstance(body, list) or len(body) != 3:
            raise InvalidRequestError("message body is not a Celery protocol 2 body")
        args, kwargs, _embed = body
        if args:
            raise InvalidRequestError(
                "pass sequence, key, count and reference as keyword arguments"
            )
        if not isinstance(kwargs, dict):
            raise InvalidRequestError("task keyword arguments are not a mapping")
        unknown = set(kwargs) - _KWARGS
        if unknown:
            raise InvalidRequestError(f"unknown task argument(s): {', '.join(sorted(unknown))}")
        if "key" in kwargs and isinstance(kwargs["key"], str):
            key = kwargs["key"]
        if "key" not in kwargs:
            raise InvalidRequestError("a request key is required")
        sequence = check_sequence_name(kwargs.get("sequence"))
        date = kwargs.get("date")
        if date is not None and not isinstance(date, str):
            raise InvalidRequestError("date must be an ISO date string (YYYY-MM-DD)")
        request = Request(kwargs["key"], kwargs.get("count", 1), kwargs.get("reference"), date)
    except NumberingError as error:
        return BadMessage(task_id, key, reply_to, error, origin=origin)
    return Job(task_id, sequence, request, reply_to, origin=origin)
