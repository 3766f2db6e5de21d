"""A MariaDB server of a test's own, to restart or crash without touching the shared one.

``mariadb-install-db`` builds a data directory in a temporary folder (about half a
second) and ``mariadbd`` serves it on a free loopback port; the shared server on 3306 is
never touched. The server runs with InnoDB's durable defaults
(``innodb_flush_log_at_trx_commit=1``), so a crash (SIGKILL) loses no committed
transaction.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import MySQLdb

__all__ = ["MariaDBServer", "available"]

INSTALL_DB = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
SERVER = shutil.which("mariadbd", path="/usr/sbin:/usr/bin:/usr/local/sbin") or shutil.which(
    "mysqld", path="/usr/sbin:/usr/bin:/usr/local/sbin"
)


def available() -> str | None:
    """None when a private server can be built here, else why not."""
    if INSTALL_DB is None or SERVER is None:
        return "mariadb-install-db or mariadbd is not installed"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class MariaDBServer:
    """One ``mariadbd`` on 127.0.0.1, root without a password."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.data = directory / "data"
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)
        user = ["--user=root"] if os.geteuid() == 0 else []
        done = subprocess.run(
            [
                str(INSTALL_DB),
                "--no-defaults",
                f"--datadir={self.data}",
                *user,
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed:\n{done.stdout}\n{done.stderr}")

    @property
    def url(self) -> str:
        return f"mysql://root@127.0.0.1:{self.port}/"

    def start(self, timeout: float = 60) -> None:
        user = ["--user=root"] if os.geteuid() == 0 else []
        log = (self.directory / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [
                str(SERVER),
                "--no-defaults",
                f"--datadir={self.data}",
                *user,
                f"--port={self.port}",
                "--bind-address=127.0.0.1",
                f"--socket={self.directory / 'mysqld.sock'}",
                f"--pid-file={self.directory / 'mysqld.pid'}",
                "--innodb-buffer-pool-size=64M",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                MySQLdb.connect(host="127.0.0.1", port=self.port, user="root").close()
                return
            except MySQLdb.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mariadbd did not start:\n{self.log()}") from None
                time.sleep(0.05)

    def stop(self, *, crash: bool = False, timeout: float = 60) -> None:
        """SIGTERM (a clean shutdown) or SIGKILL (a crash); wait until it is gone."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGKILL if crash else signal.SIGTERM)
        self.proc.wait(timeout)

    def restart(self, *, crash: bool = False) -> None:
        self.stop(crash=crash)
        self.start()

    def log(self) -> str:
        path = self.directory / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        shutil.rmtree(self.directory, ignore_errors=True)
