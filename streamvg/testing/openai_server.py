"""A small real HTTP server speaking the OpenAI chat-completions protocol, for tests.

It stands in for vLLM / SGLang / TensorRT-LLM's server where no GPU model can run: a real
process on a real port, so the remote engine's HTTP, retry, timeout and concurrency code
runs exactly as it would against a model server. Run it as a subprocess:

```
python -m streamvg.testing.openai_server --port 8011 --answer-file answers.json \
    [--api-key KEY] [--delay-s 0] [--fail-first 0] [--fail-status 503] [--model NAME]
```

Endpoints:

- `GET  /v1/models` → `{"object": "list", "data": [{"id": MODEL, ...}]}`
- `POST /v1/chat/completions` → a `chat.completion` whose message content is the answer.
- `GET  /_stats` → what the server received (for tests): request count, failures served,
  the peak number of requests in flight, and for each request the model, the prompt text,
  the image sizes `[w, h]` decoded from its `data:image/jpeg;base64,…` parts and whether
  the `Authorization` header matched.
- `POST /_control` with JSON `{"delay_s": 2.0, "delay_next": 1, "fail_next": 2,
  "fail_status": 503, "api_key": "k", "reset": true}` changes behaviour at run time (any
  subset of the keys): `delay_next` limits the delay to the next N completions (-1 = all),
  `reset` clears the records.

The answer file is JSON: `{"answers": [{"match": "red", "text": "..."}, ...], "default": "..."}`;
the first entry whose `match` occurs in the prompt text answers (`match` null or absent =
any). An answer text may hold placeholders that the server fills by looking at the images
it actually received, so a test can check that boxes land on the right pixels without the
server knowing how the client resized them:

- `{box:K:RRGGBB}`: `x1, y1, x2, y2` of the pixels of colour `RRGGBB` (± 60 per channel,
  JPEG-tolerant) in image K, in that image's own pixels (exclusive right/bottom edge),
  the Qwen2.5-VL convention.
- `{box1000:K:RRGGBB}`: the same box relative to the image, 0–1000 (Qwen2-VL convention);
  `{pairs1000:K:RRGGBB}` writes it as Qwen2-VL does, `(x1,y1),(x2,y2)`.
- `{size:K}`: `W, H` of image K.

A colour absent from the image gives `0, 0, 0, 0`.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from streamvg.testing.servers import free_port, wait_until

__all__ = ["OpenAIStubProcess", "OpenAIStubState", "fill_placeholders", "main", "make_server"]

_PLACEHOLDER_RE = re.compile(r"\{(box|box1000|pairs1000):(\d+):([0-9A-Fa-f]{6})\}|\{size:(\d+)\}")
_COLOR_TOLERANCE = 60


def _decode_data_url(url: str) -> np.ndarray:
    """RGB image from a `data:image/...;base64,` URL."""
    if not url.startswith("data:") or ";base64," not in url:
        raise ValueError("image_url is not a base64 data URL")
    raw = base64.b64decode(url.split(";base64,", 1)[1])
    bgr = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("image_url does not hold a decodable image")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def _color_box(image: np.ndarray, hex_color: str) -> tuple[int, int, int, int] | None:
    rgb = np.array([int(hex_color[i : i + 2], 16) for i in (0, 2, 4)], dtype=np.int16)
    mask = np.all(np.abs(image.astype(np.int16) - rgb) <= _COLOR_TOLERANCE, axis=2)
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def fill_placeholders(text: str, images: list[np.ndarray]) -> str:
    """Replace the `{box…:K:RRGGBB}` and `{size:K}` placeholders from the received images."""

    def _sub(m: re.Match[str]) -> str:
        if m.group(4) is not None:
            k = int(m.group(4))
            if k >= len(images):
                return "0, 0"
            h, w = images[k].shape[:2]
            return f"{w}, {h}"
        kind, k, color = m.group(1), int(m.group(2)), m.group(3)
        box = _color_box(images[k], color) if k < len(images) else None
        if box is None:
            box = (0, 0, 0, 0)
        elif kind in ("box1000", "pairs1000"):
            h, w = images[k].shape[:2]
            box = (
                round(box[0] * 1000 / w), round(box[1] * 1000 / h),
                round(box[2] * 1000 / w), round(box[3] * 1000 / h),
            )
        if kind == "pairs1000":
            return f"({box[0]},{box[1]}),({box[2]},{box[3]})"
        return ", ".join(str(v) for v in box)

    return _PLACEHOLDER_RE.sub(_sub, text)


class OpenAIStubState:
    """Behaviour and records of one server, shared by its handler threads."""

    def __init__(
        self,
        *,
        answers: dict[str, Any],
        model: str,
        api_key: str | None,
        delay_s: float,
        fail_next: int,
        fail_status: int,
    ) -> None:
        self.answers = answers
        self.model = model
        self.api_key = api_key
        self.delay_s = delay_s
        self.delay_next = -1
        self.fail_next = fail_next
        self.fail_status = fail_status
        self.lock = threading.Lock()
        self.requests: list[dict[str, Any]] = []
        self.failures_served = 0
        self.in_flight = 0
        self.peak_in_flight = 0

    def pick_answer(self, prompt: str) -> str:
        for entry in self.answers.get("answers", []):
            match = entry.get("match")
            if match is None or match in prompt:
                return str(entry["text"])
        return str(self.answers.get("default", "[]"))


def _handler(state: OpenAIStubState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read /_stats
            return

        def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _read_json(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(length) or b"{}")

        def _authorized(self) -> bool:
            return state.api_key is None or self.headers.get("Authorization") == f"Bearer {state.api_key}"

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/_stats":
                with state.lock:
                    body = {
                        "requests": list(state.requests),
                        "count": len(state.requests),
                        "failures_served": state.failures_served,
                        "peak_in_flight": state.peak_in_flight,
                        "in_flight": state.in_flight,
                    }
                self._send(200, body)
            elif self.path.rstrip("/") == "/v1/models":
                if not self._authorized():
                    self._send(401, {"error": {"message": "Invalid API key", "type": "auth_error"}})
                    return
                self._send(200, {"object": "list", "data": [{"id": state.model, "object": "model", "owned_by": "stub"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:
            path = self.path.rstrip("/")
            if path == "/_control":
                body = self._read_json()
                with state.lock:
                    if "delay_s" in body:
                        state.delay_s = float(body["delay_s"])
                        state.delay_next = int(body.get("delay_next", -1))
                    if "api_key" in body:
                        state.api_key = body["api_key"] or None
                    if body.get("reset"):
                        state.requests.clear()
                        state.failures_served = 0
                        state.peak_in_flight = state.in_flight
                    if "fail_next" in body:
                        state.fail_next = int(body["fail_next"])
                    if "fail_status" in body:
                        state.fail_status = int(body["fail_status"])
                self._send(200, {"ok": True})
                return
            if path != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            body = self._read_json()
            with state.lock:
                state.in_flight += 1
                state.peak_in_flight = max(state.peak_in_flight, state.in_flight)
                delay = state.delay_s if state.delay_next != 0 else 0.0
                if state.delay_next > 0:
                    state.delay_next -= 1
            try:
                self._complete(body, delay)
            finally:
                with state.lock:
                    state.in_flight -= 1

        def _complete(self, body: dict[str, Any], delay: float) -> None:
            authorized = self._authorized()
            texts: list[str] = []
            images: list[np.ndarray] = []
            error: str | None = None
            try:
                for msg in body.get("messages", []):
                    content = msg.get("content")
                    if isinstance(content, str):
                        texts.append(content)
                        continue
                    for part in content or []:
                        if part.get("type") == "text":
                            texts.append(part["text"])
                        elif part.get("type") == "image_url":
                            images.append(_decode_data_url(part["image_url"]["url"]))
            except (ValueError, KeyError, TypeError) as exc:
                error = str(exc)
            prompt = "\n".join(texts)
            record = {
                "model": body.get("model"),
                "prompt": prompt,
                "image_sizes": [[int(im.shape[1]), int(im.shape[0])] for im in images],
                "authorized": authorized,
                "max_tokens": body.get("max_tokens"),
                "time": time.time(),
            }
            with state.lock:
                state.requests.append(record)
                failing = state.fail_next > 0
                if failing:
                    state.fail_next -= 1
                    state.failures_served += 1
            if delay > 0:
                time.sleep(delay)
            if not authorized:
                # echoes the key, as some servers do, so tests check the client masks it
                given = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                self._send(401, {"error": {"message": f"Incorrect API key provided: {given}", "type": "auth_error"}})
                return
            if failing:
                self._send(state.fail_status, {"error": {"message": "stub failure", "type": "server_error"}})
                return
            if error is not None:
                self._send(400, {"error": {"message": error, "type": "invalid_request_error"}})
                return
            if body.get("model") != state.model:
                self._send(404, {"error": {"message": f"The model `{body.get('model')}` does not exist.", "type": "NotFoundError"}})
                return
            answer = fill_placeholders(state.pick_answer(prompt), images)
            self._send(200, {
                "id": f"chatcmpl-{len(state.requests)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": state.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
                "usage": _usage(state, body, answer),
            })

    return Handler


def _usage(state: OpenAIStubState, body: dict[str, Any], answer: str) -> dict[str, Any]:
    """Token counts as a prefix-caching server reports them, one "token" per 4 bytes of the
    request's messages JSON: `cached_tokens` is the longest byte prefix shared with an
    earlier request (what vLLM / SGLang automatic prefix caching would reuse)."""
    text = json.dumps(body.get("messages", []), separators=(",", ":"))
    with state.lock:
        seen: list[str] = state.__dict__.setdefault("_prompts", [])
        common = max((_shared_prefix(text, old) for old in seen), default=0)
        seen.append(text)
        del seen[:-32]
    prompt, completion = len(text) // 4, max(1, len(answer) // 4)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": common // 4}}


def _shared_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of `a` and `b` (characters)."""
    n = min(len(a), len(b))
    lo, hi = 0, n  # binary search on prefix equality: O(n log n) slicing, fine for a stub
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class _QuietServer(ThreadingHTTPServer):
    """A threading server that does not print a traceback when a client hangs up early
    (a client that timed out is expected here)."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        return


def make_server(
    port: int,
    *,
    answers: dict[str, Any],
    model: str = "stub-qwen2.5-vl",
    api_key: str | None = None,
    delay_s: float = 0.0,
    fail_next: int = 0,
    fail_status: int = 503,
    host: str = "127.0.0.1",
) -> ThreadingHTTPServer:
    """Build the server (not started); `server.state` holds its `OpenAIStubState`."""
    state = OpenAIStubState(
        answers=answers, model=model, api_key=api_key, delay_s=delay_s, fail_next=fail_next, fail_status=fail_status
    )
    server = _QuietServer((host, port), _handler(state))
    server.state = state  # type: ignore[attr-defined]
    return server


class OpenAIStubProcess:
    """This server as a subprocess on a free port, with helpers to steer and read it (tests)."""

    def __init__(self, tmp: Path, answers: dict[str, Any], *, model: str = "stub-model", port: int | None = None) -> None:
        self.port = port or free_port()
        answer_file = tmp / f"answers-{self.port}.json"
        answer_file.write_text(json.dumps(answers), encoding="utf-8")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamvg.testing.openai_server", "--port", str(self.port),
             "--answer-file", str(answer_file), "--model", model],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        wait_until(self._up, timeout=30, what="the OpenAI stub server")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"stub server exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
        try:
            self.stats()
            return True
        except OSError:
            return False

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/_stats", timeout=2) as r:
            data: dict[str, Any] = json.loads(r.read())
            return data

    def control(self, **kw: Any) -> None:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/_control", data=json.dumps(kw).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=2) as r:
            r.read()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


def main(argv: list[str] | None = None) -> None:
    """Command line: serve until killed."""
    p = argparse.ArgumentParser(description="OpenAI chat-completions stand-in for tests.")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--answer-file", type=Path, required=True, help="JSON with answers (see module doc).")
    p.add_argument("--model", default="stub-qwen2.5-vl", help="Model id the server serves.")
    p.add_argument("--api-key", default=None, help="Require 'Authorization: Bearer KEY'.")
    p.add_argument("--delay-s", type=float, default=0.0, help="Seconds to wait before answering.")
    p.add_argument("--fail-first", type=int, default=0, help="Answer the first N completions with --fail-status.")
    p.add_argument("--fail-status", type=int, default=503)
    args = p.parse_args(argv)
    answers = json.loads(args.answer_file.read_text(encoding="utf-8"))
    server = make_server(
        args.port, answers=answers, model=args.model, api_key=args.api_key, delay_s=args.delay_s,
        fail_next=args.fail_first, fail_status=args.fail_status, host=args.host,
    )
    try:
        server.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
