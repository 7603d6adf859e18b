"""A private Mosquitto broker on a free port that a test can kill and restart, optionally
with a password file, and a small QoS-1 subscriber that collects what arrives."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

from streamvg.testing.servers import free_port, wait_until

__all__ = ["MosquittoServer", "Subscriber", "mosquitto_answers"]


def mosquitto_answers(host: str = "127.0.0.1", port: int = 1883) -> bool:
    """Whether something accepts TCP connections at host:port (a broker, presumably)."""
    try:
        with socket.create_connection((host, port), timeout=0.3):
            return True
    except OSError:
        return False


class MosquittoServer:
    """A `mosquitto` process on 127.0.0.1 (persistence on, so a subscriber's QoS-1 session
    survives a restart once saved with `save()`).

    Example:
        with MosquittoServer(users={"ha": "pw"}) as srv:
            srv.url("ha", "pw")    # mqtt://ha:pw@127.0.0.1:PORT
            srv.kill(); srv.start()
    """

    def __init__(self, *, port: int | None = None, users: dict[str, str] | None = None) -> None:
        exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
        if exe is None:
            raise RuntimeError("mosquitto is not installed; install Debian's mosquitto package")
        self.exe = exe
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="streamvg-mosquitto-"))
        # Started as root, mosquitto drops to its own user: it must still write its database
        # and read the password file here.
        self.dir.chmod(0o777)
        lines = [
            f"listener {self.port} 127.0.0.1", "persistence true", f"persistence_location {self.dir}/",
            "autosave_interval 0", "max_queued_messages 0", "max_inflight_messages 0", "log_dest none",
        ]
        if users:
            pw = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
            pwfile = self.dir / "passwords"
            for i, (user, password) in enumerate(users.items()):
                flags = ["-b", "-c"] if i == 0 else ["-b"]
                subprocess.run([pw, *flags, str(pwfile), user, password], check=True, capture_output=True, timeout=30)
            pwfile.chmod(0o644)
            lines += ["allow_anonymous false", f"password_file {pwfile}"]
        else:
            lines.append("allow_anonymous true")
        self.config = self.dir / "mosquitto.conf"
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, user: str | None = None, password: str | None = None) -> str:
        auth = f"{user}:{password}@" if user is not None else ""
        return f"mqtt://{auth}127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> MosquittoServer:
        """Start (or restart) the broker on the same port and wait until it accepts connections."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.proc = subprocess.Popen([self.exe, "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: mosquitto_answers(port=self.port), timeout=timeout, what=f"mosquitto on port {self.port}")
        return self

    def save(self, timeout: float = 10.0) -> None:
        """Write the persistence database now (SIGUSR1) and wait until it is on disk."""
        assert self.proc is not None
        db = self.dir / "mosquitto.db"
        before = db.stat().st_mtime_ns if db.exists() else 0
        self.proc.send_signal(signal.SIGUSR1)
        wait_until(lambda: db.exists() and db.stat().st_mtime_ns != before, timeout=timeout, what="mosquitto.db")

    def kill(self) -> None:
        """Kill the broker at once (SIGKILL), as a crash would, and wait until it is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> MosquittoServer:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class Subscriber:
    """A paho subscriber at QoS 1 on a background thread, reconnecting by itself; `messages`
    holds every payload received, duplicates included, in arrival order.

    Args:
        persistent: A fixed client id with a persistent session (clean_session=False), so
            the broker queues messages for it while it is disconnected.
    """

    def __init__(self, host: str, port: int, topic: str, *, persistent: bool = False, client_id: str | None = None) -> None:
        import paho.mqtt.client as paho

        self.topic = topic
        self.messages: list[bytes] = []
        self.subscribed = threading.Event()
        self._lock = threading.Lock()
        self.client = paho.Client(
            callback_api_version=paho.CallbackAPIVersion.VERSION2, client_id=client_id or "",
            clean_session=not persistent,
        )
        self.client.reconnect_delay_set(1, 2)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port, keepalive=10)
        self.client.loop_start()
        wait_until(self.subscribed.is_set, timeout=10, what=f"subscription to {topic}")

    def _on_connect(self, client: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not getattr(reason, "is_failure", False):
            client.subscribe(self.topic, qos=1)

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        with self._lock:
            self.messages.append(bytes(msg.payload))

    def received(self) -> list[bytes]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
