"""Checks a numbering worker runs before it consumes anything.

A worker that would answer with numbers it cannot keep must not start. It refuses, with
one clear message per problem, when:

- the Celery configuration lost a setting the guarantee leans on (late acks,
  reject-on-worker-lost, prefetch 1, time limits below the visibility timeout);
- the database schema is not the one this numbering was built for (run ``init-db``);
- the database may forget a COMMIT it has acknowledged (PostgreSQL with
  ``synchronous_commit=off`` or ``fsync=off``; SQLite with ``synchronous`` below FULL):
  a number already handed out could then be handed out again after a crash;
- a sequence it serves has a counter that disagrees with its ledger (someone edited the
  tables by hand, or restored one without the other): numbering on would hide the damage.

It warns, without refusing, when no synchronous standby is connected (commits wait), and
when the broker may drop queued requests (:meth:`numbering.tasks.transport.Broker.warnings`:
a Redis that may evict keys or keeps nothing on disk): requests lost that way are resent
by clients under the same keys, so nothing is numbered twice, but callers wait.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import redis
from sqlalchemy import desc, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from numbering.backends import backend_for
from numbering.backends.base import Durability
from numbering.brokers import redis_client
from numbering.config.celery import VISIBILITY_TIMEOUT
from numbering.database import translate_error
from numbering.errors import ConfigurationError
from numbering.migrations import current_revision, head_revision
from numbering.routing import Shard
from numbering.schema import ledger, sequences
from numbering.settings import mask_url
from numbering.tasks.transport import Broker

__all__ = [
    "check_celery_config",
    "check_database",
    "check_ledgers",
    "check_redis_servers",
    "run_preflight",
]


def check_celery_config(conf: Mapping[str, Any], concurrency: int) -> list[str]:
    """What is wrong with a worker's Celery configuration, as sentences."""
    problems = []
    if not conf.get("task_acks_late"):
        problems.append("task_acks_late must be True (acknowledge after the commit)")
    if not conf.get("task_reject_on_worker_lost"):
        problems.append(
            "task_reject_on_worker_lost must be True (a killed worker's request is redelivered)"
        )
    if conf.get("worker_prefetch_multiplier") != 1:
        problems.append("worker_prefetch_multiplier must be 1")
    if concurrency != 1:
        problems.append(f"concurrency must be 1, not {concurrency}")
    visibility = (conf.get("broker_transport_options") or {}).get(
        "visibility_timeout", VISIBILITY_TIMEOUT
    )
    hard, soft = conf.get("task_time_limit"), conf.get("task_soft_time_limit")
    if hard is None or hard >= visibility:
        problems.append(
            f"task_time_limit ({hard}) must be set below the visibility timeout ({visibility} s), "
            "or a running request is delivered twice"
        )
    if soft is not None and hard is not None and soft >= hard:
        problems.append(f"task_soft_time_limit ({soft}) must be below task_time_limit ({hard})")
    return problems


def check_database(engine: Engine, *, allow_async_standby: bool = False) -> Durability:
    """What makes the database unsafe for numbering (problems), what the operator should
    know (warnings), and its replication state (facts)."""
    try:
        found = backend_for(engine).durability(engine, allow_async_standby=allow_async_standby)
        current, head = current_revision(engine), head_revision()
    except DBAPIError as exc:
        raise translate_error(exc) from exc
    if current != head:
        found.problems.insert(
            0,
            f"the database schema is at revision {current or 'none'}, this numbering needs "
            f"{head}: run `numbering init-db` (as the schema owner)",
        )
    return found


def check_ledgers(
    engine: Engine, names: Iterable[str] = (), shards: Iterable[Shard] = ()
) -> list[str]:
    """Sequences (``names``, plus every sequence the ``shards`` serve) whose counter disagrees
    with the last block of their ledger. One index lookup per sequence; the full gapless
    check is ``numbering audit``.

    Only the served sequences are read: a sequence this worker does not serve must never
    keep it from starting (a sequence at the top of the 64-bit range once did, through an
    overflowing ``value + count - 1`` computed for every sequence).
    """
    wanted = set(names)
    served = list(shards)
    with engine.connect() as conn:
        every = conn.execute(select(sequences.c.name).where(sequences.c.parent_id.is_(None)))
        mine = [
            name
            for name in every.scalars()
            if name in wanted or any(shard.serves(name) for shard in served)
        ]
    if not mine:
        return []
    # value + (count - 1), never value + count - 1: the block that ends at 2**63-1 would
    # overflow a 64-bit integer on the way.
    block_end = ledger.c.value + (ledger.c.count - 1)
    last_block = (
        select(ledger.c.cycle, block_end)
        .where(ledger.c.sequence_id == sequences.c.id)
        .order_by(desc(ledger.c.cycle), desc(ledger.c.value))
        .limit(1)
    )
    parents = select(sequences.c.id).where(sequences.c.name.in_(mine)).scalar_subquery()
    # One statement, so counter and ledger are read in one snapshot while another
    # worker (the active one, when this one starts as a standby) keeps assigning.
    query = select(
        sequences.c.name,
        sequences.c.last_value,
        sequences.c.cycle,
        last_block.with_only_columns(ledger.c.cycle).scalar_subquery().label("ledger_cycle"),
        last_block.with_only_columns(block_end).scalar_subquery().label("ledger_end"),
    ).where(sequences.c.name.in_(mine) | sequences.c.parent_id.in_(parents))
    problems = []
    with engine.connect() as conn:
        for seq in conn.execute(query):
            ledger_end = (seq.ledger_end, seq.ledger_cycle or 0)
            if ledger_end != (seq.last_value, seq.cycle):
                problems.append(
                    f"sequence {seq.name!r}: counter says last value {seq.last_value} in cycle "
                    f"{seq.cycle}, ledger ends at {ledger_end[0]} in cycle {ledger_end[1]}; "
                    f"run `numbering audit {seq.name}` and repair before numbering on"
                )
    return problems


def check_redis_servers(urls: Iterable[str], sentinel_master: str | None = None) -> list[str]:
    """Problems with the Redis servers at ``urls`` (the broker's, the replies'): a
    Redis Cluster node. Neither kombu nor Celery speaks Redis Cluster (a key on another
    node's slots answers MOVED), so numbering refuses it rather than fail per request."""
    problems = []
    for url in dict.fromkeys(urls):  # each once, in order
        client = redis_client(url, sentinel_master, socket_timeout=5)
        try:
            enabled = client.info("cluster").get("cluster_enabled")
        except redis.ResponseError:  # INFO disabled (managed Redis): nothing to say
            continue
        finally:
            client.close()
        if enabled:
            problems.append(
                f"{mask_url(url)} is a Redis Cluster node (cluster_enabled:1): Celery and "
                "kombu do not support Redis Cluster; use a standalone Redis (with "
                "replicas for availability)"
            )
    return problems


def run_preflight(
    conf: Mapping[str, Any],
    engine: Engine,
    broker: Broker,
    *,
    concurrency: int,
    sequences: Iterable[str] = (),
    shards: Iterable[Shard] = (),
    allow_async_standby: bool = False,
    redis_urls: Iterable[str] = (),
    sentinel_master: str | None = None,
    queues: Sequence[str] = (),
) -> list[str]:
    """Refuse to start (ConfigurationError listing every problem); return warnings.
    ``queues`` are declared on the broker as the worker will consume them."""
    problems = check_celery_config(conf, concurrency) + check_redis_servers(
        redis_urls, sentinel_master
    )
    problems += broker.declare(queues)
    try:
        database = check_database(engine, allow_async_standby=allow_async_standby)
        problems += database.problems + check_ledgers(engine, sequences, shards)
    except DBAPIError as exc:
        raise translate_error(exc) from exc
    if problems:
        listed = problems[0] if len(problems) == 1 else "\n  - " + "\n  - ".join(problems)
        raise ConfigurationError(f"the worker refuses to start: {listed}")
    return database.warnings + broker.warnings()
