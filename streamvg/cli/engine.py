"""`streamvg engine export` and `streamvg engine build`: the TensorRT vision encoder's life cycle.

`export` runs anywhere (CPU is fine) and writes `vision.onnx` + `build_config.json`;
`build` runs on the GPU machine that will serve the model (a TensorRT plan is tied to the
GPU model and TensorRT version) and caches the plan by model hash + TensorRT version + GPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

_EXPORT_FLAGS = {"model": "engine.model", "min_pixels": "engine.min_pixels", "max_pixels": "engine.max_pixels"}

engine_app = typer.Typer(help="Build optimized GeM-VG engines (ONNX export, TensorRT build).", no_args_is_help=True)


@engine_app.command("export")
def export(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="Engine folder to write, e.g. engines/gemvg-7b/.")],
    model: Annotated[Path | None, typer.Option(
        "--model", help="Saved GeM-VG (Qwen2-VL / Qwen2.5-VL) model directory; default $STREAMVG_ENGINE__MODEL.",
        show_default=False)] = None,
    precision: Annotated[str, typer.Option(help="TensorRT build precision: fp16, bf16 or fp32.")] = "bf16",
    min_pixels: Annotated[int, typer.Option(help="Smallest model input per frame, in pixels (engine.min_pixels; $STREAMVG_ENGINE__MIN_PIXELS).")] = 56 * 56,
    max_pixels: Annotated[int, typer.Option(help="Largest model input per frame, in pixels (engine.max_pixels; $STREAMVG_ENGINE__MAX_PIXELS). The profiles are built for it, so set it to what the engine will be given.")] = 448 * 448,
    max_images: Annotated[int, typer.Option(help="Frames encoded in one call at most (sets the large profile).")] = 4,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
    workspace_gib: Annotated[float, typer.Option(help="TensorRT builder workspace, in GiB.")] = 8.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the build config as JSON.")] = False,
) -> None:
    """Export the model's vision encoder to ONNX and write the build config next to it."""
    from streamvg.cli import preflight
    from streamvg.config import parse_pipeline
    from streamvg.errors import ConfigError
    from streamvg.grounding.onnx_export import export_vision_onnx

    # Flags left at their default < STREAMVG_ENGINE__… variables < flags given.
    defaults, given = preflight.flag_layers(ctx, _EXPORT_FLAGS, {
        "model": str(model) if model is not None else None, "min_pixels": min_pixels, "max_pixels": max_pixels})
    engine_cfg = parse_pipeline(defaults, source="streamvg engine export", overrides=given).engine
    if not engine_cfg.model:
        raise ConfigError("no model given; pass --model DIR or set STREAMVG_ENGINE__MODEL", field="engine.model")
    model = Path(engine_cfg.model)
    min_pixels = engine_cfg.min_pixels or min_pixels
    max_pixels = engine_cfg.max_pixels or max_pixels
    if max_images < 1:
        raise ConfigError(f"--max-images {max_images} must be at least 1", field="max_images")
    cfg = export_vision_onnx(
        model,
        out,
        opset=opset,
        precision=precision,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        max_images=max_images,
        workspace_gib=workspace_gib,
    )
    if json_out:
        typer.echo(json.dumps(cfg, indent=2))
        return
    typer.echo(f"exported {out / cfg['onnx']} (opset {cfg['opset']}, {cfg['model_type']}, model hash {cfg['model_hash'][:12]})")
    for i, p in enumerate(cfg["profiles"]):
        typer.echo(f"  profile {i}: {p['min_patches']}..{p['max_patches']} patches (opt {p['opt_patches']})")
    typer.echo(f"next, on the GPU machine: streamvg engine build {out}")


@engine_app.command("build")
def build(
    engine_dir: Annotated[Path, typer.Argument(help="Engine folder written by `streamvg engine export`.")],
    precision: Annotated[str | None, typer.Option(help="Override the build config's precision (fp16, bf16, fp32).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if a plan for this GPU exists.")] = False,
    workspace_gib: Annotated[float | None, typer.Option(help="Override the builder workspace, in GiB.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the plan path as JSON.")] = False,
) -> None:
    """Build the TensorRT engine from the exported ONNX (needs `tensorrt` and an NVIDIA GPU)."""
    from streamvg.grounding.trt import build_engine

    plan = build_engine(engine_dir, precision=precision, force=force, workspace_gib=workspace_gib)
    if json_out:
        typer.echo(json.dumps({"plan": str(plan)}))
    else:
        typer.echo(f"engine ready: {plan}")


def register(app: typer.Typer) -> None:
    app.add_typer(engine_app, name="engine")
