"""The `openai` engine: grounding through a remote OpenAI-compatible chat endpoint.

vLLM, SGLang and TensorRT-LLM's `trtllm-serve` all serve Qwen2-VL / Qwen2.5-VL behind
`POST {base_url}/chat/completions`. This engine sends each window as one user message,
the frames as base64 JPEG `image_url` parts in order (first, and byte-identical for every
query of the window: one JPEG per frame, cached, so the server's automatic prefix cache
serves the images' tokens to every query after the first), followed by the same question text
the transformers engine uses (`streamvg.grounding.prompts`), and reads the answer with the
same parser (`streamvg.grounding.answers.parse_answer`), so both engines give the same boxes
for the same model answer.

Coordinates: the server's image processor resizes every image with Qwen's `smart_resize`
(sides multiples of 28, pixel count within its min/max pixels) and Qwen2.5-VL answers in
pixels of that resized image. The engine therefore resizes each frame itself with
`smart_resize` and `engine.min_pixels` / `engine.max_pixels` before sending it: an image
whose sides are already multiples of 28 and whose area lies within the server's own limits
passes through the server's resize unchanged, so the input size is known exactly and boxes
map back to original-frame pixels. (Keep the server's `max_pixels` at or above
`engine.max_pixels`; vLLM's default for Qwen2.5-VL is far above.) Qwen2-VL answers in
0–1000 relative to each image, which needs no input size.

Transport is the standard library (`http.client`), one keep-alive connection per worker
thread:

```
ground_many(requests) ──▶ thread pool (engine.concurrency) ──▶ POST /chat/completions
                                 │  per attempt: timeout engine.timeout_s
                                 │  HTTP 5xx / 408 / 409 / 429, timeouts, refused or dropped
                                 │  connections: retry up to engine.retries times, backoff
                                 │  0.5 s · 2^n (jittered, capped at 8 s, Retry-After honoured)
                                 ▼
                         parse_answer(text, frame_sizes, input_sizes, convention)
```

Failures become one `GroundingError` sentence naming the server by its masked URL; the
API key is sent only in the `Authorization` header and never appears in a log or an error.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import math
import random
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import cv2
import numpy as np

from streamvg.errors import ConfigError, GroundingError
from streamvg.grounding import EngineStats, Grounding
from streamvg.grounding.answers import parse_answer_full
from streamvg.grounding.prompts import build_messages
from streamvg.redaction import mask_text, mask_url
from streamvg.types import Frame, Query, Window

if TYPE_CHECKING:
    from streamvg.config import EngineConfig

__all__ = [
    "OpenAIEngine",
    "create_openai_engine",
    "create_remote_engine",
    "resolve_convention",
    "smart_resize",
]

log = logging.getLogger(__name__)

Convention = Literal["qwen2_vl", "qwen2_5_vl"]

#: Side multiple of Qwen2-VL / Qwen2.5-VL inputs: patch 14 × spatial merge 2.
IMAGE_FACTOR = 28
#: Statuses worth another try: the server is overloaded, restarting or briefly broken.
RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})
_BACKOFF_BASE_S = 0.5
_BACKOFF_MAX_S = 8.0


def smart_resize(
    height: int, width: int, *, factor: int = IMAGE_FACTOR, min_pixels: int = 56 * 56, max_pixels: int = 448 * 448
) -> tuple[int, int]:
    """`(height, width)` Qwen2-VL's image processor resizes an image to.

    A twin of `transformers.models.qwen2_vl.image_processing_qwen2_vl.smart_resize`
    (checked equal in the tests), kept here so a remote engine need not import torch:
    both sides become multiples of `factor`, the area stays within `[min_pixels,
    max_pixels]` and the aspect ratio is kept as closely as possible.

    Example:
        >>> smart_resize(720, 1280, min_pixels=56 * 56, max_pixels=448 * 448)
        (336, 588)
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio of a {width}x{height} image is above 200; Qwen2-VL cannot take it")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resolve_convention(convention: str, model: str | None) -> Convention:
    """The box convention of a remote model.

    `convention` wins unless it is `auto`; then a local model directory's `config.json`
    (`model_type`) decides, else the model id's name (`…Qwen2.5-VL…` or `…Qwen2-VL…`).

    Raises:
        ConfigError: `auto` and neither tells; the message says to set `engine.convention`.
    """
    if convention in ("qwen2_vl", "qwen2_5_vl"):
        return convention  # type: ignore[return-value]
    if model:
        cfg_file = Path(model) / "config.json"
        if cfg_file.is_file():
            try:
                model_type = str(json.loads(cfg_file.read_text(encoding="utf-8")).get("model_type", ""))
            except (OSError, ValueError):
                model_type = ""
            if model_type in ("qwen2_vl", "qwen2_5_vl"):
                return model_type  # type: ignore[return-value]
        name = model.lower().replace("_", "-").replace(" ", "-")
        if any(tag in name for tag in ("qwen2.5-vl", "qwen2-5-vl", "qwen2.5vl", "qwen25-vl", "qwen25vl")):
            return "qwen2_5_vl"
        if any(tag in name for tag in ("qwen2-vl", "qwen2vl")):
            return "qwen2_vl"
    raise ConfigError(
        f"engine.convention: cannot tell whether remote model {model or '(unnamed)'!r} answers like "
        "Qwen2-VL or Qwen2.5-VL; set engine.convention to qwen2_vl or qwen2_5_vl",
        field="engine.convention",
    )


class _RetryableError(Exception):
    """One failed attempt that another attempt may fix (internal)."""

    def __init__(self, reason: str, *, kind: Literal["timeout", "connect", "status"], retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.retry_after_s = retry_after_s


class _Client:
    """JSON over HTTP(S) to one base URL: keep-alive connection per thread, bounded retries."""

    def __init__(self, base_url: str, *, api_key: str | None, timeout_s: float, retries: int) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"engine.base_url: {mask_url(base_url)!r} is not an http(s) URL; give e.g. http://localhost:8000/v1",
                field="engine.base_url",
            )
        self.masked_url = mask_url(base_url).rstrip("/")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port
        self.prefix = parts.path.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        self._api_key = api_key
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()

    # --- connections -------------------------------------------------------------

    def _conn(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self.scheme == "https":
                conn = http.client.HTTPSConnection(
                    self.host, self.port, timeout=self.timeout_s, context=ssl.create_default_context()
                )
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _drop_conn(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
            with self._lock:
                if conn in self._all:
                    self._all.remove(conn)

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            conns, self._all = self._all, []
        for c in conns:
            c.close()

    # --- requests ----------------------------------------------------------------

    def _attempt(self, method: str, path: str, payload: bytes | None) -> tuple[int, dict[str, str], bytes]:
        """One HTTP exchange within `timeout_s` in all (connect, send, wait, read)."""
        deadline = time.monotonic() + self.timeout_s
        conn = self._conn()
        reused = conn.sock is not None
        try:
            conn.request(method, self.prefix + path, body=payload, headers=self._headers)
            if conn.sock is not None:
                conn.sock.settimeout(max(0.001, deadline - time.monotonic()))
            resp = conn.getresponse()
            chunks: list[bytes] = []
            while True:
                if conn.sock is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError("read timed out")
                    conn.sock.settimeout(remaining)
                chunk = resp.read(65536)
                if not chunk:
                    break
                chunks.append(chunk)
            headers = {k.lower(): v for k, v in resp.getheaders()}
            if resp.will_close:
                self._drop_conn()
            return resp.status, headers, b"".join(chunks)
        except TimeoutError as exc:
            self._drop_conn()
            raise _RetryableError(f"no answer within {self.timeout_s:g} s", kind="timeout") from exc
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
            self._drop_conn()
            if reused:  # the server closed an idle keep-alive connection: reconnect at once
                return self._attempt(method, path, payload)
            raise _RetryableError("the server closed the connection", kind="connect") from exc
        except (ConnectionError, http.client.HTTPException, OSError) as exc:
            self._drop_conn()
            reason = type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {exc}"
            raise _RetryableError(mask_text(reason), kind="connect") from exc

    def request_json(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send `body` as JSON and return the JSON answer, retrying what can be retried.

        Raises:
            GroundingError: the server is unreachable, timed out or kept failing after
                `retries` retries, refused the request (4xx), or answered non-JSON.
        """
        payload = json.dumps(body).encode() if body is not None else None
        attempts = self.retries + 1
        last: _RetryableError | None = None
        for attempt in range(attempts):
            if self._closed.is_set():
                raise GroundingError(f"the openai engine for {self.masked_url} was closed while a request was pending")
            try:
                status, headers, data = self._attempt(method, path, payload)
            except _RetryableError as exc:
                last = exc
            else:
                if status < 300:
                    try:
                        answer = json.loads(data)
                    except ValueError as exc:
                        raise GroundingError(
                            f"OpenAI-compatible server at {self.masked_url} answered {path} with HTTP {status} "
                            "but not JSON; check that engine.base_url points at the API (usually ending in /v1)"
                        ) from exc
                    if not isinstance(answer, dict):
                        raise GroundingError(
                            f"OpenAI-compatible server at {self.masked_url} answered {path} with JSON that is not "
                            "an object; check that engine.base_url points at an OpenAI-compatible API"
                        )
                    return answer
                message = _server_message(data, secret=self._api_key)
                if status in RETRY_STATUSES:
                    last = _RetryableError(
                        f"HTTP {status}{': ' + message if message else ''}",
                        kind="status",
                        retry_after_s=_retry_after(headers.get("retry-after")),
                    )
                else:
                    raise GroundingError(_refusal(self.masked_url, path, status, message))
            if attempt + 1 < attempts:
                delay = min(_BACKOFF_MAX_S, _BACKOFF_BASE_S * 2**attempt) * random.uniform(0.5, 1.0)
                if last.retry_after_s is not None:
                    delay = min(_BACKOFF_MAX_S, max(delay, last.retry_after_s))
                log.warning(
                    "openai engine: %s%s failed (%s); retry %d of %d in %.1f s",
                    self.masked_url, path, last.reason, attempt + 1, self.retries, delay,
                )
                if self._closed.wait(delay):
                    raise GroundingError(f"the openai engine for {self.masked_url} was closed while a request was pending")
        assert last is not None
        tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
        if last.kind == "connect":
            raise GroundingError(
                f"OpenAI-compatible server at {self.masked_url} is unreachable ({last.reason}, {tries}); "
                "check engine.base_url and that the server is running"
            )
        if last.kind == "timeout":
            raise GroundingError(
                f"OpenAI-compatible server at {self.masked_url} did not answer within {self.timeout_s:g} s "
                f"({tries}); raise engine.timeout_s or lower the load on the server"
            )
        raise GroundingError(
            f"OpenAI-compatible server at {self.masked_url} kept failing ({last.reason}, {tries}); "
            "check the server's log"
        )


def _server_message(data: bytes, *, secret: str | None = None) -> str:
    """The `error.message` of an OpenAI-style error body (or its text), short and masked
    (URL passwords, and the API key should a server echo it)."""
    text = data.decode("utf-8", "replace").strip()
    try:
        obj = json.loads(text)
        if isinstance(obj, dict):
            err = obj.get("error", obj)
            if isinstance(err, dict):
                text = str(err.get("message") or err.get("detail") or text)
            elif isinstance(err, str):
                text = err
            elif "detail" in obj:
                text = str(obj["detail"])
    except ValueError:
        pass
    if secret:
        text = text.replace(secret, "***")
    text = " ".join(mask_text(text).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _refusal(url: str, path: str, status: int, message: str) -> str:
    said = f" ({message})" if message else ""
    if status in (401, 403):
        return (
            f"OpenAI-compatible server at {url} refused the API key with HTTP {status}{said}; set "
            "engine.api_key (or STREAMVG_ENGINE__API_KEY) to a key the server accepts"
        )
    if status == 404:
        return (
            f"OpenAI-compatible server at {url} answered HTTP 404 for {path}{said}; check that engine.base_url "
            "ends in /v1 and that engine.model names a model the server serves"
        )
    return (
        f"OpenAI-compatible server at {url} rejected the request with HTTP {status}{said}; if it is about the "
        "number of images, start the server with room for window_size images per prompt "
        "(vLLM: --limit-mm-per-prompt)"
    )


class _JpegCache:
    """Recently encoded frames (resized JPEG data URLs), shared by overlapping windows and
    by the queries asked of one window."""

    def __init__(self, capacity: int = 128) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[Any, ...], str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[Any, ...]) -> str | None:
        with self._lock:
            url = self._items.get(key)
            if url is not None:
                self._items.move_to_end(key)
            return url

    def put(self, key: tuple[Any, ...], url: str) -> None:
        with self._lock:
            self._items[key] = url
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


class OpenAIEngine:
    """Grounding engine backed by a remote OpenAI-compatible chat-completions server.

    Args:
        base_url: API root, e.g. `http://vllm:8000/v1` (`/chat/completions` is appended).
        model: Model id the server serves (`--served-model-name`); `None` asks the server's
            `GET /models` once and takes the first.
        api_key: Sent as `Authorization: Bearer …`; never logged.
        convention: `qwen2_vl`, `qwen2_5_vl`, or `auto` (from the model id or a local
            directory's `config.json`; see `resolve_convention`).
        min_pixels: Smallest image area sent, in pixels (smart_resize bound).
        max_pixels: Largest image area sent, in pixels; larger frames are shrunk. More
            pixels find smaller objects but cost the server more visual tokens.
        max_new_tokens: Answer length cap (`max_tokens`).
        timeout_s: Limit for one attempt (connect, send, wait for the answer, read), seconds.
        retries: Further attempts after HTTP 5xx/408/409/429, a timeout or a dropped
            connection; each waits 0.5 s · 2^n (jittered, ≤ 8 s). More retries ride out a
            restarting server but hold a window longer.
        concurrency: Requests in flight at once; a batching server (vLLM) serves several
            together, so more keeps it busy at the cost of server memory.
        jpeg_quality: JPEG quality 1–100 of the images sent.
        temperature: Sampling temperature; 0 answers deterministically.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        convention: str = "auto",
        min_pixels: int = 56 * 56,
        max_pixels: int = 448 * 448,
        max_new_tokens: int = 256,
        timeout_s: float = 60.0,
        retries: int = 3,
        concurrency: int = 4,
        jpeg_quality: int = 90,
        temperature: float = 0.0,
    ) -> None:
        if min_pixels > max_pixels:
            raise ConfigError(f"engine.min_pixels ({min_pixels}) is larger than engine.max_pixels ({max_pixels})")
        if not 1 <= jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be within 1..100, got {jpeg_quality}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self._client = _Client(base_url, api_key=api_key, timeout_s=timeout_s, retries=retries)
        self.base_url = self._client.masked_url
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.max_new_tokens = max_new_tokens
        self.jpeg_quality = jpeg_quality
        self.temperature = temperature
        self.concurrency = concurrency
        try:
            self.model = model if model else self._served_model()
            self.convention: Convention = resolve_convention(convention, self.model)
        except BaseException:
            self._client.close()
            raise
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="streamvg-openai")
        self._jpegs = _JpegCache()
        self._closed = False
        self.stats = EngineStats()
        self._stats_lock = threading.Lock()

    # --- public ------------------------------------------------------------------

    def ground(self, windows: Sequence[Window], query: Query) -> list[Grounding]:
        """Ground `query` in each window; one `Grounding` per window, same order."""
        return self.ground_many([(w, query) for w in windows])

    def ground_many(self, requests: Sequence[tuple[Window, Query]]) -> list[Grounding]:
        """Ground mixed (window, query) pairs, up to `concurrency` requests in flight.

        Raises:
            GroundingError: a request failed for good (see `OpenAIEngine`); the requests
                still queued are cancelled.
        """
        if self._closed:
            raise GroundingError(f"the openai engine for {self.base_url} is closed; create a new one")
        if not requests:
            return []
        with self._stats_lock:
            self.stats.batches += 1
        futures: list[Future[Grounding]] = [self._pool.submit(self._ground_one, w, q) for w, q in requests]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    def input_size(self, frame_size: tuple[int, int]) -> tuple[int, int]:
        """`(width, height)` the model sees for a frame of `frame_size` `(width, height)`."""
        h, w = smart_resize(frame_size[1], frame_size[0], min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        return (w, h)

    def close(self) -> None:
        """Cancel queued requests, stop pending retries and close the connections."""
        if self._closed:
            return
        self._closed = True
        self._client.close()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> OpenAIEngine:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OpenAIEngine(base_url={self.base_url!r}, model={self.model!r}, convention={self.convention!r})"

    # --- internals ---------------------------------------------------------------

    def _served_model(self) -> str:
        listing = self._client.request_json("GET", "/models")
        data = listing.get("data")
        if isinstance(data, list) and data and isinstance(data[0], dict) and data[0].get("id"):
            return str(data[0]["id"])
        raise GroundingError(
            f"OpenAI-compatible server at {self.base_url} lists no model at /models; set engine.model to the "
            "served model's name"
        )

    def _image_url(self, frame: Frame) -> tuple[str, tuple[int, int]]:
        size = self.input_size(frame.size)
        key = (frame.camera, frame.index, frame.pts, frame.size, size, id(frame.image))
        url = self._jpegs.get(key)
        if url is None:
            img: np.ndarray = frame.image
            if (img.shape[1], img.shape[0]) != size:
                shrink = size[0] * size[1] < img.shape[0] * img.shape[1]
                img = cv2.resize(img, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
            bgr = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2BGR)
            ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
            if not ok:
                raise GroundingError(f"frame {frame.index} of camera {frame.camera!r} could not be JPEG-encoded")
            url = "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii")
            self._jpegs.put(key, url)
        return url, size

    def _body(self, window: Window, query: Query) -> tuple[dict[str, Any], list[tuple[int, int]]]:
        messages = build_messages(query.text, n_images=len(window), convention=self.convention, mode=query.mode)
        input_sizes: list[tuple[int, int]] = []
        frames = iter(window.frames)
        out: list[dict[str, Any]] = []
        for msg in messages:
            content = msg["content"]
            if isinstance(content, str):
                out.append({"role": msg["role"], "content": content})
                continue
            parts: list[dict[str, Any]] = []
            for part in content:
                if part.get("type") == "image":
                    url, size = self._image_url(next(frames))
                    input_sizes.append(size)
                    # The transformers engine renders "Picture k: " before each image
                    # (add_vision_id); servers render without it, so it is sent as text.
                    parts.append({"type": "text", "text": f"Picture {len(input_sizes)}: "})
                    parts.append({"type": "image_url", "image_url": {"url": url}})
                else:
                    parts.append(dict(part))
            out.append({"role": msg["role"], "content": parts})
        body = {
            "model": self.model,
            "messages": out,
            "max_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "stream": False,
        }
        return body, input_sizes

    def _ground_one(self, window: Window, query: Query) -> Grounding:
        t0 = time.perf_counter()
        body, input_sizes = self._body(window, query)
        t1 = time.perf_counter()
        answer = self._client.request_json("POST", "/chat/completions", body)
        t2 = time.perf_counter()
        text, server_reasoning = _answer_text(answer, self.base_url)
        parsed = parse_answer_full(
            text, frame_sizes=window.frame_sizes, input_sizes=input_sizes, convention=self.convention, image_base=1
        )
        if not parsed.ok:
            log.warning(
                "openai engine: window %s, query %s: answer not parseable: %.120r", window.id, query.id, text
            )
        t3 = time.perf_counter()
        with self._stats_lock:
            st = self.stats
            st.windows += 1
            st.unparseable += 0 if parsed.ok else 1
            st.boxes += len(parsed.detections)
            st.dropped_boxes += parsed.dropped
            st.ambiguous_boxes += parsed.ambiguous
            st.prepare_s += t1 - t0
            st.generate_s += t2 - t1
            st.parse_s += t3 - t2
        return Grounding(
            window_id=window.id,
            query_id=query.id,
            detections=parsed.detections,
            raw_text=text,
            reasoning=parsed.reasoning or server_reasoning,
            model=self.model,
            timings={"prepare": t1 - t0, "vision": 0.0, "generate": t2 - t1, "parse": t3 - t2, "total": t3 - t0},
            parse_ok=parsed.ok,
            usage=_server_usage(answer),
            ambiguous=parsed.ambiguous,
        )


def _server_usage(answer: dict[str, Any]) -> dict[str, int]:
    """`Grounding.usage` from the completion's `usage`: prefill = prompt tokens the server did
    not find in its prefix cache (`prompt_tokens_details.cached_tokens`, which vLLM reports
    with `--enable-prompt-tokens-details` and SGLang by default), generated = completion tokens."""
    usage = answer.get("usage")
    if not isinstance(usage, dict):
        return {}
    try:
        prompt = int(usage.get("prompt_tokens") or 0)
        details = usage.get("prompt_tokens_details")
        cached = int((details or {}).get("cached_tokens") or 0) if isinstance(details, dict) else 0
        return {"prefill_tokens": max(0, prompt - cached), "generated_tokens": int(usage.get("completion_tokens") or 0)}
    except (TypeError, ValueError):
        return {}


def _answer_text(answer: dict[str, Any], url: str) -> tuple[str, str | None]:
    """`(content, reasoning)` of a chat completion; the reasoning is the server's
    `reasoning_content` (vLLM's reasoning parsers split `<think>` off), else `None`."""
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise GroundingError(
            f"OpenAI-compatible server at {url} answered without choices; check that it serves chat completions"
        )
    message = choices[0].get("message") or {}
    content = message.get("content")
    if isinstance(content, list):  # some servers answer with content parts
        content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    text = str(content or "")
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    return text, (str(reasoning) if reasoning else None)


def create_openai_engine(cfg: EngineConfig) -> OpenAIEngine:
    """The `openai` engine from the pipeline's `engine:` section."""
    if not cfg.base_url:
        raise ConfigError("engine.base_url: kind 'openai' needs base_url (e.g. http://localhost:8000/v1)", field="engine.base_url")
    return OpenAIEngine(
        cfg.base_url,
        model=cfg.model,
        api_key=cfg.api_key,
        convention=cfg.convention,
        min_pixels=cfg.min_pixels if cfg.min_pixels is not None else 56 * 56,
        max_pixels=cfg.max_pixels if cfg.max_pixels is not None else 448 * 448,
        max_new_tokens=cfg.max_new_tokens,
        timeout_s=cfg.timeout_s,
        retries=cfg.retries,
        concurrency=cfg.concurrency,
    )


#: The name `streamvg.grounding.create_engine` calls.
create_remote_engine = create_openai_engine
