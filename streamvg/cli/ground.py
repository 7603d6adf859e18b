"""`streamvg ground IMAGE... --query TEXT`: ask GeM-VG about a few pictures, get boxes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from streamvg.cli.outcome import EXIT_FAILURES
from streamvg.errors import ConfigError, SourceNotFoundError, StreamVGError, UnsupportedSourceError

_ENGINE_FLAGS = {
    "model": "engine.model", "device": "engine.device", "max_pixels": "engine.max_pixels",
    "min_pixels": "engine.min_pixels", "max_new_tokens": "engine.max_new_tokens", "convention": "engine.convention",
}

_COLORS = [(255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0), (200, 64, 255), (0, 220, 220)]


def _read_image(path: Path) -> np.ndarray:
    import cv2

    if not path.is_file():
        raise SourceNotFoundError(f"image {path} not found; check the path", source=str(path))
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise UnsupportedSourceError(f"{path} is not an image OpenCV can read (JPEG, PNG, BMP, WebP, TIFF)", source=str(path))
    return np.ascontiguousarray(bgr[:, :, ::-1])


def annotate(images: list[np.ndarray], records: list[dict[str, Any]], out: Path, label: str) -> None:
    """Draw each image's boxes and write the images side by side (same height) to `out`."""
    import cv2

    height = max(img.shape[0] for img in images)
    tiles = []
    for k, img in enumerate(images):
        canvas = np.ascontiguousarray(img[:, :, ::-1].copy())
        for r in records:
            if r["image_index"] != k:
                continue
            x1, y1, x2, y2 = (round(float(v)) for v in r["xyxy"])
            color = _COLORS[k % len(_COLORS)][::-1]
            cv2.rectangle(canvas, (x1, y1), (x2, y2), color, max(1, img.shape[0] // 240))
            cv2.putText(canvas, f"{r.get('label') or label} {r['score']:.2f}"[:40], (x1, max(12, y1 - 4)),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.4, color, 1, cv2.LINE_AA)
        scale = height / canvas.shape[0]
        if scale != 1.0:
            canvas = cv2.resize(canvas, (round(canvas.shape[1] * scale), height))
        tiles.append(canvas)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), np.concatenate(tiles, axis=1)):
        raise ConfigError(f"--annotate {out}: could not write the picture; use a .jpg or .png path in a writable folder")


def ground(
    ctx: typer.Context,
    images: Annotated[list[Path], typer.Argument(help="Pictures to ask about, in order (image 1, 2, …).")],
    query: Annotated[str, typer.Option("--query", "-q", help="What to find, e.g. 'the red cup'.")],
    mode: Annotated[str, typer.Option("--mode", help="'direct' answers at once; 'reason' thinks first (slower).")] = "direct",
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Model directory or hub id; default $STREAMVG_ENGINE__MODEL.", show_default=False),
    ] = None,
    annotate_out: Annotated[Path | None, typer.Option("--annotate", help="Write the pictures with their boxes to this file.")] = None,
    device: Annotated[str, typer.Option("--device", help="'auto', 'cpu', 'cuda', 'cuda:1'.")] = "auto",
    max_pixels: Annotated[int | None, typer.Option("--max-pixels", min=1, help="Largest model input per image, in pixels (default: the checkpoint's).", show_default=False)] = None,
    min_pixels: Annotated[int | None, typer.Option("--min-pixels", min=1, help="Smallest model input per image, in pixels (default: the checkpoint's).", show_default=False)] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Answer length cap, in tokens.")] = 256,
    convention: Annotated[str, typer.Option("--convention", help="Box convention: auto, qwen2_vl, qwen2_5_vl.")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Find QUERY in the pictures with GeM-VG; print the boxes of each picture in its own pixels."""
    from streamvg.cli import preflight
    from streamvg.config import parse_pipeline
    from streamvg.grounding.hf import GemVGEngine
    from streamvg.types import Frame, Query, Window

    if mode not in ("direct", "reason"):
        raise ConfigError(f"--mode {mode!r} is unknown; use direct or reason")
    if not query.strip():
        raise ConfigError("--query is empty; say what to find, e.g. --query 'the red cup'")
    # Flags left at their default < STREAMVG_ENGINE__… variables < flags given.
    defaults, given = preflight.flag_layers(ctx, _ENGINE_FLAGS, {
        "model": model, "device": device, "max_pixels": max_pixels, "min_pixels": min_pixels,
        "max_new_tokens": max_new_tokens, "convention": convention})
    engine_cfg = parse_pipeline(defaults, source="streamvg ground", overrides=given).engine.model_copy(
        update={"kind": "gemvg", "batch_size": 1})
    if not engine_cfg.model:
        raise ConfigError("no model given; pass --model DIR_OR_HUB_ID or set STREAMVG_ENGINE__MODEL")
    if annotate_out is not None:
        preflight.check_output_file(annotate_out, "--annotate")
    pictures = [_read_image(p) for p in images]
    frames = tuple(Frame(camera=p.name, index=k, pts=0.0, image=img) for k, (p, img) in enumerate(zip(images, pictures, strict=True)))
    engine = GemVGEngine(engine_cfg, cache_bytes=0)
    try:
        result = engine.ground([Window(frames)], Query(id="q", text=query, mode=mode))[0]  # type: ignore[arg-type]
    except StreamVGError:
        raise
    except Exception as exc:  # inside transformers' generate: one sentence, exit 1 (the input was fine)
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        typer.echo(f"error: the model {engine.name} failed while answering ({type(exc).__name__}: {first}); "
                   "check its files (config.json, generation_config.json) or try another model", err=True)
        raise typer.Exit(EXIT_FAILURES) from exc
    finally:
        engine.close()
    if result.error is not None:  # the engine could not run this window (a refused picture, out of memory)
        typer.echo(f"error: {result.error}", err=True)
        raise typer.Exit(EXIT_FAILURES)
    records = result.detections.to_records()
    for r in records:
        r.pop("track_id", None)
        r["image"] = str(images[r["image_index"]])
        r["xyxy"] = [round(v, 1) for v in r["xyxy"]]
    if annotate_out is not None:
        annotate(pictures, records, annotate_out, query)
    if json_out:
        typer.echo(json.dumps({
            "query": query, "mode": mode, "model": result.model, "parse_ok": result.parse_ok,
            "boxes": records, "answer": result.raw_text, "reasoning": result.reasoning,
            "images": [{"path": str(p), "width": f.width, "height": f.height} for p, f in zip(images, frames, strict=True)],
            "timings": {k: round(v, 4) for k, v in result.timings.items()},
        }))
        return
    for k, p in enumerate(images):
        mine = [r for r in records if r["image_index"] == k]
        typer.echo(f"{p}: {len(mine)} box{'es' if len(mine) != 1 else ''}")
        for r in mine:
            typer.echo(f"  [{', '.join(f'{v:.0f}' for v in r['xyxy'])}] score {r['score']:.2f}")
    if not result.parse_ok:
        typer.echo(f"(the model's answer could not be parsed: {result.raw_text[:120]!r})", err=True)
    if annotate_out is not None:
        typer.echo(f"annotated picture: {annotate_out}")


def register(app: typer.Typer) -> None:
    app.command("ground")(ground)
