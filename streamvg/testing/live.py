"""A real live stream for tests and demos: Debian's `ffmpeg` serving a video file as
MPEG-TS over HTTP or TCP in real time (`-re`, looping), which a test can kill and restart
on the same port to simulate a camera dropping out.

Example:
    with LiveStreamServer("scene/cam0.mp4", protocol="http") as srv:
        src = open_source(srv.url, fps=5)   # http://127.0.0.1:PORT/live.ts
        srv.kill(); srv.start()             # camera down, then back on the same port

The server is `ffmpeg -re -stream_loop -1 -i VIDEO -c copy -f mpegts -listen 1 URL`: one
client per process (that is how FFmpeg's built-in listener works), so `start()` again after
a client went away. Readiness is checked by looking for the listening socket in
`/proc/net/tcp` rather than by connecting, since a probe connection would be the one client.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Literal

from streamvg.testing.servers import free_port, wait_until

__all__ = ["LiveStreamServer", "is_listening"]


def is_listening(port: int, host: str = "127.0.0.1") -> bool:
    """True when a TCP socket listens on `host:port` (Linux `/proc/net/tcp`)."""
    want_port = f"{port:04X}"
    octets = host.split(".")
    want_host = "".join(f"{int(o):02X}" for o in reversed(octets))
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        parts = line.split()
        if len(parts) < 4:
            continue
        local, state = parts[1], parts[3]
        addr, _, p = local.partition(":")
        if p == want_port and state == "0A" and addr in (want_host, "00000000"):
            return True
    return False


class LiveStreamServer:
    """`ffmpeg` serving `video` as a live MPEG-TS stream on 127.0.0.1.

    Args:
        video: The file to serve (H.264 in MP4 is copied without re-encoding).
        protocol: "http" (`http://127.0.0.1:PORT/live.ts`) or "tcp" (`tcp://127.0.0.1:PORT`).
        port: Port to listen on (default: a free one), kept across restarts.
        realtime: Pace output at the video's frame rate (`-re`), as a camera would.
        loop: Loop the file forever.
    """

    def __init__(
        self,
        video: str | Path,
        *,
        protocol: Literal["http", "tcp"] = "http",
        port: int | None = None,
        realtime: bool = True,
        loop: bool = True,
    ) -> None:
        exe = shutil.which("ffmpeg")
        if exe is None:
            raise RuntimeError("ffmpeg is not installed; install Debian's ffmpeg package (apt-get install ffmpeg)")
        if protocol not in ("http", "tcp"):
            raise ValueError(f"protocol must be 'http' or 'tcp', got {protocol!r}")
        self.exe = exe
        self.video = Path(video)
        self.protocol = protocol
        self.port = port or free_port()
        self.realtime = realtime
        self.loop = loop
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        """The URL a client opens."""
        if self.protocol == "http":
            return f"http://127.0.0.1:{self.port}/live.ts"
        return f"tcp://127.0.0.1:{self.port}"

    def _listen_url(self) -> str:
        if self.protocol == "http":
            return f"http://127.0.0.1:{self.port}/live.ts"
        return f"tcp://127.0.0.1:{self.port}?listen=1"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> LiveStreamServer:
        """Start (or restart) serving on the same port; returns once it listens."""
        if self.running:
            return self
        args = [self.exe, "-hide_banner", "-nostdin", "-loglevel", "error"]
        if self.realtime:
            args.append("-re")
        if self.loop:
            args += ["-stream_loop", "-1"]
        args += ["-i", str(self.video), "-map", "0:v:0", "-c", "copy", "-f", "mpegts"]
        if self.protocol == "http":
            args += ["-listen", "1"]
        args.append(self._listen_url())
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.starts += 1

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ffmpeg serving {self.video} exited with code {self.proc.returncode}")
            return is_listening(self.port)

        wait_until(up, timeout=timeout, what=f"ffmpeg listening on port {self.port}")
        return self

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a camera losing power would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self, timeout: float = 10.0) -> LiveStreamServer:
        """Kill and start again on the same port."""
        self.kill()
        return self.start(timeout)

    def __enter__(self) -> LiveStreamServer:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()
