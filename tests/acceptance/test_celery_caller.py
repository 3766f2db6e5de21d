"""The plain Celery caller example (examples/celery_caller.py), as a user runs it against
a real worker: a number, the same key again, a block, a refused request, and no worker."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from integration.stack import Stack
from ledger_check import check_gapless

from numbering import Allocator, create_engine

pytestmark = pytest.mark.acceptance
ROOT = Path(__file__).resolve().parents[2]


def run(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "examples.celery_caller", *args],
        cwd=ROOT,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_plain_celery_app_asks_for_numbers(stack: Stack) -> None:
    Allocator(stack.settings.database_url).create_sequence("invoices")
    done = run(stack, "invoices", "a:1", "--timeout", "2")
    assert done.returncode == 2, done
    assert "no answer in 2 s. Is a worker serving numbering.invoices?" in done.stderr
    assert "Traceback" not in done.stderr
    stack.worker("--sequence", "invoices")
    # The request sent while no worker ran was queued, and is answered now: same number.
    first = run(stack, "invoices", "a:1", "--timeout", "60")
    assert first.returncode == 0, first
    assert json.loads(first.stdout)["value"] == 1
    block = run(stack, "invoices", "a:2", "--count", "10", "--reference", "batch 7")
    assert (json.loads(block.stdout)["value"], json.loads(block.stdout)["count"]) == (2, 10)
    again = run(stack, "invoices", "a:1")
    assert (json.loads(again.stdout)["value"], json.loads(again.stdout)["resent"]) == (1, True)
    refused = run(stack, "invoices", "a:3", "--count", "0")
    assert refused.returncode == 1, refused
    assert refused.stderr.startswith("error: InvalidCountError: count must be at least 1")
    assert "Traceback" not in refused.stderr
    check_gapless(create_engine(stack.settings.database_url), "invoices", keys=["a:1", "a:2"])
