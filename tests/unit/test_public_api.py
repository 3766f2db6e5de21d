"""The public names: every error importable from ``numbering``, clear TypeErrors for the
usual wrong first argument of ``allocate``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import numbering
from numbering import Allocator, allocate, assign, assign_many, create_engine, errors


def test_every_public_error_is_exported_from_the_package() -> None:
    for name in errors.__all__:
        assert getattr(numbering, name) is getattr(errors, name), name
        assert name in numbering.__all__, name
        assert name in (errors.__doc__ or ""), f"{name} is missing from the errors tree"


def test_allocate_says_what_to_pass_instead_of_an_engine(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    engine = create_engine(url)
    allocator = Allocator(engine)
    cases = {
        engine: "an Engine has no transaction of its own",
        url: "not a URL; numbering.create_engine(url) builds the engine",
        allocator: "call the Allocator's methods instead",
        42: "got int",
    }
    try:
        for wrong, message in cases.items():
            with pytest.raises(TypeError, match="pass the SQLAlchemy Session or Connection"):
                allocate(wrong, "invoices")  # type: ignore[call-overload]
            with pytest.raises(TypeError, match=re.escape(message)):
                allocate(wrong, "invoices")  # type: ignore[call-overload]
        with pytest.raises(TypeError, match=r"assign\(\) runs in your transaction"):
            assign(engine, "invoices", [])  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"assign_many\(\) runs in your transaction"):
            assign_many(engine, {})  # type: ignore[arg-type]
    finally:
        allocator.close()


def test_import_numbering_loads_no_celery_or_kombu() -> None:
    """Allocating in one's own transaction needs no task queue: ``import numbering``
    must not pay for Celery or kombu (the client loads them when it is used)."""
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, numbering; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'celery', 'kombu'}))",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert loaded.strip() == "[]"
