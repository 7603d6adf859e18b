"""Masking of credentials in URLs, so passwords never reach logs, events or errors.

Two layers, both linear in the text's length:

* **By shape.** In `scheme://user:password@host…` the password may hold any character,
  `/ # ? @ % :` included (people paste them unencoded), so a URL parser cannot find where
  it ends. Here the credentials run from `://` to the **last** `@` of the URL (a URL ends
  at whitespace or a quote in free text): nothing of a password can stay visible, and
  the price is masking too much when a path itself holds an `@`.
* **By value.** Passwords of the URLs a pipeline is configured with are remembered
  (`remember_url_secret`, called when a pipeline file is validated and when a Redis
  client is made) and masked wherever they appear: inside a URL cut short by a space or
  a quote in the password, percent-encoded or decoded, alone in a library's message.
  Secrets shorter than 4 characters are not remembered (they would mask ordinary words).
"""

from __future__ import annotations

import re
import threading
from urllib.parse import quote, unquote

__all__ = ["MASK", "mask_text", "mask_url", "remember_secret", "remember_url_secret"]

MASK = "***"
_MIN_SECRET = 4

# One URL in free text: a scheme that does not continue a word, "://", then everything up
# to whitespace or a quote. No part can backtrack (the scheme is anchored by the
# lookbehind, the rest is one greedy class with nothing after it), and each match consumes
# its URL, so a search over any text is linear; the quadratic `[^@]*@`-style patterns
# (a hostile 80 k characters took 9 s) are gone.
_URL_RE = re.compile(r"(?<![A-Za-z0-9+.\-])[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]*")

_secrets: set[str] = set()
_secrets_lock = threading.Lock()
_secrets_sorted: tuple[str, ...] = ()  # longest first, so a secret inside another is masked whole


def remember_secret(secret: str) -> None:
    """Mask `secret` (and its percent-encoded / decoded forms) in all later output."""
    global _secrets_sorted
    forms = {secret, quote(secret, safe=""), unquote(secret)}
    with _secrets_lock:
        _secrets.update(f for f in forms if len(f) >= _MIN_SECRET)
        _secrets_sorted = tuple(sorted(_secrets, key=len, reverse=True))


def remember_url_secret(url: str) -> None:
    """Remember the password of `url` (see `remember_secret`); URLs without one are ignored."""
    split = _split_credentials(url, 0, len(url))
    if split is None:
        return
    _scheme_end, user_end, at = split
    if user_end < at:  # user:password
        remember_secret(url[user_end + 1 : at])
    elif url.startswith(("redis://", "rediss://")):  # redis://password@host
        remember_secret(url[url.index("://") + 3 : at])


def _split_credentials(text: str, start: int, end: int) -> tuple[int, int, int] | None:
    """For the URL text[start:end] (starting with `scheme://`): (index after `://`, index
    of the ':' ending the user name, or the '@' if there is none, index of the last '@'),
    or None without credentials."""
    sep = text.find("://", start, end)
    if sep < 0:
        return None
    auth = sep + 3
    at = text.rfind("@", auth, end)
    if at < 0:
        return None
    colon = text.find(":", auth, at)
    return auth, (colon if colon >= 0 else at), at


def _mask_one(text: str, start: int, end: int, out: list[str]) -> None:
    """Append text[start:end] (one URL) to `out`, its credentials masked."""
    split = _split_credentials(text, start, end)
    if split is None:
        out.append(text[start:end])
        return
    auth, user_end, at = split
    if user_end < at:
        out.append(text[start : user_end + 1])
        out.append(MASK)
        out.append(text[at:end])
    elif text.startswith(("redis", "rediss"), start) and text[start:auth].lower() in ("redis://", "rediss://"):
        # redis-py reads "redis://secret@host" as a password-only URL.
        out.append(text[start:auth])
        out.append(MASK)
        out.append(text[at:end])
    else:
        out.append(text[start:end])


def _mask_known(text: str) -> str:
    for s in _secrets_sorted:
        if s in text:
            text = text.replace(s, MASK)
    return text


def mask_url(url: str) -> str:
    """Return `url` with its password replaced by `***` (the user name is kept).

    Example:
        >>> mask_url("rtsp://admin:hunter2@10.0.0.5:554/stream1")
        'rtsp://admin:***@10.0.0.5:554/stream1'
        >>> mask_url("rtsp://viewer:Sl/ash#9?@x@10.0.0.5/s")
        'rtsp://viewer:***@10.0.0.5/s'
        >>> mask_url("redis://:s3cret@localhost:6379/0")
        'redis://:***@localhost:6379/0'
        >>> mask_url("/videos/a.mp4")
        '/videos/a.mp4'
    """
    if "://" not in url or "@" not in url:
        return _mask_known(url)
    out: list[str] = []
    _mask_one(url, 0, len(url), out)
    return _mask_known("".join(out))


def _mask_match(m: re.Match[str]) -> str:
    # The hot path of `mask_text` (once per URL in the text): plain str methods only.
    url = m[0]
    at = url.rfind("@")
    if at < 0:
        return url
    auth = url.find("://") + 3
    colon = url.find(":", auth, at)
    if colon >= 0:
        return url[: colon + 1] + MASK + url[at:]
    if url[:auth].lower() in ("redis://", "rediss://"):
        return url[:auth] + MASK + url[at:]
    return url


def mask_text(text: str) -> str:
    """Mask every `scheme://user:password@` credential inside free text (log lines, errors),
    and every remembered secret. Linear in `len(text)`.

    Example:
        >>> mask_text("cannot open rtsp://u:pw@cam/1: timeout")
        'cannot open rtsp://u:***@cam/1: timeout'
    """
    if "@" in text and "://" in text:
        text = _URL_RE.sub(_mask_match, text)
    return _mask_known(text)
