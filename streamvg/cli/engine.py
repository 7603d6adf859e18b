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

engine_app = typer.Typer(help="Build optimized GeM-VG engines (ONNX export, TensorRT build).", no_args_is_help=True)


@engine_app.command("export")
def export(
    model: Annotated[Path, typer.Option("--model", help="Saved GeM-VG (Qwen2-VL / Qwen2.5-VL) model directory.")],
    out: Annotated[Path, typer.Option("--out", help="Engine folder to write, e.g. engines/gemvg-7b/.")],
    precision: Annotated[str, typer.Option(help="TensorRT build precision: fp16, bf16 or fp32.")] = "bf16",
    min_pixels: Annotated[int, typer.Option(help="Smallest model input per frame, in pixels (engine.min_pixels).")] = 56 * 56,
    max_pixels: Annotated[int, typer.Option(help="Largest model input per frame, in pixels (engine.max_pixels).")] = 448 * 448,
    max_images: Annotated[int, typer.Option(help="Frames encoded in one call at most (sets the large profile).")] = 4,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 17,
    workspace_gib: Annotated[float, typer.Option(help="TensorRT builder workspace, in GiB.")] = 8.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the build config as JSON.")] = False,
) -> None:
    """Export the model's vision encoder to ONNX and write the build config next to it."""
    from streamvg.errors import ConfigError
    from streamvg.grounding.onnx_export import export_vision_onnx

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
