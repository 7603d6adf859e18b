"""`streamvg eval mig-bench|mc-bench`: score a model's answers on the GeM-VG paper's benchmarks."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from streamvg.errors import ConfigError

log = logging.getLogger("streamvg.eval")

eval_app = typer.Typer(
    help=(
        "Score grounding answers on MIG-Bench or MC-Bench, the benchmarks of the GeM-VG paper.\n\n"
        "Give answers already produced (--predictions PRED.jsonl, one line per item: "
        '{"index": N, "text": "<raw answer>"}), or add --model DIR --images DIR to ask the model '
        "first: answers are appended to --predictions as they come, so an interrupted run resumes.\n\n"
        "Exit codes: 0 scored; 1 scored, but some items have no answer (listed in --json); "
        "2 bad input; 130 interrupted (answers so far are kept)."
    ),
    no_args_is_help=True,
)

_PRED_HELP = "Answers file (JSONL, one line per item). With --model it is created or resumed."
_MODEL_HELP = "Ask this model (directory or hub id) every item not yet in --predictions, then score."


class _Progress:
    """A progress bar on a terminal; a log line every 10 s otherwise (CI logs, pipes)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.tty = sys.stderr.isatty()
        self._last = 0.0
        self._bar: Any = None
        self._task: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.tty:
            if self._bar is None:
                from rich.progress import Progress

                self._bar = Progress(transient=True)
                self._bar.start()
                self._task = self._bar.add_task(self.what, total=total)
            self._bar.update(self._task, completed=done)
        elif time.monotonic() - self._last >= 10.0 or done == total:
            self._last = time.monotonic()
            typer.echo(f"{self.what}: {done}/{total} items asked", err=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _engine(model: str, device: str, batch_size: int, max_new_tokens: int,
            min_pixels: int | None, max_pixels: int | None) -> Any:
    from streamvg.config import EngineConfig
    from streamvg.grounding import create_engine

    fields: dict[str, Any] = {"kind": "gemvg", "model": model, "device": device,
                              "batch_size": batch_size, "max_new_tokens": max_new_tokens}
    if min_pixels is not None:
        fields["min_pixels"] = min_pixels
    if max_pixels is not None:
        fields["max_pixels"] = max_pixels
    return create_engine(EngineConfig(**fields))


def _ask(model: str | None, images: Path | None, predictions: Path, items: list[Any], *,
         device: str, batch_size: int, max_new_tokens: int, min_pixels: int | None,
         max_pixels: int | None) -> dict[int, str]:
    """Run the model on unanswered items (when --model is given); returns failures by index."""
    from streamvg.evaluation.predictions import read_predictions
    from streamvg.evaluation.runner import run_items

    if model is None:
        if images is not None:
            raise ConfigError("--images needs --model: images are only read to ask a model")
        return {}
    if images is None or not images.is_dir():
        raise ConfigError(f"--images {images or '(missing)'} must be the folder that holds the dataset's images")
    predictions.parent.mkdir(parents=True, exist_ok=True)
    try:
        predictions.touch(exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--predictions {predictions} cannot be written ({exc.strerror or exc}); choose a writable path") from None
    answered = set(read_predictions(predictions, n_items=len(items), missing_ok=True))
    engine = _engine(model, device, batch_size, max_new_tokens, min_pixels, max_pixels)
    progress = _Progress("asking the model")
    try:
        report = run_items(engine, items, predictions, answered, batch_size=batch_size, on_progress=progress)
    finally:
        progress.close()
        engine.close()
    if report.skipped:
        typer.echo(f"{report.skipped} item(s) already answered in {predictions}: not asked again", err=True)
    return report.failures


def _finish(score_json: dict[str, Any], failures: dict[int, str], missing: list[int], json_out: bool,
            table: list[str]) -> None:
    score_json["failures"] = [{"index": i, "error": e} for i, e in sorted(failures.items())]
    score_json["missing_items"] = missing
    if json_out:
        typer.echo(json.dumps(score_json))
    else:
        for line in table:
            typer.echo(line)
        for i, e in sorted(failures.items())[:10]:
            typer.echo(f"item {i}: {e}", err=True)
        if len(failures) > 10:
            typer.echo(f"... and {len(failures) - 10} more failed items (see --json)", err=True)
    if missing:
        typer.echo(f"{len(missing)} item(s) have no answer and scored 0; rerun with --model to answer them", err=True)
        raise typer.Exit(1)


@eval_app.command("mig-bench")
def mig_bench(
    data: Annotated[Path, typer.Argument(help="MIG-Bench data file (Migician's MIG_data.json).")],
    predictions: Annotated[Path, typer.Option("--predictions", "-p", help=_PRED_HELP)],
    convention: Annotated[str, typer.Option(
        "--convention",
        help="How answer numbers map to the image: migician (the benchmark's rule: values >= 1 are on "
        "the 0-1000 grid, smaller ones relative), qwen2_vl (0-1000), relative (0-1), qwen2_5_vl (model-input "
        "pixels, needs sizes recorded by --model), auto (qwen2_5_vl where recorded, else migician).",
    )] = "auto",
    model: Annotated[str | None, typer.Option("--model", "-m", help=_MODEL_HELP)] = None,
    images: Annotated[Path | None, typer.Option("--images", help="Folder holding the dataset's `images` paths (with --model).")] = None,
    device: Annotated[str, typer.Option("--device", help="'auto', 'cpu', 'cuda', 'cuda:1' (with --model).")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Items per generate() batch.")] = 4,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Answer length cap, in tokens.")] = 128,
    min_pixels: Annotated[int | None, typer.Option("--min-pixels", min=1, help="Smallest model input per image (default: the model's).")] = None,
    max_pixels: Annotated[int | None, typer.Option("--max-pixels", min=1, help="Largest model input per image (default: the model's).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the scores as JSON (fractions in 0-1).")] = False,
) -> None:
    """Score answers on MIG-Bench: per task IoU@0.3/0.5/0.7 and mean IoU, item-weighted and task-averaged overall."""
    from streamvg.evaluation.migbench import CONVENTIONS, load_mig_bench, score_mig_bench
    from streamvg.evaluation.predictions import read_predictions
    from streamvg.evaluation.runner import EvalItem, resolve_image

    if convention not in CONVENTIONS:
        raise ConfigError(f"--convention {convention!r} is unknown; use one of {', '.join(CONVENTIONS)}")
    items_raw = load_mig_bench(data)
    items = [
        EvalItem(i, str(it["question"]).strip(), tuple(resolve_image(images, str(p)) for p in it["images"]) if images else ())
        for i, it in enumerate(items_raw)
    ]
    failures = _ask(model, images, predictions, items, device=device, batch_size=batch_size,
                    max_new_tokens=max_new_tokens, min_pixels=min_pixels, max_pixels=max_pixels)
    preds = read_predictions(predictions, n_items=len(items_raw))
    score = score_mig_bench(items_raw, preds, convention=convention)
    out = score.to_json()
    table = [f"{'task':<18}{'n':>5}{'IoU@0.3':>10}{'IoU@0.5':>10}{'IoU@0.7':>10}{'mean IoU':>10}{'no box':>8}"]
    for name, t in out["tasks"].items():
        table.append(f"{name:<18}{t['n']:>5}{100 * t['iou@0.3']:>10.2f}{100 * t['iou@0.5']:>10.2f}"
                     f"{100 * t['iou@0.7']:>10.2f}{100 * t['mean_iou']:>10.2f}{t['unparsed']:>8}")
    for label, key in (("all items", "item_weighted"), ("task average", "task_averaged")):
        o = out["overall"][key]
        table.append(f"{label:<18}{out['overall']['n']:>5}{100 * o['iou@0.3']:>10.2f}{100 * o['iou@0.5']:>10.2f}"
                     f"{100 * o['iou@0.7']:>10.2f}{100 * o['mean_iou']:>10.2f}")
    missing = [i for i in range(len(items_raw)) if i not in preds]
    _finish(out, failures, missing, json_out, table)


@eval_app.command("mc-bench")
def mc_bench(
    annotations: Annotated[Path, typer.Argument(help="MC-Bench annotation file (mc-bench_v0.2_val.json, COCO layout).")],
    predictions: Annotated[Path, typer.Option("--predictions", "-p", help=_PRED_HELP + " A .json list of COCO results is scored as it is.")],
    convention: Annotated[str, typer.Option("--convention", help="Box convention of raw answers without a recorded one: qwen2_vl or qwen2_5_vl.")] = "qwen2_vl",
    model: Annotated[str | None, typer.Option("--model", "-m", help=_MODEL_HELP)] = None,
    images: Annotated[Path | None, typer.Option("--images", help="Folder holding the annotation's file_name paths (with --model).")] = None,
    device: Annotated[str, typer.Option("--device", help="'auto', 'cpu', 'cuda', 'cuda:1' (with --model).")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Samples per generate() batch.")] = 4,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Answer length cap, in tokens.")] = 256,
    min_pixels: Annotated[int | None, typer.Option("--min-pixels", min=1, help="Smallest model input per image (default: the model's).")] = None,
    max_pixels: Annotated[int | None, typer.Option("--max-pixels", min=1, help="Largest model input per image (default: the model's).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the scores as JSON (fractions in 0-1).")] = False,
) -> None:
    """Score answers on MC-Bench: AP50 after matching predicted groups to targets, and image-level accuracy."""
    from streamvg.evaluation.mcbench import (
        answers_to_results,
        load_mc_bench,
        read_coco_results,
        score_mc_bench,
    )
    from streamvg.evaluation.predictions import read_predictions
    from streamvg.evaluation.runner import EvalItem, resolve_image

    if convention not in ("qwen2_vl", "qwen2_5_vl"):
        raise ConfigError(f"--convention {convention!r} is unknown; use qwen2_vl or qwen2_5_vl")
    data = load_mc_bench(annotations)
    files = {int(im["id"]): str(im.get("file_name", "")) for im in data["images"]}
    descriptions = data["descriptions"]
    items = [
        EvalItem(i, str(d.get("text", "")).strip() or "the target objects",
                 tuple(resolve_image(images, files[int(x)]) for x in d["images_id"]) if images else ())
        for i, d in enumerate(descriptions)
    ]
    coco_results = predictions.suffix == ".json" and model is None
    failures: dict[int, str] = {}
    if coco_results:
        results = read_coco_results(predictions)
        missing: list[int] = []
    else:
        failures = _ask(model, images, predictions, items, device=device, batch_size=batch_size,
                        max_new_tokens=max_new_tokens, min_pixels=min_pixels, max_pixels=max_pixels)
        answers = read_predictions(predictions, n_items=len(descriptions))
        results = answers_to_results(data, answers, convention=convention)
        missing = [i for i in range(len(descriptions)) if i not in answers]
    score = score_mc_bench(data, results)
    out = score.to_json()
    table = [
        f"samples {score.samples}, predicted boxes {score.predictions}",
        f"AP50 (instance level)  {100 * score.ap50:6.2f}",
        f"accuracy (image level) {100 * score.accuracy:6.2f}",
    ]
    _finish(out, failures, missing, json_out, table)


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
