"""A real live stream for tests and demos: Debian's `ffmpeg` serving a video file as
MPEG-TS over HTTP or TCP, pushing it over UDP, or writing an HLS playlist that a Python HTTP
server process serves, in real time (`-re`, looping), which a test can kill and restart on
the same port to simulate a camera dropping out.

Example:
    with LiveStreamServer("scene/cam0.mp4", protocol="http") as srv:
        src = open_source(srv.url, fps=5)   # http://127.0.0.1:PORT/live.ts
        srv.kill(); srv.start()             # camera down, then back on the same port

The server is `ffmpeg -re -stream_loop -1 -i VIDEO -c copy -f mpegts -listen 1 URL`: one
client per process (that is how FFmpeg's built-in listener works), so `start()` again after
a client went away. Readiness is checked by looking for the listening socket in
`/proc/net/tcp` rather than by connecting, since a probe connection would be the one client.
UDP has no listener on the sending side: `udp://127.0.0.1:PORT` is where ffmpeg sends and
the reader binds, so packets sent before the reader is up are lost, as with a real camera.
HLS: ffmpeg writes 1-second segments and a rolling playlist into a temporary folder and
`python -m http.server` serves it at `http://127.0.0.1:PORT/live.m3u8`; `kill()` stops the
writer (the playlist goes stale, as when an encoder dies) while the web server stays up.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
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
        protocol: "http" (`http://127.0.0.1:PORT/live.ts`), "tcp" (`tcp://127.0.0.1:PORT`),
            "udp" (`udp://127.0.0.1:PORT`, pushed) or "hls" (`http://127.0.0.1:PORT/live.m3u8`).
        port: Port to listen on (default: a free one), kept across restarts.
        realtime: Pace output at the video's frame rate (`-re`), as a camera would.
        loop: Loop the file forever.
    """

    def __init__(
        self,
        video: str | Path,
        *,
        protocol: Literal["http", "tcp", "udp", "hls"] = "http",
        port: int | None = None,
        realtime: bool = True,
        loop: bool = True,
    ) -> None:
        exe = shutil.which("ffmpeg")
        if exe is None:
            raise RuntimeError("ffmpeg is not installed; install Debian's ffmpeg package (apt-get install ffmpeg)")
        if protocol not in ("http", "tcp", "udp", "hls"):
            raise ValueError(f"protocol must be 'http', 'tcp', 'udp' or 'hls', got {protocol!r}")
        self.exe = exe
        self.video = Path(video)
        self.protocol = protocol
        self.port = port or free_port()
        self.realtime = realtime
        self.loop = loop
        self.proc: subprocess.Popen[bytes] | None = None
        self.web: subprocess.Popen[bytes] | None = None  # HLS only: the HTTP server process
        self.hls_dir: Path | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        """The URL a client opens."""
        if self.protocol == "http":
            return f"http://127.0.0.1:{self.port}/live.ts"
        if self.protocol == "hls":
            return f"http://127.0.0.1:{self.port}/live.m3u8"
        return f"{self.protocol}://127.0.0.1:{self.port}"

    def _output_args(self) -> list[str]:
        if self.protocol == "http":
            return ["-f", "mpegts", "-listen", "1", f"http://127.0.0.1:{self.port}/live.ts"]
        if self.protocol == "tcp":
            return ["-f", "mpegts", f"tcp://127.0.0.1:{self.port}?listen=1"]
        if self.protocol == "udp":
            return ["-f", "mpegts", f"udp://127.0.0.1:{self.port}?pkt_size=1316"]
        assert self.hls_dir is not None
        return ["-f", "hls", "-hls_time", "1", "-hls_list_size", "6", "-hls_flags", "delete_segments+omit_endlist",
                str(self.hls_dir / "live.m3u8")]

    def _start_web(self, timeout: float) -> None:
        """HLS: a real HTTP server process for the playlist folder (kept across restarts)."""
        if self.web is not None and self.web.poll() is None:
            return
        self.hls_dir = self.hls_dir or Path(tempfile.mkdtemp(prefix="streamvg-hls-"))
        self.web = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1", "--directory", str(self.hls_dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: is_listening(self.port), timeout=timeout, what=f"the HLS web server on port {self.port}")

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
        if self.protocol == "hls":
            self._start_web(timeout)
            for stale in self.hls_dir.glob("live*") if self.hls_dir else ():
                stale.unlink()  # a restarted encoder starts a new playlist
        args += ["-i", str(self.video), "-map", "0:v:0", "-c", "copy", *self._output_args()]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.starts += 1

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ffmpeg serving {self.video} exited with code {self.proc.returncode}")
            if self.protocol == "udp":
                return True  # nothing listens on the sending side
            if self.protocol == "hls":
                return self.hls_dir is not None and (self.hls_dir / "live.m3u8").is_file()
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

    def close(self) -> None:
        """Kill the stream and, for HLS, the web server and its folder."""
        self.kill()
        if self.web is not None:
            self.web.kill()
            self.web.wait(timeout=10)
            self.web = None
        if self.hls_dir is not None:
            shutil.rmtree(self.hls_dir, ignore_errors=True)
            self.hls_dir = None

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
