"""The benchmark harness, at smoke size: every scenario runs, audits and reports.

Figures at this size mean nothing; this only keeps `make bench` from rotting.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import ADMIN_URL, _admin
from sqlalchemy.engine import make_url

pytestmark = pytest.mark.acceptance
ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_smoke_run(pg_empty_url: str, tmp_path: Path) -> None:
    output = tmp_path / "benchmarks.md"
    run_probe(
        "benchmarks.run",
        ["--smoke", "--output", str(output)],
        {**os.environ, "BENCH_LOGS": str(tmp_path / "logs")},
        timeout=600,
    )
    report = output.read_text()
    for heading in (
        "## Targets",
        "## Web requests",
        "## Bare enqueue-and-await",
        "## Many sequences",
        "## Worker fleet",
        "## Batch numbering",
        "## Growth",
    ):
        assert heading in report
    for system in (
        "numbering (redis)",
        "numbering (rabbitmq)",
        "django-sequences",
        "SELECT FOR UPDATE",
        "Celery no-op round trip",
        "nextval",
        "numbering (one process, every shard by hand)",
        "numbering (fleet of 2)",
        "numbering (redis, 2 batches in flight)",
        "numbering (redis, replies in another database)",
        "numbering (redis, no hash chain)",
    ):
        assert f"| {system}" in report
    assert "Result: every ledger gapless." in report
    assert (tmp_path / "benchmarks-web.png").stat().st_size > 10_000
    assert (tmp_path / "benchmarks-bare.png").stat().st_size > 10_000


def test_mariadb_benchmark_smoke_run(mariadb_url: str, tmp_path: Path) -> None:
    """`make bench-mariadb` at smoke size, on a scratch database next to the test's."""
    output = tmp_path / "benchmarks-mariadb.md"
    database = f"{make_url(mariadb_url).database}_bench"
    admin = make_url(mariadb_url).set(database="").render_as_string(hide_password=False)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.mariadb", "--smoke", "--output", str(output),
             "--admin-url", admin, "--database", database],
            cwd=ROOT,
            env={**os.environ, "BENCH_LOGS": str(tmp_path / "logs")},
            capture_output=True,
            text=True,
            timeout=600,
        )  # fmt: skip
    finally:
        engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{database}`")
        engine.dispose()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = output.read_text()
    for heading in ("## Targets", "## Web requests", "## Bare enqueue-and-await", "## Batch"):
        assert heading in report
    for system in ("numbering (redis)", "django-sequences", "SELECT FOR UPDATE"):
        assert f"| {system} |" in report
    assert "InnoDB set-based UPDATE" in report
    assert "Result: every ledger gapless." in report


def run_probe(
    module: str, args: list[str], env: dict[str, str] | None = None, *, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m module`` on a scratch database of its own (dropped afterwards);
    asserts that it exited 0."""
    database = f"numbering_{module.rpartition('.')[2]}_{os.getpid()}"
    try:
        done = subprocess.run(
            [sys.executable, "-m", module, *args, "--admin-url", ADMIN_URL, "--database", database],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    finally:
        with _admin().connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.parametrize(
    ("layout", "audited"),
    [([], "audit of 1 sequence(s): ok"), (["--sequences", "6", "--shards", "2", "--workers", "2"],
                                           "audit of 6 sequence(s): ok")],
    ids=["one-sequence", "many-sequences"],
)  # fmt: skip
def test_cpu_breakdown_runs_and_audits(
    pg_empty_url: str, tmp_path: Path, layout: list[str], audited: str
) -> None:
    done = run_probe(
        "benchmarks.cpu",
        ["--requesters", "2", "--seconds", "1", *layout],
        env={**os.environ, "BENCH_LOGS": str(tmp_path / "logs")},
    )
    assert "numbering: 2 requesters: " in done.stdout
    for kind in ("requesters", "numbering worker", "postgres", "redis-server", "all"):
        assert f"  {kind} " in done.stdout, done.stdout
    assert audited in done.stdout
    if not layout:  # its peers on the same workload, in the same run
        assert "django-sequences: 2 requesters: " in done.stdout, done.stdout
        assert "celery-noop: 2 requesters: " in done.stdout, done.stdout
        assert "  celery worker " in done.stdout, done.stdout


def test_overhead_probe_runs_and_audits(pg_empty_url: str) -> None:
    done = run_probe("benchmarks.overhead", ["--numbers", "20", "--rounds", "2"])
    for name in ("numbering", "raw psycopg2", "raw, prepared"):
        assert f"  {name} " in done.stdout, done.stdout
    # 50 warm-up numbers and 2 rounds of 20 each, all three ledgers gapless
    assert "audit of 3 sequence(s): ok, 270 values" in done.stdout, done.stdout
