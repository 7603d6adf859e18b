"""Real servers for tests and benchmarks: a throw-away `redis-server` on a free port, and
`wait_until`, which waits on a condition with a timeout instead of sleeping blindly."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TypeVar

__all__ = ["RedisServer", "free_port", "wait_until"]

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    condition: Callable[[], T], *, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"
) -> T:
    """Poll `condition` until it returns a truthy value and return that value.

    Raises:
        TimeoutError: `condition` stayed falsy for `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


class RedisServer:
    """A private `redis-server` process that a test can kill and restart (no persistence,
    or with `persistent=True` an fsync-always append-only file that survives kill -9).

    Example:
        with RedisServer(password="pw") as srv:
            url = srv.url            # redis://:pw@127.0.0.1:PORT/0
            srv.kill(); srv.start()  # same port, empty data (persistent: same data)
    """

    def __init__(
        self, *, port: int | None = None, password: str | None = None, persistent: bool = False, persist: bool = False
    ) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed; install Debian's redis-server package")
        self.exe = exe
        self.port = port or free_port()
        self.password = password
        # persistent (or its alias persist): an append-only file synced on every write, so a
        # kill -9 and restart keeps every acknowledged write (as a production Redis with
        # appendfsync always); delivery tests count what reached Redis.
        self.persistent = persistent or persist
        self.persist = self.persistent
        self._dir = Path(tempfile.mkdtemp(prefix="streamvg-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                reply = s.recv(64)
                return reply.startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start (or restart) the server on the same port and wait until it answers."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        args = [
            self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes" if self.persistent else "no", "--dir", str(self._dir), "--daemonize", "no",
        ]
        if self.persistent:
            args += ["--appendfsync", "always"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._answers, timeout=timeout, what=f"redis-server on port {self.port}")
        return self

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would, and wait until it is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)
