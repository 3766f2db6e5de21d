"""`numbering demo`, as a new user runs it: with no settings, then on real servers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.acceptance


def demo(cwd: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBERING_")}
    env.update(settings)
    return subprocess.run(
        [sys.executable, "-m", "numbering", "demo"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_demo_with_no_settings_needs_no_server(tmp_path: Path) -> None:
    first = demo(tmp_path)
    assert first.returncode == 0, first.stderr
    out = first.stdout
    assert f"ledger: sqlite ({tmp_path / 'numbering.db'})" in out
    assert "queue: in-process" in out
    assert "2000 / 2000 numbered" in out
    assert "1..2000, each once" in out
    assert "5000 / 5000 documents numbered" in out
    assert "documents got 2001..7000" in out
    assert "audit demo-invoices: ok: 7000 value(s)" in out
    assert (tmp_path / "numbering.db").exists()
    again = demo(tmp_path)  # a second run carries on in the same ledger
    assert again.returncode == 0, again.stderr
    assert "7001..9000, each once" in again.stdout
    assert "audit demo-invoices: ok: 14000 value(s)" in again.stdout


def test_demo_on_postgresql_and_redis(
    pg_empty_url: str, redis_urls: tuple[str, str], tmp_path: Path
) -> None:
    done = demo(
        tmp_path,
        NUMBERING_DATABASE_URL=pg_empty_url,
        NUMBERING_BROKER_URL=redis_urls[0],
        NUMBERING_RESULT_BACKEND=redis_urls[1],
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ledger: postgresql" in done.stdout
    assert "queue: redis broker, a numbering worker here" in done.stdout
    shown = re.search(r"the single consumer assigned them in (\d+) transaction\(s\)", done.stdout)
    assert shown is not None, done.stdout
    assert 1 <= int(shown.group(1)) <= 2001  # batches: fewer than the 2001 requests
    assert "audit demo-invoices: ok: 7000 value(s)" in done.stdout
    assert not (tmp_path / "numbering.db").exists()
