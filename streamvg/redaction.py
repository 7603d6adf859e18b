"""Masking of credentials in URLs, so passwords never reach logs, events or errors."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

__all__ = ["mask_text", "mask_url"]

MASK = "***"

# scheme://user:password@host  or  scheme://:password@host  or  scheme://password@host (redis)
_CRED_RE = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]*)(?::(?P<pw>[^@/\s]*))?@")


def mask_url(url: str) -> str:
    """Return `url` with its password replaced by `***` (the user name is kept).

    Example:
        >>> mask_url("rtsp://admin:hunter2@10.0.0.5:554/stream1")
        'rtsp://admin:***@10.0.0.5:554/stream1'
        >>> mask_url("redis://:s3cret@localhost:6379/0")
        'redis://:***@localhost:6379/0'
        >>> mask_url("/videos/a.mp4")
        '/videos/a.mp4'
    """
    if "://" not in url or "@" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return mask_text(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    if parts.password is not None:
        netloc = f"{user}:{MASK}@{host}"
    elif url.startswith(("redis://", "rediss://")):
        # redis-py reads "redis://secret@host" as a password-only URL.
        netloc = f"{MASK}@{host}"
    else:
        netloc = f"{user}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def mask_text(text: str) -> str:
    """Mask every `scheme://user:password@` credential inside free text (log lines, errors).

    Example:
        >>> mask_text("cannot open rtsp://u:pw@cam/1: timeout")
        'cannot open rtsp://u:***@cam/1: timeout'
    """

    def _sub(m: re.Match[str]) -> str:
        if m.group("pw") is None:
            if m.group("scheme").startswith(("redis", "rediss")) and m.group("user"):
                return f"{m.group('scheme')}{MASK}@"
            return m.group(0)
        return f"{m.group('scheme')}{m.group('user')}:{MASK}@"

    return _CRED_RE.sub(_sub, text)
