"""Callers in other languages: a real Node.js Celery client (celery-node 0.5.9, from the
npm registry) asks a real numbering worker for numbers over Redis, with the plain Celery
protocol, and reads its answers from numbering's result backend."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import redis
from conftest import _unavailable
from integration.stack import Stack
from ledger_check import check_gapless
from test_queue import setup_sequences

from numbering import create_engine
from numbering.routing import sequence_queue

CELERY_NODE = "celery-node@0.5.9"
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "interop" / "celery_node_client.js"
# Installed once per checkout beside the virtualenv (as Django 4.2 is for test_django).
MODULES = ROOT / ".venv" / "celery-node"


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """A directory whose node_modules holds celery-node (installed from the registry)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        _unavailable("node and npm are not installed", "Node.js")
    if not (MODULES / "node_modules" / "celery-node").is_dir():
        MODULES.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["npm", "install", "--prefix", str(MODULES), "--no-audit", "--no-fund", CELERY_NODE],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            _unavailable(f"npm install {CELERY_NODE}: {done.stderr[-500:]}", "npm registry")
    return MODULES / "node_modules"


def test_a_node_js_celery_client_gets_numbers(stack: Stack, node_modules: Path) -> None:
    """Numbers for 20 keys, the first key again (its number, resent), a request numbering
    refuses (a FAILURE whose result names the error), and the gapless audit at the end."""
    setup_sequences(stack, "invoices")
    worker = stack.worker("--sequence", "invoices")
    backend = stack.settings.result_backend  # the caller's backend must be numbering's
    done = subprocess.run(
        [
            "node",
            str(SCRIPT),
            stack.settings.broker_url,
            backend,
            sequence_queue("invoices"),
            "invoices",
            "node",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={"NODE_PATH": str(node_modules), "PATH": "/usr/bin:/bin:/usr/local/bin"},
    )
    assert done.returncode == 0, done.stderr
    answers = json.loads(done.stdout)
    assert [a["value"] for a in answers["numbers"]] == list(range(1, 21))
    assert [a["key"] for a in answers["numbers"]] == [f"node:{i}" for i in range(20)]
    assert not any(a["resent"] for a in answers["numbers"])
    assert (answers["resent"]["value"], answers["resent"]["resent"]) == (1, True)
    # The refused request: the task FAILED; its result in the backend says why.
    refused = answers["refused"]
    assert refused.get("error") == "FAILURE", refused
    meta = json.loads(
        redis.Redis.from_url(backend).get(f"celery-task-meta-{refused['task_id']}") or "{}"
    )
    assert meta["status"] == "FAILURE"
    assert meta["result"]["exc_type"] == "InvalidCountError"
    assert meta["result"]["exc_message"] == ["count must be at least 1, got 0"]
    # The control tasks from the same client: freeze, a refused request, thaw.
    assert answers["frozen"] == {"sequence": "invoices", "frozen": True}
    assert answers["frozenAnswer"].get("error") == "FAILURE", answers["frozenAnswer"]
    meta = json.loads(
        redis.Redis.from_url(backend).get(f"celery-task-meta-{answers['frozenAnswer']['task_id']}")
        or "{}"
    )
    assert meta["result"]["exc_type"] == "SequenceFrozenError"
    assert answers["thawed"] == {"sequence": "invoices", "frozen": False}
    # numbering.void on the control queue: the last number, with a reason; a second
    # copy is answered with the error (an answer, not a task failure).
    voided = answers["voided"]
    assert (voided["sequence"], voided["key"], voided["value"]) == ("invoices", "node:19", 20)
    assert "already voided" in answers["voidedAgain"]["error"]["message"], answers
    # The worker said once where this caller's answers go (a message does not say which
    # backend its caller reads: one that reads another finds the reason here).
    told = [line for line in worker.output().splitlines() if "plain Celery caller" in line]
    assert len(told) == 1, told
    assert "answered only in numbering's result backend" in told[0], told
    assert backend.rsplit("/", 1)[-1] in told[0], told
    check_gapless(
        create_engine(stack.settings.database_url),
        "invoices",
        keys=[f"node:{i}" for i in range(20)],
    )
