"""The quick start installs what it runs: `make demo` needs numbering alone."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _planned(target: str, venv: Path) -> list[str]:
    """The commands ``make TARGET`` would run on a fresh machine (``make -n``)."""
    # Run under `make test` too: the outer make's variables would change what is printed.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    done = subprocess.run(
        ["make", "--no-print-directory", "-n", target, f"VENV={venv}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.splitlines()


def test_make_demo_installs_numbering_without_the_extras(tmp_path: Path) -> None:
    planned = _planned("demo", tmp_path / "venv")
    installs = [line for line in planned if "pip install" in line]
    assert installs == [f"{tmp_path / 'venv'}/bin/pip install --quiet -e ."]
    assert planned[-1] == f"{tmp_path / 'venv'}/bin/numbering demo"


def test_make_test_installs_the_test_tools(tmp_path: Path) -> None:
    planned = _planned("install", tmp_path / "venv")
    assert any("-e '.[test,bench,examples,mysql,django]'" in line for line in planned), planned
