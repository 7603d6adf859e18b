"""A real RTSP camera for tests and demos: GStreamer's RTSP server (Debian's
`gir1.2-gst-rtsp-server-1.0`, `python3-gi`, `gstreamer1.0-plugins-good` and `-bad`) serving
an H.264 MP4 as RTP over RTSP in real time, optionally behind a username and password, in
a process a test can kill and restart on the same port to simulate a camera dropping out.

Example:
    with RtspStreamServer("scene/cam0.mp4", user="viewer", password="s3cret") as srv:
        src = open_source(srv.url, fps=5)   # rtsp://viewer:s3cret@127.0.0.1:PORT/stream
        srv.kill(); srv.start()             # camera down, then back on the same port

The server runs in the system Python (`/usr/bin/python3`, where Debian's GObject bindings
live; override with `STREAMVG_GST_PYTHON`), not in the test's interpreter. Each client gets
its own pipeline, so a reconnecting client plays the file from its start again, as a camera
restarting its encoder would; the file is not looped, so give it the length the test needs.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

from streamvg.testing.live import is_listening
from streamvg.testing.servers import free_port, wait_until

__all__ = ["RtspStreamServer", "rtsp_server_available"]

_SERVER_SCRIPT = r"""
import sys
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer

video, port, path, user, password = sys.argv[1:6]
Gst.init(None)
server = GstRtspServer.RTSPServer()
server.set_address("127.0.0.1")
server.set_service(port)
factory = GstRtspServer.RTSPMediaFactory()
factory.set_launch(
    f'( filesrc location="{video}" ! qtdemux ! h264parse config-interval=-1 '
    "! rtph264pay name=pay0 pt=96 config-interval=-1 )"
)
if user:
    auth = GstRtspServer.RTSPAuth()
    token = GstRtspServer.RTSPToken()
    token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, "viewer")
    auth.add_basic(GstRtspServer.RTSPAuth.make_basic(user, password), token)
    server.set_auth(auth)
    permissions = GstRtspServer.RTSPPermissions()
    permissions.add_role_from_structure(Gst.Structure.new_from_string(
        "viewer, media.factory.access=(boolean)true, media.factory.construct=(boolean)true"))
    factory.set_permissions(permissions)
server.get_mount_points().add_factory("/" + path, factory)
if server.attach(None) == 0:
    sys.exit(f"cannot listen on port {port}")
GLib.MainLoop().run()
"""

_CHECK_SCRIPT = """
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import Gst, GstRtspServer
Gst.init(None)
missing = [e for e in ("filesrc", "qtdemux", "h264parse", "rtph264pay") if Gst.ElementFactory.find(e) is None]
if missing:
    raise SystemExit("missing GStreamer elements: " + ", ".join(missing))
"""


def _python() -> str:
    return os.environ.get("STREAMVG_GST_PYTHON", "/usr/bin/python3")


def rtsp_server_available() -> str | None:
    """None when the GStreamer RTSP server can run here, else what is missing (one sentence)."""
    try:
        out = subprocess.run([_python(), "-c", _CHECK_SCRIPT], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {_python()}: {exc}"
    if out.returncode != 0:
        why = (out.stderr.strip().splitlines() or [out.stdout.strip() or "unknown error"])[-1]
        return (f"GStreamer's RTSP server is not usable from {_python()} ({why}); install Debian's "
                "gir1.2-gst-rtsp-server-1.0 python3-gi gstreamer1.0-plugins-good gstreamer1.0-plugins-bad")
    return None


class RtspStreamServer:
    """One RTSP camera serving `video` (H.264 in MP4) at `rtsp://127.0.0.1:PORT/PATH`.

    Args:
        video: The file to serve (its H.264 is sent as it is, in real time).
        port: Port to listen on (default: a free one), kept across restarts.
        path: The stream's path in the URL.
        user, password: When given, clients must authenticate (RTSP basic auth).
    """

    def __init__(
        self,
        video: str | Path,
        *,
        port: int | None = None,
        path: str = "stream",
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        self.video = Path(video).resolve()
        self.port = port or free_port()
        self.path = path
        self.user, self.password = user, password
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def url_with(self, user: str | None, password: str | None) -> str:
        """The stream's URL with these credentials (for testing wrong ones)."""
        cred = f"{quote(user, safe='')}:{quote(password or '', safe='')}@" if user else ""
        return f"rtsp://{cred}127.0.0.1:{self.port}/{self.path}"

    @property
    def url(self) -> str:
        """The URL a client opens (with the server's credentials, if any)."""
        return self.url_with(self.user, self.password)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 20.0) -> RtspStreamServer:
        """Start (or restart) serving on the same port; returns once it listens."""
        if self.running:
            return self
        args = [_python(), "-c", _SERVER_SCRIPT, str(self.video), str(self.port), self.path,
                self.user or "", self.password or ""]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.starts += 1

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"the RTSP server for {self.video} exited ({self.proc.returncode}): {err[-500:]}")
            return is_listening(self.port)

        wait_until(up, timeout=timeout, what=f"the RTSP server listening on port {self.port}")
        return self

    def kill(self) -> None:
        """Kill the server at once (SIGKILL), as a camera losing power would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def restart(self, timeout: float = 20.0) -> RtspStreamServer:
        """Kill and start again on the same port."""
        self.kill()
        return self.start(timeout)

    def __enter__(self) -> RtspStreamServer:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()
