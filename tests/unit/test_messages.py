"""Task messages: what the client encodes the worker decodes; hostile ones fail alone."""

from __future__ import annotations

import base64
import json

import pytest
import redis
from celery import Celery

from numbering import Assignment, Settings
from numbering.config.celery import celery_config
from numbering.errors import KeyReusedError, NumberingError, SequenceNotFoundError
from numbering.messages import (
    BadMessage,
    Job,
    decode_redis_message,
    encode_redis_message,
    error_from_reply,
    parse_task,
    reply_for,
)
from numbering.routing import REPLY_HEADER, TASK_NAME, Shard, queue_for


@pytest.fixture(scope="module")
def app() -> Celery:
    celery = Celery(set_as_current=False)
    celery.conf.update(celery_config(Settings.from_env({})))
    return celery


def test_round_trip(app: Celery) -> None:
    kwargs = {"sequence": "invoices", "key": "invoice:1", "count": 3, "reference": {"a": 1}}
    raw = encode_redis_message("numbering.invoices", kwargs, "numbering.reply.abc")
    headers, body = decode_redis_message(raw)
    assert headers["task"] == TASK_NAME
    assert headers[REPLY_HEADER] == "numbering.reply.abc"
    job = parse_task(headers, body)
    assert isinstance(job, Job)
    assert (job.sequence, job.request.key, job.request.count) == ("invoices", "invoice:1", 3)
    assert job.request.reference == {"a": 1}
    assert job.reply_to == "numbering.reply.abc"


def test_encoded_message_is_what_celery_builds(app: Celery) -> None:
    """The hand-written message matches Celery's own ``as_task_v2`` field for field, so
    stock Celery tooling (workers, Flower, ``celery inspect``) reads it as a real task."""
    kwargs = {"sequence": "invoices", "key": "invoice:1", "count": 1, "reference": None}
    ours = json.loads(encode_redis_message("numbering.invoices", kwargs, "numbering.reply.abc"))
    task_id = ours["headers"]["id"]
    celery = app.amqp.as_task_v2(task_id, TASK_NAME, args=(), kwargs=kwargs, ignore_result=True)
    expected_headers = {
        **celery.headers,
        "numbering_sent_at": ours["headers"]["numbering_sent_at"],
        REPLY_HEADER: "numbering.reply.abc",
    }
    assert ours["headers"] == json.loads(json.dumps(expected_headers))
    assert json.loads(base64.b64decode(ours["body"])) == json.loads(json.dumps(celery.body))
    properties = dict(ours["properties"])
    assert properties.pop("delivery_tag") != task_id
    assert properties == {
        **celery.properties,
        "delivery_mode": 2,
        "delivery_info": {"exchange": "numbering.invoices", "routing_key": "numbering.invoices"},
        "priority": 0,
        "body_encoding": "base64",
    }
    assert (ours["content-type"], ours["content-encoding"]) == ("application/json", "utf-8")


def envelope(payload: object, *, headers: dict[str, object] | None = None, **extra: object) -> str:
    message = {
        "body": base64.b64encode(json.dumps(payload).encode()).decode(),
        "content-type": "application/json",
        "headers": {"task": TASK_NAME, "id": "t1", **(headers or {})},
        "properties": {"body_encoding": "base64"},
    }
    message.update(extra)
    return json.dumps(message)


GOOD = [[], {"sequence": "invoices", "key": "k"}, {}]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\xff\xfe", "not a JSON kombu envelope"),
        ("[]", "not a JSON kombu envelope"),
        ("x" * 100_000, "the limit is"),
        (envelope(GOOD, **{"content-type": "application/x-python-serialize"}), "JSON only"),
        (envelope(GOOD, body="!!!"), "not valid base64"),
        (
            json.dumps({"headers": {}, "properties": {}, "content-type": "application/json"}),
            "missing",
        ),
    ],
)
def test_undecodable_messages_are_refused(raw: str | bytes, message: str) -> None:
    with pytest.raises(NumberingError, match=message):
        decode_redis_message(raw)


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        (GOOD, {"task": "os.system"}, "is not numbering.assign"),
        (GOOD, {"id": None}, "no valid task id"),
        (GOOD, {"eta": "2030-01-01T00:00:00"}, "no ETA"),
        (GOOD, {REPLY_HEADER: "victim:key"}, "invalid numbering_reply"),
        ({"sequence": "invoices"}, {}, "protocol 2"),
        ([["invoices", "k"], {}, {}], {}, "keyword arguments"),
        ([[], {"sequence": "invoices"}, {}], {}, "request key is required"),
        ([[], {"sequence": "invoices", "key": "k", "extra": 1}, {}], {}, "unknown task argument"),
        ([[], {"sequence": "a\nDROP", "key": "k"}, {}], {}, "invalid sequence name"),
        ([[], {"sequence": "invoices", "key": 5}, {}], {}, "must be a string"),
        ([[], {"sequence": "invoices", "key": "k", "count": True}, {}], {}, "integer"),
        ([[], {"sequence": "invoices", "key": "k", "count": 2**63}, {}], {}, "at most"),
        ([[], {"sequence": "invoices", "key": "k", "reference": "x" * 5000}, {}], {}, "limit"),
        ([[], {"sequence": "invoices", "key": "k", "date": 20260307}, {}], {}, "ISO date"),
        ([[], {"sequence": "invoices", "key": "k", "date": "2026-02-30"}, {}], {}, "YYYY-MM-DD"),
        ([[], {"sequence": "invoices", "key": "k", "date": "x" * 5000}, {}], {}, "YYYY-MM-DD"),
    ],
)
def test_hostile_task_messages_fail_alone(
    body: object, headers: dict[str, object], message: str
) -> None:
    decoded_headers, decoded_body = decode_redis_message(envelope(body, headers=headers))
    outcome = parse_task(decoded_headers, decoded_body)
    assert isinstance(outcome, BadMessage)
    assert message in str(outcome.error)


def test_replies_carry_assignments_and_errors() -> None:
    block = Assignment("invoices", "k", 5, 2, 0, resent=True, formatted="F-5", period="2026")
    assert reply_for("k", block) == {
        "key": "k",
        "sequence": "invoices",
        "value": 5,
        "count": 2,
        "cycle": 0,
        "resent": True,
        "formatted": "F-5",
        "period": "2026",
    }
    reply = reply_for("k", KeyReusedError("k", "is already used on another sequence"))
    error = error_from_reply(reply["error"])
    assert isinstance(error, KeyReusedError)
    assert str(error) == "request key 'k' is already used on another sequence"
    assert isinstance(
        error_from_reply({"type": "SequenceNotFoundError", "message": "m"}), SequenceNotFoundError
    )
    assert type(error_from_reply({"type": "SystemExit", "message": "m"})) is NumberingError


def test_shards_are_stable_and_validated() -> None:
    assert queue_for("invoices") == "numbering.invoices"
    assert queue_for("invoices", 8) == Shard.of("invoices", 8).queue
    assert Shard.of("invoices", 8) == Shard.of("invoices", 8)  # no per-process hash seed
    assert Shard.parse("3/8") == Shard(3, 8)
    for bad in ("8/8", "-1/8", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="shard"):
            Shard.parse(bad)


def test_a_reply_database_is_another_database_of_the_broker_s_server() -> None:
    from numbering.replies import reply_database, same_database

    broker = redis.Redis.from_url("redis://:pw@10.0.0.1:6379/0")

    def other(url: str) -> redis.Redis:
        return redis.Redis.from_url(url)

    assert reply_database(broker, other("redis://:pw@10.0.0.1:6379/1")) == 1
    assert reply_database(broker, other("redis://:pw@10.0.0.1:6379/0")) is None  # the same
    assert same_database(broker, other("redis://:pw@10.0.0.1:6379/0"))
    assert reply_database(broker, other("redis://:pw@10.0.0.2:6379/1")) is None
    assert reply_database(broker, other("redis://:pw@10.0.0.1:6380/1")) is None
    assert reply_database(broker, other("redis://:other@10.0.0.1:6379/1")) is None
    assert reply_database(broker, other("rediss://:pw@10.0.0.1:6379/1")) is None
