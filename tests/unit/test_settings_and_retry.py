"""Settings from the environment, URL masking, the retry policy and the error tree."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa

import numbering
from numbering import ConfigurationError, RetriesExhaustedError, RetryPolicy, Settings
from numbering.config import mask_url
from numbering.database import translate_error
from numbering.errors import (
    ConnectionLost,
    InvalidRequestError,
    KeyRaceConflict,
    LockNotAvailable,
    NumberingError,
    SequenceNotFoundError,
    SerializationConflict,
)
from numbering.retry import RetryStats


def test_defaults_need_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_env({})
    assert settings.database_url == f"sqlite:///{tmp_path / 'numbering.db'}"
    assert settings.broker_url == "redis://127.0.0.1:6379/0"
    assert settings.isolation_level == "READ COMMITTED"
    assert settings.retry_policy() == RetryPolicy()
    assert settings.result_backend == "redis://127.0.0.1:6379/0"  # the broker's database


def test_replies_default_to_the_broker_database_on_redis_only() -> None:
    broker = "redis://queue.internal:6380/3"
    assert Settings.from_env({"NUMBERING_BROKER_URL": broker}).result_backend == broker
    rabbit = Settings.from_env({"NUMBERING_BROKER_URL": "amqp://guest@rabbit//"})
    assert rabbit.result_backend == "redis://127.0.0.1:6379/1"
    chosen = {"NUMBERING_BROKER_URL": broker, "NUMBERING_RESULT_BACKEND": "redis://other/1"}
    assert Settings.from_env(chosen).result_backend == "redis://other/1"


def test_every_setting_is_read_from_its_variable() -> None:
    settings = Settings.from_env(
        {
            "NUMBERING_DATABASE_URL": "postgres://app:pw@db:5432/numbers",
            "NUMBERING_BROKER_URL": "amqp://guest:guest@rabbit//",
            "NUMBERING_RESULT_BACKEND": "redis://:pw@replies:6379/4",
            "NUMBERING_ISOLATION_LEVEL": "repeatable_read",
            "NUMBERING_RETRY_ATTEMPTS": "5",
            "NUMBERING_RETRY_TIMEOUT": "2.5",
            "NUMBERING_RETRY_WAIT_INITIAL": "0",
            "NUMBERING_RETRY_WAIT_MAX": "0.1",
            "OTHER": "ignored",
        }
    )
    assert settings.database_url == "postgresql://app:pw@db:5432/numbers"
    assert settings.broker_url == "amqp://guest:guest@rabbit//"
    assert settings.isolation_level == "REPEATABLE READ"
    assert settings.retry_policy() == RetryPolicy(5, 2.5, 0.0, 0.1)
    shown = settings.masked()
    assert shown["NUMBERING_DATABASE_URL"] == "postgresql://app:***@db:5432/numbers"
    assert shown["NUMBERING_BROKER_URL"] == "amqp://guest:***@rabbit//"
    assert "pw" not in repr(shown.values())


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("NUMBERING_DATABASE_URL", "oracle://scott@db/x", "unsupported database 'oracle'"),
        ("NUMBERING_DATABASE_URL", "not a url", "not a database URL"),
        ("NUMBERING_BROKER_URL", "kafka://x", "must be a URL starting with"),
        ("NUMBERING_RESULT_BACKEND", "nonsense", "must be a URL starting with"),
        ("NUMBERING_RESULT_BACKEND", "rpc://", "numbering answers its callers on Redis lists"),
        ("NUMBERING_DATABASE_URL", "", "NUMBERING_DATABASE_URL is set but empty"),
        ("NUMBERING_BROKER_URL", "  ", "NUMBERING_BROKER_URL is set but empty"),
        ("NUMBERING_ISOLATION_LEVEL", "READ UNCOMMITTED", "refused"),
        ("NUMBERING_ISOLATION_LEVEL", "chaos", "unknown isolation level"),
        ("NUMBERING_RETRY_ATTEMPTS", "many", "whole number"),
        ("NUMBERING_RETRY_ATTEMPTS", "0", "at least 1"),
        ("NUMBERING_RETRY_TIMEOUT", "nan", "finite, positive"),
        ("NUMBERING_RETRY_TIMEOUT", "inf", "finite, positive"),
        ("NUMBERING_RETRY_TIMEOUT", "-1", "finite, positive"),
        ("NUMBERING_RETRY_WAIT_MAX", "soon", "finite, positive"),
        ("NUMBERING_DATABSE_URL", "sqlite://", "unknown setting"),
    ],
)
def test_bad_settings_are_clear_errors(variable: str, value: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as info:
        Settings.from_env({variable: value})
    assert isinstance(info.value, ValueError)


def test_queue_type_must_be_known_and_fit_the_broker() -> None:
    amqp = "amqp://guest:guest@rabbit//"
    assert Settings(broker_url=amqp, queue_type="quorum").queue_type == "quorum"
    assert Settings.from_env({"NUMBERING_BROKER_URL": amqp}).queue_type == "classic"
    with pytest.raises(ConfigurationError, match="must be classic or quorum, got 'stream'"):
        Settings.from_env({"NUMBERING_BROKER_URL": amqp, "NUMBERING_QUEUE_TYPE": "stream"})
    with pytest.raises(ConfigurationError, match="is not RabbitMQ"):
        Settings(broker_url="redis://127.0.0.1:6379/0", queue_type="quorum")


def test_passwords_never_reach_configuration_errors() -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({"NUMBERING_BROKER_URL": "kafka://user:hunter2@host"})
    assert "hunter2" not in str(info.value)
    assert "kafka://user:***@host" in str(info.value)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://u:p@h/db", "postgresql://u:***@h/db"),
        ("redis://:secret@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("sqlite:///numbering.db", "sqlite:///numbering.db"),
        ("amqp://guest:p%40ss@rabbit//", "amqp://guest:***@rabbit//"),
        # Cluster nodes: every password masked, not only the first node's.
        (
            "amqp://u:one@h1//;amqp://u:two@h2//;amqp://h3//",
            "amqp://u:***@h1//;amqp://u:***@h2//;amqp://h3//",
        ),
        (
            "sentinel://:pw@s1:26379;sentinel://:pw@s2:26379/0",
            "sentinel://:***@s1:26379;sentinel://:***@s2:26379/0",
        ),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_retry_policy_retries_only_retryable_errors() -> None:
    stats = RetryStats()
    policy = RetryPolicy(attempts=5, timeout=5, wait_initial=0, wait_max=0)
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise SerializationConflict()
        return "done"

    assert policy.call(flaky, stats=stats) == "done"
    assert stats.as_dict() == {"SerializationConflict": 2, "total": 2}

    def bad_input() -> None:
        calls.append(1)
        raise InvalidRequestError("no")

    calls.clear()
    with pytest.raises(InvalidRequestError):
        policy.call(bad_input)
    assert len(calls) == 1


def test_retry_policy_gives_up_with_a_clear_error(caplog: pytest.LogCaptureFixture) -> None:
    policy = RetryPolicy(attempts=3, timeout=5, wait_initial=0, wait_max=0)

    def always() -> None:
        raise LockNotAvailable()

    with (
        caplog.at_level(logging.INFO, "numbering.retry"),
        pytest.raises(RetriesExhaustedError, match="gave up after 3 attempt") as info,
    ):
        policy.call(always, describe="test work")
    assert isinstance(info.value.__cause__, LockNotAvailable)
    assert not info.value.outcome_unknown
    assert "nothing was written" in str(info.value)
    assert sum("retrying test work" in r.message for r in caplog.records) == 2


def test_exhaustion_after_a_lost_connection_says_to_resend_the_key() -> None:
    policy = RetryPolicy(attempts=2, timeout=5, wait_initial=0, wait_max=0)
    errors = iter([ConnectionLost(), SerializationConflict()])

    def work() -> None:
        raise next(errors)

    with pytest.raises(RetriesExhaustedError, match="same request key") as info:
        policy.call(work)
    assert info.value.outcome_unknown


def test_retry_policy_is_bounded_by_time() -> None:
    policy = RetryPolicy(attempts=10_000, timeout=0.2, wait_initial=0.01, wait_max=0.01)
    with pytest.raises(RetriesExhaustedError) as info:
        policy.call(lambda: (_ for _ in ()).throw(SerializationConflict()))
    assert 0.2 <= info.value.elapsed < 2
    assert info.value.attempts < 10_000


@pytest.mark.parametrize(
    "kwargs",
    [{"attempts": 0}, {"timeout": math.nan}, {"timeout": -1}, {"wait_max": math.inf}],
)
def test_retry_policy_rejects_bad_bounds(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def _dbapi_error(orig: Exception, cls: type[sa.exc.DBAPIError]) -> sa.exc.DBAPIError:
    return cls("SELECT 1", {}, orig)


def test_sqlite_errors_translate() -> None:
    locked = _dbapi_error(sqlite3.OperationalError("database is locked"), sa.exc.OperationalError)
    assert isinstance(translate_error(locked), LockNotAvailable)
    race = _dbapi_error(
        sqlite3.IntegrityError("UNIQUE constraint failed: numbering_ledger.request_key"),
        sa.exc.IntegrityError,
    )
    assert isinstance(translate_error(race), KeyRaceConflict)
    missing = _dbapi_error(
        sqlite3.OperationalError("no such table: numbering_sequence"), sa.exc.OperationalError
    )
    assert "run `numbering init-db`" in str(translate_error(missing))


def test_error_tree() -> None:
    error = SequenceNotFoundError("x")
    assert isinstance(error, NumberingError)
    assert isinstance(error, ValueError)
    assert isinstance(error, LookupError)
    assert str(SerializationConflict()) == (
        "Could not serialize access due to a concurrent update (SQLSTATE 40001)."
    )
    assert set(numbering.__all__) <= set(dir(numbering))


def test_tasks_and_config_are_not_top_level_names() -> None:
    """Installing numbering must not shadow users' own `config` or `tasks` modules."""
    assert importlib.util.find_spec("numbering.config") is not None
    here = os.getcwd()
    try:
        os.chdir("/")
        assert importlib.util.find_spec("config") is None
        assert importlib.util.find_spec("tasks") is None
    finally:
        os.chdir(here)


def test_log_format_is_text_or_json() -> None:
    assert Settings.from_env({"NUMBERING_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(ConfigurationError, match="NUMBERING_LOG_FORMAT must be text or json"):
        Settings.from_env({"NUMBERING_LOG_FORMAT": "xml"})


def test_json_log_lines() -> None:
    import json
    import logging

    from numbering.logs import JsonFormatter

    record = logging.LogRecord("numbering.worker", logging.INFO, "f", 1, "hi %s", ("x",), None)
    record.key = "invoice:1"
    line = json.loads(JsonFormatter().format(record))
    assert (line["message"], line["key"], line["level"]) == ("hi x", "invoice:1", "INFO")
    assert "sequence" not in line


def test_replication_settings() -> None:
    settings = Settings.from_env({})
    assert (settings.synchronous_commit, settings.allow_reissue_after_failover) == ("on", False)
    chosen = Settings.from_env(
        {
            "NUMBERING_SYNCHRONOUS_COMMIT": "remote_apply",
            "NUMBERING_ALLOW_REISSUE_AFTER_FAILOVER": "yes",
        }
    )
    assert (chosen.synchronous_commit, chosen.allow_reissue_after_failover) == (
        "remote_apply",
        True,
    )
    assert chosen.masked()["NUMBERING_ALLOW_REISSUE_AFTER_FAILOVER"] == "true"
    with pytest.raises(ConfigurationError, match="must be on or remote_apply, got 'local'"):
        Settings.from_env({"NUMBERING_SYNCHRONOUS_COMMIT": "local"})
    with pytest.raises(ConfigurationError, match="must be true or false, got 'maybe'"):
        Settings.from_env({"NUMBERING_ALLOW_REISSUE_AFTER_FAILOVER": "maybe"})
