"""Settings from ``NUMBERING_*`` environment variables, validated with clear errors.

They live in the library core, so that ``import numbering`` (allocating in one's own
transaction) needs nothing of the deployment's ``config/``; ``numbering.config.settings``
(the design card's place) re-exports them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from numbering.brokers import (
    REDIS_SCHEMES,
    SCHEMES,
    broker_kind,
    is_redis,
    is_sentinel,
    scheme_of,
)
from numbering.errors import ConfigurationError, NumberingError
from numbering.retry import (
    DEFAULT_ATTEMPTS,
    DEFAULT_TIMEOUT,
    DEFAULT_WAIT_INITIAL,
    DEFAULT_WAIT_MAX,
    RetryPolicy,
)
from numbering.routing import QUEUE_TYPES, Shard
from numbering.validation import check_isolation_level, check_seconds

__all__ = [
    "DEFAULT_BROKER_URL",
    "DEFAULT_DATABASE_FILE",
    "DEFAULT_ISOLATION_LEVEL",
    "DEFAULT_RESULT_BACKEND",
    "ENV",
    "Settings",
    "check_database_url",
    "mask_url",
]

# The database file used when NUMBERING_DATABASE_URL is unset: in the working directory,
# so that trying numbering needs no server.
DEFAULT_DATABASE_FILE = "numbering.db"
# The largest micro-batch a worker may be configured for.
MAX_BATCH_SIZE = 10_000
# Redis on the local machine is the default broker ...
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
# ... and result backend when the broker is RabbitMQ. With a Redis broker the result
# backend defaults to the broker's own database: a client then sends a request and starts
# waiting for its answer in one round trip (numbering.replies.same_database).
DEFAULT_RESULT_BACKEND = "redis://127.0.0.1:6379/1"
# The isolation level of numbering's own transactions.
DEFAULT_ISOLATION_LEVEL = "READ COMMITTED"
# The most requests a worker assigns in one transaction.
DEFAULT_BATCH_SIZE = 500
DEFAULT_BATCHES_IN_FLIGHT = 1
# Seconds a client waits for its number before raising (it resends on the way).
DEFAULT_REQUEST_TIMEOUT = 10.0
# Seconds a numbering transaction may sit idle before PostgreSQL ends its session. Its
# transactions take milliseconds; one idle this long belongs to a frozen worker or to a
# connection whose client is gone, and it holds a sequence's lock until it ends.
DEFAULT_IDLE_TRANSACTION_TIMEOUT = 10.0
# PostgreSQL's synchronous_commit in numbering's sessions; the levels it may be set to
# (the weaker ones acknowledge a COMMIT a failover can lose).
DEFAULT_SYNCHRONOUS_COMMIT = "on"
SYNCHRONOUS_COMMIT_LEVELS = ("on", "remote_apply")
# How a yes or a no may be written in an environment variable.
_BOOLEANS = {"true": True, "yes": True, "1": True, "on": True,
             "false": False, "no": False, "0": False, "off": False}  # fmt: skip

# Environment variable for each setting. Names are part of the public contract.
ENV = {
    "database_url": "NUMBERING_DATABASE_URL",
    "broker_url": "NUMBERING_BROKER_URL",
    "result_backend": "NUMBERING_RESULT_BACKEND",
    "isolation_level": "NUMBERING_ISOLATION_LEVEL",
    "retry_attempts": "NUMBERING_RETRY_ATTEMPTS",
    "retry_timeout": "NUMBERING_RETRY_TIMEOUT",
    "retry_wait_initial": "NUMBERING_RETRY_WAIT_INITIAL",
    "retry_wait_max": "NUMBERING_RETRY_WAIT_MAX",
    "shards": "NUMBERING_SHARDS",
    "batch_size": "NUMBERING_BATCH_SIZE",
    "batches_in_flight": "NUMBERING_BATCHES_IN_FLIGHT",
    "request_timeout": "NUMBERING_REQUEST_TIMEOUT",
    "batch_tables": "NUMBERING_BATCH_TABLES",
    "idle_transaction_timeout": "NUMBERING_IDLE_TRANSACTION_TIMEOUT",
    "metrics_port": "NUMBERING_METRICS_PORT",
    "log_format": "NUMBERING_LOG_FORMAT",
    "synchronous_commit": "NUMBERING_SYNCHRONOUS_COMMIT",
    "allow_reissue_after_failover": "NUMBERING_ALLOW_REISSUE_AFTER_FAILOVER",
    "sentinel_master": "NUMBERING_SENTINEL_MASTER",
    "queue_type": "NUMBERING_QUEUE_TYPE",
}

# NUMBERING_* variables read elsewhere, which are not settings.
_NOT_SETTINGS = {"NUMBERING_FAILPOINTS"}  # fault injection for tests: numbering.failpoints

# numbering's answers travel on Redis lists (numbering.replies): no other Celery result
# backend can carry them.
_BACKEND_SCHEMES = REDIS_SCHEMES


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for logs, errors and output.

    >>> mask_url("postgresql://app:s3cret@db/numbers")
    'postgresql://app:***@db/numbers'

    Each of several ``;``-separated URLs (RabbitMQ cluster nodes, Redis sentinels):

    >>> mask_url("amqp://u:pw@h1//;amqp://u:pw@h2//")
    'amqp://u:***@h1//;amqp://u:***@h2//'
    """
    if ";" in url:
        return ";".join(mask_url(part) for part in url.split(";"))
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable URL>"
    if not password:
        return url
    netloc = parts.netloc.rpartition("@")
    userinfo = netloc[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{userinfo}:***@{netloc[2]}"))


def _default_database_url() -> str:
    return f"sqlite:///{Path.cwd() / DEFAULT_DATABASE_FILE}"


@dataclass(frozen=True)
class Settings:
    """numbering's settings. Build them with :meth:`from_env` or directly."""

    database_url: str = ""
    broker_url: str = DEFAULT_BROKER_URL
    #: Empty: the broker's URL if it is Redis, else DEFAULT_RESULT_BACKEND.
    result_backend: str = ""
    isolation_level: str = DEFAULT_ISOLATION_LEVEL
    retry_attempts: int = DEFAULT_ATTEMPTS
    retry_timeout: float = DEFAULT_TIMEOUT
    retry_wait_initial: float = DEFAULT_WAIT_INITIAL
    retry_wait_max: float = DEFAULT_WAIT_MAX
    #: None: every sequence has its own queue. K: sequences share K shard queues.
    shards: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    #: Batches a worker's consumer keeps in flight: 1 is the serial turn; 2 takes the
    #: next batch, and starts its transaction, while the last one commits (measured 5-10%
    #: slower on 2 cores, where the CPU, not the turn, is the limit: docs/benchmarks.md).
    batches_in_flight: int = DEFAULT_BATCHES_IN_FLIGHT
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    #: Tables batch jobs may number in place (the allow-list); empty allows none.
    batch_tables: tuple[str, ...] = ()
    #: PostgreSQL ends a numbering session idle in a transaction this long (seconds), so
    #: a frozen worker cannot hold a sequence's lock for ever.
    idle_transaction_timeout: float = DEFAULT_IDLE_TRANSACTION_TIMEOUT
    #: Port a worker serves Prometheus metrics on (/metrics); None: no metrics server.
    metrics_port: int | None = None
    #: Worker log lines as ``text`` or as ``json`` (one object per line, with the request
    #: key, sequence and task id as fields where a line concerns one request).
    log_format: str = "text"
    #: PostgreSQL's synchronous_commit for every numbering session: ``on`` (a COMMIT
    #: returns once the synchronous standby has it on disk) or ``remote_apply`` (once it
    #: is visible there too). Set when the session starts, so no default weakens it.
    synchronous_commit: str = DEFAULT_SYNCHRONOUS_COMMIT
    #: Let a worker start while only asynchronous standbys replicate the database. A
    #: failover to one of them can then hand out numbers already answered (docs/ha.md).
    allow_reissue_after_failover: bool = False
    #: The Redis master's name for ``sentinel://`` broker and result backend URLs (the
    #: NAME of the sentinels' ``sentinel monitor NAME ...``).
    sentinel_master: str | None = None
    #: RabbitMQ's type for numbering's queues: ``classic`` or ``quorum`` (replicated over
    #: the cluster's nodes, with a delivery limit and a dead-letter queue). Clients and
    #: workers must agree: RabbitMQ refuses a queue declared with the other type.
    queue_type: str = "classic"

    def __post_init__(self) -> None:
        if not self.database_url:
            object.__setattr__(self, "database_url", _default_database_url())
        object.__setattr__(self, "database_url", _check_database_url(self.database_url))
        _check_url("broker_url", self.broker_url, SCHEMES)
        if not self.result_backend:
            on_redis = is_redis(self.broker_url)
            default = self.broker_url if on_redis else DEFAULT_RESULT_BACKEND
            object.__setattr__(self, "result_backend", default)
        _check_url("result_backend", self.result_backend, _BACKEND_SCHEMES)
        on_sentinel = [u for u in (self.broker_url, self.result_backend) if is_sentinel(u)]
        if on_sentinel and not self.sentinel_master:
            raise ConfigurationError(
                f"{mask_url(on_sentinel[0])} names Redis through its sentinels: set "
                f"{ENV['sentinel_master']} to the master's name (the NAME of `sentinel "
                "monitor NAME host port quorum`)"
            )
        if self.sentinel_master and not on_sentinel:
            raise ConfigurationError(
                f"{ENV['sentinel_master']} is set, but neither {ENV['broker_url']} nor "
                f"{ENV['result_backend']} is a sentinel:// URL"
            )
        check_queue_type(self.queue_type, self.broker_url)
        try:
            level = check_isolation_level(self.isolation_level)
            self.retry_policy()
            if self.shards is not None:
                Shard(0, self.shards)
            _check_positive_int(self.batch_size, ENV["batch_size"], MAX_BATCH_SIZE)
            _check_positive_int(self.batches_in_flight, ENV["batches_in_flight"], 2)
            check_seconds(self.request_timeout, ENV["request_timeout"])
            check_seconds(self.idle_transaction_timeout, ENV["idle_transaction_timeout"])
            if self.log_format not in ("text", "json"):
                raise ConfigurationError(
                    f"{ENV['log_format']} must be text or json, got {self.log_format!r}"
                )
            if self.synchronous_commit not in SYNCHRONOUS_COMMIT_LEVELS:
                raise ConfigurationError(
                    f"{ENV['synchronous_commit']} must be "
                    f"{' or '.join(SYNCHRONOUS_COMMIT_LEVELS)}, got {self.synchronous_commit!r}"
                )
            if not isinstance(self.allow_reissue_after_failover, bool):
                raise ConfigurationError(
                    f"{ENV['allow_reissue_after_failover']} must be true or false"
                )
            if self.metrics_port is not None:
                _check_positive_int(self.metrics_port, ENV["metrics_port"], 65535)
        except (NumberingError, TypeError, ValueError) as exc:
            raise ConfigurationError(str(exc)) from None
        object.__setattr__(self, "isolation_level", level)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read settings from ``NUMBERING_*`` variables (``os.environ`` by default).

        Unset variables take the defaults; a variable set to an empty value is an error
        (an unset ``${VAR}`` in a compose file would otherwise mean the default). An
        unknown ``NUMBERING_`` variable is an error, so that a typo cannot silently fall
        back to a default database.
        """
        env = os.environ if environ is None else environ
        known = set(ENV.values())
        unknown = sorted(
            k for k in env if k.startswith("NUMBERING_") and k not in known | _NOT_SETTINGS
        )
        if unknown:
            raise ConfigurationError(
                f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        values: dict[str, object] = {}
        for f in fields(cls):
            variable = ENV[f.name]
            if variable not in env:
                continue
            raw = env[variable].strip()
            if not raw:
                # A compose file's unset ${VAR} arrives as an empty value: falling back
                # to the default (a local SQLite file, a local Redis) would be the very
                # trap the check for unknown variables closes.
                raise ConfigurationError(
                    f"{variable} is set but empty; give it a value, or unset it to use the default"
                )
            values[f.name] = _parse(f.name, raw)
        return cls(**values)  # type: ignore[arg-type]

    def retry_policy(self) -> RetryPolicy:
        """The retry policy these settings describe."""
        return RetryPolicy(
            attempts=self.retry_attempts,
            timeout=self.retry_timeout,
            wait_initial=self.retry_wait_initial,
            wait_max=self.retry_wait_max,
        )

    def masked(self) -> dict[str, str]:
        """Every setting as text, keyed by environment variable, passwords masked."""
        shown: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith(("_url", "_backend")):
                shown[ENV[f.name]] = mask_url(value)
            elif isinstance(value, bool):
                shown[ENV[f.name]] = "true" if value else "false"
            elif isinstance(value, tuple):
                shown[ENV[f.name]] = ",".join(value)
            else:
                shown[ENV[f.name]] = "" if value is None else str(value)
        return shown


def check_queue_type(queue_type: object, broker_url: str) -> str:
    """``queue_type`` if it is one of :data:`~numbering.routing.QUEUE_TYPES` and fits the
    broker (a quorum queue is RabbitMQ's), else raise ConfigurationError."""
    if queue_type not in QUEUE_TYPES:
        raise ConfigurationError(
            f"{ENV['queue_type']} must be {' or '.join(QUEUE_TYPES)}, got {queue_type!r}"
        )
    assert isinstance(queue_type, str)
    if queue_type != "classic" and broker_kind(broker_url) != "amqp":
        raise ConfigurationError(
            f"{ENV['queue_type']}={queue_type} is a RabbitMQ queue type, but the broker "
            f"{mask_url(broker_url)} is not RabbitMQ (amqp://)"
        )
    return queue_type


def _check_positive_int(value: object, what: str, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise ConfigurationError(
            f"{what} must be a whole number from 1 to {maximum}, got {value!r}"
        )


def _parse(name: str, raw: str) -> object:
    variable = ENV[name]
    if name in ("retry_attempts", "shards", "batch_size", "batches_in_flight", "metrics_port"):
        try:
            return int(raw)
        except ValueError:
            raise ConfigurationError(f"{variable} must be a whole number, got {raw!r}") from None
    if name == "allow_reissue_after_failover":
        try:
            return _BOOLEANS[raw.lower()]
        except KeyError:
            raise ConfigurationError(f"{variable} must be true or false, got {raw!r}") from None
    if name == "batch_tables":
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if name.startswith("retry_") or name in ("request_timeout", "idle_transaction_timeout"):
        try:
            return check_seconds(float(raw), variable, allow_zero=name.startswith("retry_wait"))
        except ValueError:
            raise ConfigurationError(
                f"{variable} must be a finite, positive number of seconds, got {raw!r}"
            ) from None
    return raw


def check_database_url(url: str, source: str = ENV["database_url"]) -> str:
    """``url`` as numbering uses it, or a ConfigurationError naming ``source`` (the
    variable or the command-line option the URL came from)."""
    return _check_database_url(url, source)


def _check_database_url(url: str, source: str = ENV["database_url"]) -> str:
    if not url.strip():
        raise ConfigurationError(f"{source} is empty; give a database URL")
    from numbering.backends import UnsupportedDatabase, backend_for, normalize_url

    url = normalize_url(url)  # postgres://, the spelling Heroku and others hand out
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigurationError(
            f"{source} is not a database URL: {mask_url(url)!r}; "
            "expected e.g. postgresql://user:password@host/dbname or sqlite:///numbering.db"
        ) from None
    try:
        backend_for(parsed)
    except UnsupportedDatabase as exc:
        raise ConfigurationError(f"{source} names an {exc}") from None
    return url


def _check_url(name: str, url: str, schemes: tuple[str, ...]) -> None:
    variable = ENV[name]
    scheme = scheme_of(url)
    if scheme not in schemes:
        why = ""
        if name == "result_backend":
            why = (
                " (numbering answers its callers on Redis lists; a Celery result backend "
                "such as rpc:// or a database cannot carry them)"
            )
        raise ConfigurationError(
            f"{variable} must be a URL starting with one of "
            f"{', '.join(s + '://' for s in schemes)}; got {mask_url(url)!r}{why}"
        )
