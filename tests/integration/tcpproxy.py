"""A TCP proxy for fault tests: put it between a worker and PostgreSQL, then misbehave.

Faults, switched at run time:
- ``latency``: seconds added before forwarding each chunk, both ways;
- ``blackhole()``: stop forwarding (connections stay open, bytes wait), ``heal()`` resumes;
- ``reset()``: close every open connection with a TCP RST;
- ``cut_after(pattern)``: when ``pattern`` passes from client to server, forward it, then
  close the client's connection before the server's answer reaches it (a COMMIT that
  commits, but whose reply never arrives).
Loopback only; every connection and thread ends with :meth:`close`.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time


class TcpProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.latency = 0.0
        self.cuts = 0  # connections cut after the pattern, so far
        self.resets = 0  # open connections reset, so far
        self._flowing = threading.Event()
        self._flowing.set()
        self._cut_pattern: bytes | None = None
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                closed = self._closed  # close() ran while this one connected: end it
                if not closed:
                    self._pairs.append((client, server))
            if closed:
                _rst(client)
                _rst(server)
                return
            muted = threading.Event()  # set: the server's answers are dropped
            for args in ((client, server, True, muted), (server, client, False, muted)):
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    def _pump(
        self, source: socket.socket, target: socket.socket, upstream: bool, muted: threading.Event
    ) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                self._flowing.wait()
                if self.latency:
                    time.sleep(self.latency)
                if not upstream and muted.is_set():
                    continue
                pattern = self._cut_pattern
                cut = upstream and pattern is not None and pattern in data
                if cut:
                    with self._lock:
                        self._cut_pattern = None
                        self.cuts += 1
                    muted.set()  # before the server can answer
                target.sendall(data)
                if cut:
                    time.sleep(0.05)  # let the server act on it before the cut
                    _rst(source)  # the client never sees the answer
                    break
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.close()

    def blackhole(self) -> None:
        self._flowing.clear()

    def heal(self) -> None:
        self.latency = 0.0
        self._flowing.set()

    def cut_after(self, pattern: bytes) -> None:
        self._cut_pattern = pattern

    def reset(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
            self.resets += len(pairs)
        for client, server in pairs:
            _rst(client)
            _rst(server)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.heal()
        self.reset()
        self.listener.close()


def _rst(sock: socket.socket) -> None:
    # close() alone neither wakes a pump thread blocked in recv() on this socket nor
    # releases it (the blocked call holds it open), so the peers would see nothing at all:
    # shutdown() wakes the pumps and ends the connection; linger 0 makes the end an RST.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
