"""Checks made before any work starts, so a run never ends in a traceback or loses results.

Each check raises `ConfigError` (exit 2) with one sentence naming the option or field,
what is wrong and what to do: output paths that cannot be written (found before a long
search, not after it), a replay file that is not JSON lines, a metrics port in use, a
pipeline file naming a video that does not exist. Also `explicit(ctx, name)`: whether a
flag was given on the command line (it then wins over `STREAMVG_…` variables).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from streamvg.config import PipelineConfig
from streamvg.errors import ConfigError
from streamvg.redaction import mask_url
from streamvg.sources import is_live

__all__ = [
    "check_metrics_port",
    "check_output_dir",
    "check_output_file",
    "check_pipeline",
    "check_replay_file",
    "explicit",
    "flag_layers",
]


def explicit(ctx: Any, name: str) -> bool:
    """True when parameter `name` of the command in `ctx` (a click/typer Context) was
    given on the command line (not its default)."""
    source = ctx.get_parameter_source(name)
    # By name: typer ships its own copy of click, whose ParameterSource is another enum.
    return source is not None and getattr(source, "name", str(source)) not in ("DEFAULT", "DEFAULT_MAP")


def flag_layers(ctx: Any, mapping: Mapping[str, str], values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split flag values into (defaults, given) nested pipeline data.

    `mapping` names each flag's config path (`{"window": "sampling.window_size"}`); flags
    left at their default go under the environment, flags given go over it. `None`
    values are left out (the config's own default applies).
    """
    defaults: dict[str, Any] = {}
    given: dict[str, Any] = {}
    for flag, path in mapping.items():
        value = values.get(flag)
        if value is None:
            continue
        node = given if explicit(ctx, flag) else defaults
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return defaults, given


def _what(flag: str) -> str:
    return flag if flag.startswith("-") or "." in flag else f"--{flag}"


def check_output_file(path: Path, flag: str) -> None:
    """`path` can be written (its folder is created): else one sentence naming `flag`.

    Opens it for appending (creating it empty if absent, removed again), the only test
    that holds for every cause (read-only mount, a file where a folder should be, root).
    """
    what = _what(flag)
    if path.is_dir():
        raise ConfigError(f"{what} {path} is a folder; give a file path, e.g. {path / 'segments.jsonl'}", field=flag)
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be written ({_reason(exc)}); give a path in a writable folder", field=flag) from exc
    if not existed:
        with contextlib.suppress(OSError):
            path.unlink()


def check_output_dir(path: Path, flag: str) -> None:
    """`path` is (or can be created as) a writable folder: else one sentence naming `flag`."""
    what = _what(flag)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file, not a folder; give a folder for the pictures (it is created if missing)", field=flag)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".streamvg-write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be written ({_reason(exc)}); give a writable folder", field=flag) from exc


def check_replay_file(path: str | os.PathLike[str], flag: str) -> None:
    """`path` is a readable JSON-lines file of objects: else one sentence naming `flag`."""
    p = Path(path)
    what = _what(flag)
    if not p.is_file():
        hint = "it is a folder" if p.is_dir() else "no such file"
        raise ConfigError(f"{what} {p}: {hint}; give the groundings JSONL file (one JSON object per line)", field=flag)
    try:
        with p.open("r", encoding="utf-8") as fh:
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigError(
                        f"{what} {p}: line {n} is not JSON ({exc.msg}); a replay file holds one JSON object per line "
                        '({"camera": …, "pts": …, "boxes": […]})', field=flag) from exc
                if not isinstance(rec, dict):
                    raise ConfigError(f"{what} {p}: line {n} is a JSON {type(rec).__name__}, not an object; "
                                      'each line is {"camera": …, "pts": …, "boxes": […]}', field=flag)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {p} is not a text file (not UTF-8), so not a groundings JSONL; give the replay answers file",
                          field=flag) from exc
    except OSError as exc:
        raise ConfigError(f"{what} {p} cannot be read ({_reason(exc)})", field=flag) from exc


def check_metrics_port(port: int) -> None:
    """Port `port` is free to serve metrics on (all interfaces): else one sentence."""
    if not 0 < port < 65536:
        raise ConfigError(f"--metrics-port {port} is not a TCP port; give 1-65535", field="--metrics-port")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # As the metrics server binds: SO_REUSEADDR, so only a live listener makes it fail.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
    except OSError as exc:
        raise ConfigError(metrics_port_message(port, exc), field="--metrics-port") from exc
    finally:
        sock.close()


def metrics_port_message(port: int, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"--metrics-port {port} is already in use by another process; choose another port or stop that process"
    return f"--metrics-port {port} cannot be served ({_reason(exc)}); choose another port (above 1024 without root)"


def check_pipeline(cfg: PipelineConfig, source: str) -> None:
    """What a pipeline needs from disk exists before any camera or model is opened:
    file sources (a missing video is exit 2, never a camera that fails later), the replay
    file, the JSONL sink's file."""
    for i, src in enumerate(cfg.sources):
        uri = src.uri.strip()
        if is_live(uri):  # also raises for an unsupported scheme: one sentence
            continue
        path = Path(uri[len("file://"):] if uri.startswith("file://") else uri).expanduser()
        if not path.is_file():
            hint = "is a folder, not a video file" if path.is_dir() else "does not exist"
            raise ConfigError(
                f"{source}: sources[{i}] ({src.name}): {mask_url(uri)} {hint}; check the path "
                "(relative paths are read from the folder streamvg runs in)", field=f"sources[{i}].uri")
    if cfg.engine.kind == "replay" and cfg.engine.replay_path:
        check_replay_file(cfg.engine.replay_path, "engine.replay_path")
    if cfg.sinks.jsonl is not None and cfg.sinks.jsonl.path != "-":
        check_output_file(Path(cfg.sinks.jsonl.path), "sinks.jsonl.path")


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__
