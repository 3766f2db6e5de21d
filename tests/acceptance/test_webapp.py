"""The example web app (examples/webapp.py) over HTTP, against the real stack."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from integration.stack import Stack
from ledger_check import check_gapless

from numbering import Allocator, create_engine

pytestmark = pytest.mark.acceptance
ROOT = Path(__file__).resolve().parents[2]


def call(base: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        base + path, data=data, method=method, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_invoices_over_http(stack: Stack, tmp_path: Path) -> None:
    numbers = Allocator(stack.settings.database_url)
    numbers.create_sequence("invoices", format="INV-{year}-{number:04d}", period="year")
    stack.worker("--sequence", "invoices")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (tmp_path / "web.log").open("w")
    web = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "examples.webapp:app", "--port", str(port)],
        cwd=ROOT,
        env=stack.env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(base + "/docs", timeout=2)
                break
            except OSError:
                assert web.poll() is None, (tmp_path / "web.log").read_text()
                assert time.monotonic() < deadline, "the web app did not start"
                time.sleep(0.2)

        answers: list[tuple[int, Any]] = []

        def create(i: int) -> None:
            body = {"customer": f"c{i}", "amount_cents": 100 + i, "issued_on": "2026-05-01"}
            answers.append(call(base, "POST", "/invoices", body))

        threads = [threading.Thread(target=create, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert [status for status, _ in answers] == [201] * 16, answers
        got = sorted(invoice["number"] for _, invoice in answers)
        assert got == list(range(1, 17))
        assert {invoice["formatted"] for _, invoice in answers} == {
            f"INV-2026-{n:04d}" for n in range(1, 17)
        }
        status, back_dated = call(
            base,
            "POST",
            "/invoices",
            {"customer": "x", "amount_cents": 1, "issued_on": "2025-12-31"},
        )
        assert (status, back_dated["formatted"]) == (201, "INV-2025-0001")
        some = answers[3][1]
        assert call(base, "GET", f"/invoices/{some['id']}") == (200, some)
        # Asking again for a numbered invoice changes nothing.
        assert call(base, "POST", f"/invoices/{some['id']}/number") == (200, some)

        # The app died after the number was assigned but before it was saved: the repair
        # call asks with the same key and gets the same number, not a new one.
        engine = create_engine(stack.settings.database_url)
        with engine.begin() as conn:
            orphan = conn.execute(
                sa.text(
                    "INSERT INTO example_invoices (customer, amount_cents, issued_on) "
                    "VALUES ('crash', 5, '2026-06-01') RETURNING id"
                )
            ).scalar_one()
        assigned = stack.client().next_block("invoices", key=f"invoice:{orphan}", date="2026-06-01")
        status, repaired = call(base, "POST", f"/invoices/{orphan}/number")
        assert (status, repaired["number"]) == (200, assigned.value) == (200, 17)

        assert call(base, "POST", "/invoices", {"customer": "", "amount_cents": 1})[0] == 422
        numbers.freeze("invoices", "2024")
        status, refused = call(
            base,
            "POST",
            "/invoices",
            {"customer": "y", "amount_cents": 1, "issued_on": "2024-03-01"},
        )
        assert status == 409
        assert "frozen" in refused["detail"]
    finally:
        web.terminate()
        web.wait(30)
        log.close()

    with engine.connect() as conn:
        stored = conn.execute(
            sa.text(
                "SELECT number FROM example_invoices WHERE issued_on >= '2026-01-01' "
                "ORDER BY number"
            )
        ).scalars()
        assert list(stored) == list(range(1, 18))  # every 2026 invoice numbered, no gap
    keys = {f"invoice:{invoice['id']}" for _, invoice in answers} | {f"invoice:{orphan}"}
    check_gapless(engine, "invoices/2026", keys=keys)
