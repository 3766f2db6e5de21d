"""A plain install (``pip install numbering``, what ``make demo`` makes) has everything
the worker and the client load, not only what the test tools happen to bring along."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.acceptance

ROOT = Path(__file__).resolve().parents[2]

# What a worker and a client import once they talk to a broker (kombu loads its
# transports lazily, so `import numbering` alone proves nothing about them).
LOADED_AT_RUN_TIME = (
    "import numbering, numbering.client, numbering.tasks.worker, numbering.cli; "
    "import kombu.transport.redis, kombu.transport.pyamqp, psycopg2, hiredis; "
    "print('ok')"
)


def test_a_plain_install_has_what_the_worker_loads(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    installed = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    loaded = subprocess.run(
        [str(venv / "bin" / "python"), "-c", LOADED_AT_RUN_TIME],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert loaded.stdout == "ok\n", loaded.stderr
    helped = subprocess.run(
        [str(venv / "bin" / "numbering"), "worker", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert helped.returncode == 0, helped.stderr
