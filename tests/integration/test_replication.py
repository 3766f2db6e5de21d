"""Replicated PostgreSQL: no number is ever handed out twice across a failover.

Every test builds its own primary and standbys with PostgreSQL's tools on free loopback
ports (:mod:`integration.pgcluster`); the shared server on 5432 is not touched.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import _unavailable
from integration.pgcluster import Cluster, Node, bindir, initdb_template
from integration.stack import Stack
from ledger_check import check_gapless
from test_preflight import documented_grants

from numbering import Allocator, allocate, create_engine, init_db
from numbering.errors import ConnectionLost, RequestTimeout
from numbering.tasks.preflight import check_database

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def pg_data_template() -> Iterator[Path]:
    try:
        bindir()
    except FileNotFoundError as exc:
        _unavailable(str(exc), "PostgreSQL's server tools")
    root = Path(tempfile.mkdtemp(prefix="numbering-pg-template-"))
    try:
        yield initdb_template(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def cluster(pg_data_template: Path) -> Iterator[Cluster]:
    made = Cluster(pg_data_template)
    yield made
    made.close()


def numbering_database(primary: Node) -> None:
    primary.sql("CREATE DATABASE numbering")
    engine = create_engine(primary.url())
    try:
        init_db(engine)
    finally:
        engine.dispose()


def synchronous_pair(cluster: Cluster) -> tuple[Node, Node]:
    """A primary whose commits wait for its one standby, ``stby1``; the numbering schema."""
    primary = cluster.primary(synchronous_standby_names="'ANY 1 (stby1)'")
    standby = cluster.standby(primary, "stby1")
    primary.wait_for("SELECT sync_state FROM pg_stat_replication", "quorum")
    numbering_database(primary)
    primary.caught_up(standby)
    return primary, standby


def durability(url: str, **options: bool) -> tuple[list[str], list[str], list[str]]:
    engine = create_engine(url)
    try:
        found = check_database(engine, **options)
    finally:
        engine.dispose()
    return found.problems, found.warnings, found.facts


# -- start-up checks -------------------------------------------------------------------------


def test_a_synchronous_standby_passes_and_the_state_is_reported(
    cluster: Cluster, tmp_path: Path
) -> None:
    primary, _ = synchronous_pair(cluster)
    problems, warnings, facts = durability(primary.url())
    assert (problems, warnings) == ([], [])
    assert facts == [
        "PostgreSQL primary, timeline 1",
        "synchronous_standby_names: 'ANY 1 (stby1)'",
        "standbys: stby1 (streaming, quorum)",
    ]
    # What an operator runs before starting a worker.
    stack = Stack(primary.url(), "redis://127.0.0.1:6379/14", "redis://127.0.0.1:6379/15", tmp_path)
    shown = stack.numbering("config", "--check")
    assert shown.returncode == 0, shown.stderr
    assert "database: standbys: stby1 (streaming, quorum)" in shown.stdout.splitlines()


def test_a_worker_pointed_at_a_standby_refuses(cluster: Cluster, tmp_path: Path) -> None:
    _, standby = synchronous_pair(cluster)
    problems, _, _ = durability(standby.url())
    assert len(problems) == 1
    assert "the database is a standby (pg_is_in_recovery() is true)" in problems[0]
    # The real worker, as an operator starts it.
    stack = Stack(standby.url(), "redis://127.0.0.1:6379/14", "redis://127.0.0.1:6379/15", tmp_path)
    done = stack.numbering("worker", "--sequence", "invoices")
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("error: the worker refuses to start:"), done.stderr
    assert "target_session_attrs=read-write" in done.stderr
    assert "Traceback" not in done.stderr


def test_asynchronous_standbys_are_refused_unless_the_risk_is_accepted(
    cluster: Cluster, tmp_path: Path
) -> None:
    primary = cluster.primary()
    cluster.standby(primary, "async1")
    primary.wait_for("SELECT state FROM pg_stat_replication", "streaming")
    numbering_database(primary)
    problems, warnings, facts = durability(primary.url())
    assert len(problems) == 1
    assert "only asynchronous standbys replicate this database (async1)" in problems[0]
    stack = Stack(primary.url(), "redis://127.0.0.1:6379/14", "redis://127.0.0.1:6379/15", tmp_path)
    shown = stack.numbering("config", "--check")
    assert shown.returncode == 1
    assert "problem: database: only asynchronous standbys" in shown.stderr
    assert "Traceback" not in shown.stderr
    assert "NUMBERING_ALLOW_REISSUE_AFTER_FAILOVER=true" in problems[0]
    assert "standbys: async1 (streaming, async)" in facts
    problems, warnings, _ = durability(primary.url(), allow_async_standby=True)
    assert problems == []
    assert len(warnings) == 1
    assert "can hand out numbers that were already answered" in warnings[0]


def test_synchronous_commit_local_is_refused_and_numbering_forces_on(cluster: Cluster) -> None:
    primary, _ = synchronous_pair(cluster)
    primary.sql("ALTER DATABASE numbering SET synchronous_commit = local")
    problems, _, _ = durability(primary.url())
    assert len(problems) == 1
    assert "synchronous_commit=local while standbys replicate" in problems[0]
    # numbering's own sessions commit with synchronous_commit=on whatever the default.
    numbers = Allocator(primary.url())
    try:
        level = numbers.run(lambda c: c.execute(sa.text("SHOW synchronous_commit")).scalar())
        assert level == "on"
        # A caller's own transaction is raised to `on` for itself by allocate().
        plain = sa.create_engine(primary.url().replace("postgresql:", "postgresql+psycopg2:"))
        numbers.create_sequence("invoices")
        with plain.begin() as conn:
            assert conn.execute(sa.text("SHOW synchronous_commit")).scalar() == "local"
            allocate(conn, "invoices", key="mine")
            assert conn.execute(sa.text("SHOW synchronous_commit")).scalar() == "on"
        with plain.connect() as conn:  # SET LOCAL: the session keeps its own default
            assert conn.execute(sa.text("SHOW synchronous_commit")).scalar() == "local"
        plain.dispose()
        check_gapless(numbers.engine, "invoices", keys=["mine"])
    finally:
        numbers.close()


def test_a_role_that_cannot_see_the_standbys_is_told_which_grant_fixes_it(
    cluster: Cluster,
) -> None:
    primary, _ = synchronous_pair(cluster)
    primary.sql("CREATE ROLE app LOGIN")
    # The grants of docs/deployment.md, all but the one this test is about.
    for grant in documented_grants("numbering", "app"):
        if "pg_monitor" not in grant and " invoices " not in grant:
            primary.sql(grant, "numbering")
    url = primary.url().replace("postgres@", "app@")
    problems, _, _ = durability(url)
    assert len(problems) == 1
    assert "cannot see the state of 1 standby(s)" in problems[0]
    assert "GRANT pg_monitor TO the role numbering connects as" in problems[0]
    primary.sql("GRANT pg_monitor TO app")
    assert durability(url)[0] == []


def test_a_missing_synchronous_standby_is_a_warning(cluster: Cluster) -> None:
    primary, standby = synchronous_pair(cluster)
    standby.stop()
    primary.wait_for("SELECT count(*) FROM pg_stat_replication", 0)
    problems, warnings, facts = durability(primary.url())
    assert problems == []
    assert len(warnings) == 1
    assert "no synchronous standby is connected: every COMMIT waits" in warnings[0]
    assert "standbys: none connected" in facts


# -- a COMMIT whose wait for the standby is cancelled ---------------------------------------


def waiting_for_standby(primary: Node) -> list[int]:
    """The numbering sessions whose COMMIT waits for the synchronous standby."""
    rows = primary.sql(
        "SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep' "
        "AND application_name = 'numbering'"
    )
    return [int(pid) for (pid,) in rows]


def wait_until(condition: object, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.parametrize("path", ["pipelined", "in-transaction"])
def test_a_commit_whose_standby_wait_was_cancelled_is_never_answered(
    cluster: Cluster, path: str
) -> None:
    primary, standby = synchronous_pair(cluster)
    numbers = Allocator(primary.url())
    try:
        numbers.create_sequence("invoices")
        assert numbers.next_value("invoices", key="before") == 1
        standby.stop()  # every COMMIT now waits for it
        answers: list[int] = []

        def take() -> None:
            if path == "pipelined":  # numbering's own transaction, as the worker runs it
                answers.append(numbers.next_value("invoices", key="doubted"))
            else:  # Allocator.run around allocate(), as an application's document code
                answers.append(numbers.run(lambda c: allocate(c, "invoices", key="doubted")))

        taker = threading.Thread(target=take)
        taker.start()
        wait_until(lambda: waiting_for_standby(primary), "a COMMIT waiting for the standby")
        [pid] = waiting_for_standby(primary)
        # The cancelled wait: PostgreSQL reports the COMMIT done, with a warning only.
        primary.sql(f"SELECT pg_cancel_backend({pid})")
        # The number is committed on the primary alone; it is not answered. The retry
        # locks the counter, finds the key and commits: that COMMIT waits again.
        wait_until(
            lambda: primary.sql("SELECT count(*) FROM numbering_ledger", "numbering")[0][0] == 2,
            "the locally committed row",
        )
        wait_until(lambda: waiting_for_standby(primary), "the retry's COMMIT waiting")
        assert answers == []
        assert taker.is_alive()
        standby.start()  # the standby catches up: the retry's COMMIT returns
        taker.join(60)
        assert not taker.is_alive()
        assert answers == [2]
        # The doubted commit was retried, not answered.
        assert numbers.stats.as_dict().get("ReplicationUnconfirmed") == 1
        by_key = check_gapless(numbers.engine, "invoices", keys=["before", "doubted"])
        assert by_key["doubted"][0] == 2
        # And the standby has it: a failover now cannot lose what was answered.
        standby.wait_for(
            "SELECT value FROM numbering_ledger WHERE request_key = 'doubted'", 2, "numbering"
        )
    finally:
        numbers.close()


def test_the_worker_never_answers_from_a_commit_whose_standby_wait_was_cancelled(
    cluster: Cluster, redis_urls: tuple[str, str], tmp_path: Path
) -> None:
    """The same through the real worker and client: the batch is committed on the primary
    alone, nothing is replied; once the standby is back the request gets that number."""
    primary, standby = synchronous_pair(cluster)
    stack = Stack(cluster.url(primary, standby), *redis_urls, tmp_path)
    try:
        Allocator(primary.url()).create_sequence("invoices")
        worker = stack.worker("--sequence", "invoices")
        client = stack.client(timeout=120)
        assert client.next_value("invoices", key="before") == 1
        standby.stop()
        answers: list[int] = []
        taker = threading.Thread(
            target=lambda: answers.append(client.next_value("invoices", key="doubted"))
        )
        taker.start()
        wait_until(lambda: waiting_for_standby(primary), "the batch's COMMIT waiting")
        [pid] = waiting_for_standby(primary)
        primary.sql(f"SELECT pg_cancel_backend({pid})")
        worker.wait_for("might not have been replicated")  # seen, and not answered
        wait_until(lambda: waiting_for_standby(primary), "the retry's COMMIT waiting")
        assert answers == []
        standby.start()
        taker.join(120)
        assert answers == [2]
        stack.check("invoices", ["before", "doubted"], unrecorded=["before", "doubted"])
    finally:
        stack.close()


# -- connections that reach a read-only server ---------------------------------------------


def test_a_read_only_server_is_a_reconnect_not_a_conflict(cluster: Cluster) -> None:
    """A session on a standby (SQLSTATE 25006) is dropped with its pool, so that the retry
    connects again: through a multi-host URL, to whichever server is the primary now."""
    primary, standby = synchronous_pair(cluster)
    Allocator(primary.url()).create_sequence("invoices")
    primary.caught_up(standby)
    on_standby = create_engine(standby.url())
    try:
        with on_standby.connect() as conn:
            with pytest.raises(ConnectionLost, match="read-only, a standby") as caught:
                allocate(conn, "invoices", key="k")
            driver_error = caught.value.__cause__
            assert isinstance(driver_error, sa.exc.DBAPIError)
            assert driver_error.connection_invalidated  # dropped, never reused
    finally:
        on_standby.dispose()


# -- failovers ----------------------------------------------------------------------------


def test_a_failover_to_the_synchronous_standby_hands_out_nothing_twice(
    cluster: Cluster, redis_urls: tuple[str, str], tmp_path: Path
) -> None:
    """Clients under load through a multi-host URL; the primary crashes; the standby is
    promoted (and its inherited synchronous_standby_names cleared). Every client's
    history checks out against the new primary's ledger: gapless, one number per key, no
    answered number given to another key."""
    primary, standby = synchronous_pair(cluster)
    url = cluster.url(primary, standby)
    stack = Stack(url, *redis_urls, tmp_path)
    try:
        setup = Allocator(url)
        setup.create_sequence("invoices")
        setup.close()
        stack.worker("--sequence", "invoices")
        clients = stack.start_clients([("invoices", f"c{c}", 300) for c in range(3)])
        stack.wait_for_numbers("invoices", 150)
        [(at_crash,)] = primary.sql("SELECT last_value FROM numbering_sequence", "numbering")
        primary.stop("immediate")
        standby.promote()
        # The promoted standby kept its old primary's setting: with no standby of its own,
        # every COMMIT would wait for ever.
        standby.reload(synchronous_standby_names="")
        clients.wait()
        stack.check("invoices", [f"c{c}:{i}" for c in range(3) for i in range(300)])
        assert at_crash < 900  # the crash came mid-load: most numbers came after it
        output = stack.workers[0].output()
        assert "Traceback" not in output
        # The worker noticed the new primary, and checked before numbering on.
        assert "database failover: the primary is on timeline 2 now, it was on 1" in output
        assert "every served counter agrees with its ledger; numbering on" in output
        # The consumer lock (an advisory lock: not replicated) was taken on the new primary.
        assert output.count("active consumer of numbering.invoices") == 2
        # The CLI follows the multi-host URL to the new primary too.
        audit = stack.numbering("audit", "invoices")
        assert audit.returncode == 0, audit.stderr
        assert "ok" in audit.stdout
    finally:
        stack.close()


def test_an_asynchronous_failover_really_reissues_answered_numbers(
    cluster: Cluster, redis_urls: tuple[str, str], tmp_path: Path
) -> None:
    """Why the worker refuses asynchronous standbys: with the standby a little behind, a
    failover brings back a counter from before an answered number, and the next request
    gets that number again; the audit cannot see it. A worker run anyway (the override)
    notices that the new primary is behind what it answered, and numbers nothing."""
    primary = cluster.primary()
    standby = cluster.standby(primary, "async1")
    primary.wait_for("SELECT state FROM pg_stat_replication", "streaming")
    numbering_database(primary)
    stack = Stack(cluster.url(primary, standby), *redis_urls, tmp_path)
    try:
        refused = stack.numbering("worker", "--sequence", "invoices")
        assert refused.returncode == 1
        assert "only asynchronous standbys replicate this database" in refused.stderr
        stack.env["NUMBERING_ALLOW_REISSUE_AFTER_FAILOVER"] = "true"
        Allocator(primary.url()).create_sequence("invoices")
        worker = stack.worker("--sequence", "invoices")
        assert "running anyway because NUMBERING_ALLOW_REISSUE_AFTER_FAILOVER" in worker.output()
        client = stack.client(timeout=5)
        assert client.next_value("invoices", key="a") == 1
        primary.caught_up(standby)
        standby.stop()  # the standby falls behind (a network hiccup, a restart)
        answered = client.next_value("invoices", key="b")  # acknowledged by the primary
        assert answered == 2
        primary.stop("immediate")  # the primary dies before the standby caught up
        standby.start()
        standby.promote()
        # The worker follows the URL to the new primary, sees its counter below what it
        # answered, and numbers nothing.
        with pytest.raises(RequestTimeout):
            client.next_value("invoices", key="c")
        worker.wait_for("was handed out before the failover: the standby was behind")
        # (Stopped first: once someone else takes 2 again, its counter is no longer
        # below what it answered, and it would number the waiting request 3.)
        worker.kill()
        after = Allocator(standby.url())
        try:
            # The hazard itself, for whoever numbers on anyway: 2 is handed out again ...
            assert after.next_value("invoices", key="d") == answered
            # ... and the ledger of the promoted standby looks perfectly fine.
            check_gapless(after.engine, "invoices", keys=["a", "d"])
        finally:
            after.close()
    finally:
        stack.close()
