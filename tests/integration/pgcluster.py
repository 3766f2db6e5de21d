"""PostgreSQL primaries and standbys of the tests' own, built with PostgreSQL's tools.

Each :class:`Node` is a postgres process on a free loopback port with its data directory
in a temporary folder; the shared server on 5432 is never touched. ``initdb`` runs once
per test session (:func:`initdb_template`); each test copies that directory, so a
primary starts in about a second and a standby (``pg_basebackup -R``) in about another.
As root, every PostgreSQL tool runs as the ``postgres`` user (``initdb`` refuses root).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg2

__all__ = ["Cluster", "Node", "bindir", "initdb_template"]


def bindir() -> Path:
    """Where initdb, pg_ctl and pg_basebackup are (``pg_config --bindir``, or Debian's
    versioned folder)."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        found = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, check=True
        ).stdout.strip()
        if (Path(found) / "initdb").exists():
            return Path(found)
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "initdb").exists():
            return Path(candidate)
    raise FileNotFoundError("PostgreSQL's server tools (initdb, pg_ctl) are not installed")


def _as_owner(args: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


def _give_to_owner(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, "postgres", "postgres")


def _run(args: list[str], timeout: float = 120) -> None:
    done = subprocess.run(_as_owner(args), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed:\n{done.stdout}\n{done.stderr}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def initdb_template(root: Path) -> Path:
    """A freshly initialised data directory under ``root``, to copy for each node."""
    root.mkdir(parents=True, exist_ok=True)
    _give_to_owner(root)
    data = root / "template"
    _run(
        [
            *(str(bindir() / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"),
            *("-k", "--no-sync", "-E", "UTF8", "--locale", "C"),
        ]
    )
    return data


class Node:
    """One PostgreSQL server of a test's cluster."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.root = root
        self.data = root / name
        self.log = root / f"{name}.log"
        self.sockets = root / "sockets"
        self.port = _free_port()

    # -- building ----------------------------------------------------------------------------

    @classmethod
    def primary(cls, template: Path, root: Path, name: str = "primary", **conf: str) -> Node:
        """A primary copied from ``template`` and started; ``conf``: extra settings."""
        node = cls(root, name)
        root.mkdir(parents=True, exist_ok=True)
        _give_to_owner(root)
        node.sockets.mkdir(exist_ok=True)
        _give_to_owner(node.sockets)
        _run(["cp", "-a", str(template), str(node.data)])
        node._configure({"wal_level": "replica", "max_wal_senders": "8", **conf})
        node.start()
        return node

    def standby(self, name: str, **conf: str) -> Node:
        """A streaming standby of this node, started, known to it as ``name`` (its
        ``application_name``, what ``synchronous_standby_names`` lists)."""
        node = Node(self.root, name)
        _run(
            [
                str(bindir() / "pg_basebackup"),
                "-d",
                f"host=127.0.0.1 port={self.port} user=postgres application_name={name}",
                "-D",
                str(node.data),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
            ]
        )
        node._configure(conf)
        node.start()
        return node

    def _configure(self, conf: dict[str, str]) -> None:
        settings = {
            "port": str(self.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.sockets}'",
            "cluster_name": f"'{self.name}'",
            "shared_buffers": "'16MB'",
            "max_connections": "40",
            "hot_standby": "on",
            **conf,
        }
        lines = "".join(f"{key} = {value}\n" for key, value in settings.items())
        # Appended as the owner: the file is the postgres user's.
        done = subprocess.run(
            _as_owner(["tee", "-a", str(self.data / "postgresql.conf")]),
            input=lines,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr)

    # -- running -----------------------------------------------------------------------------

    def start(self) -> None:
        _run([str(bindir() / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "start"])

    def stop(self, mode: str = "fast") -> None:
        """``mode``: ``fast`` (clean), ``immediate`` (a crash: no shutdown checkpoint)."""
        with contextlib.suppress(RuntimeError):  # already stopped
            _run([str(bindir() / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"])

    def promote(self) -> None:
        _run([str(bindir() / "pg_ctl"), "-D", str(self.data), "-w", "promote"])

    def dsn(self, database: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={database}"

    def url(self, database: str = "numbering") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @contextlib.contextmanager
    def connect(self, database: str = "postgres") -> Iterator[psycopg2.extensions.connection]:
        connection = psycopg2.connect(self.dsn(database), connect_timeout=10)
        connection.autocommit = True
        try:
            yield connection
        finally:
            connection.close()

    def sql(self, statement: str, database: str = "postgres") -> list[tuple[object, ...]]:
        """Run one statement in autocommit; its rows (none for a command)."""
        with self.connect(database) as connection, connection.cursor() as cursor:
            cursor.execute(statement)
            return list(cursor.fetchall()) if cursor.description else []

    def caught_up(self, standby: Node) -> None:
        """Wait until ``standby`` has replayed everything this primary has written."""
        [(lsn,)] = self.sql("SELECT pg_current_wal_lsn()")
        standby.wait_for(f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn", True)

    def reload(self, **conf: str) -> None:
        """``ALTER SYSTEM SET`` each of ``conf``, then reload the configuration."""
        with self.connect() as connection, connection.cursor() as cursor:
            for key, value in conf.items():
                cursor.execute(f"ALTER SYSTEM SET {key} = %s", (value,))
            cursor.execute("SELECT pg_reload_conf()")

    def wait_for(
        self, query: str, expected: object, database: str = "postgres", timeout: float = 60
    ) -> None:
        """Wait until ``query``'s first column of its first row is ``expected``."""
        deadline = time.monotonic() + timeout
        seen: object = None
        while time.monotonic() < deadline:
            with contextlib.suppress(psycopg2.Error):
                rows = self.sql(query, database)
                seen = rows[0][0] if rows else None
                if seen == expected:
                    return
            time.sleep(0.05)
        raise AssertionError(f"{self.name}: {query!r} gave {seen!r}, not {expected!r}")


class Cluster:
    """A test's nodes, in a folder of their own; :meth:`close` stops them all."""

    def __init__(self, template: Path) -> None:
        self.template = template
        # Not under pytest's tmp_path: its parent is root's alone, and the servers run
        # as the postgres user.
        self.root = Path(tempfile.mkdtemp(prefix="numbering-pg-"))
        self.nodes: list[Node] = []

    def primary(self, name: str = "primary", **conf: str) -> Node:
        node = Node.primary(self.template, self.root, name, **conf)
        self.nodes.append(node)
        return node

    def standby(self, of: Node, name: str, **conf: str) -> Node:
        node = of.standby(name, **conf)
        self.nodes.append(node)
        return node

    def url(self, *nodes: Node, database: str = "numbering") -> str:
        """A multi-host URL: libpq tries the nodes in turn and keeps the primary."""
        hosts = "&".join(f"host=127.0.0.1:{node.port}" for node in nodes)
        return f"postgresql://postgres@/{database}?{hosts}&target_session_attrs=read-write"

    def close(self) -> None:
        for node in self.nodes:
            node.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
