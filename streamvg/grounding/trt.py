"""TensorRT-optimised GeM-VG: engine builds, the TensorRT vision encoder, the 'gemvg-trt' engine.

```
engines/NAME/vision.onnx           streamvg engine export (streamvg.grounding.onnx_export)
engines/NAME/build_config.json     precision, optimisation profiles, model hash, vision spec
engines/NAME/vision-<key>.plan     streamvg engine build; key = model hash + TensorRT version
engines/NAME/vision-<key>.json       + GPU name + precision + profiles (a plan only runs there)
engines/NAME/timing-<trt>-<gpu>.cache   TensorRT timing cache, reused by later builds
```

At run time a `TensorRTVisionEncoder` turns (pixel_values, grid_thw) into merged visual
tokens (the `VisionEncoder` protocol of streamvg.grounding.vision), so it sits behind the
engine's per-frame visual-token cache exactly where the model's own `visual` would. The host
side (rotary tables, window permutation, attention segments from `grid_thw`) is shared with
`OnnxRuntimeVisionEncoder`, which runs the same ONNX graph on CPU; only the session differs,
so the CPU tests exercise the code path the GPU runs.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import re
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from streamvg.errors import ConfigError, EngineUnavailableError, GroundingError
from streamvg.grounding.onnx_export import (
    INPUT_NAMES,
    OUTPUT_NAME,
    WINDOWED_INPUTS,
    HostInputs,
    VisionSpec,
    host_inputs,
    patches_for_pixels,
    profile_shapes,
    read_build_config,
)

if TYPE_CHECKING:
    from streamvg.config import EngineConfig

__all__ = [
    "OnnxRuntimeVisionEncoder",
    "TensorRTVisionEncoder",
    "VisualAdapter",
    "attach_vision_encoder",
    "build_engine",
    "create_trt_engine",
    "engine_cache_key",
    "find_plan",
    "require_cuda",
    "require_tensorrt",
    "use_static_cache",
]

log = logging.getLogger(__name__)

_INSTALL_HINT = "pip install 'streamvg[trt]' (TensorRT 10 or newer, CUDA 12) on a machine with an NVIDIA GPU"


def require_tensorrt(what: str = "`streamvg engine build`", *, otherwise: str = "") -> Any:
    """Import `tensorrt`, or raise `EngineUnavailableError` saying what to install."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:
        raise EngineUnavailableError(f"{what} needs the `tensorrt` Python package, which is not installed; {_INSTALL_HINT}{otherwise}") from exc


def require_cuda(what: str = "`streamvg engine build`") -> str:
    """Return the CUDA GPU's name, or raise `EngineUnavailableError` when PyTorch sees no GPU."""
    if not torch.cuda.is_available():
        raise EngineUnavailableError(
            f"{what} needs an NVIDIA GPU but PyTorch sees none (torch.cuda.is_available() is False); run it on the GPU machine that will serve the model, with a CUDA build of PyTorch"
        )
    return str(torch.cuda.get_device_name(torch.cuda.current_device()))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def engine_cache_key(build_config: dict[str, Any], *, trt_version: str, gpu_name: str) -> str:
    """The plan's identity: model hash + TensorRT version + GPU name + precision + profiles.

    A serialized TensorRT plan only runs on the TensorRT version and GPU model that built it,
    so all of these go into the key; any change means a new build, never a wrong plan.
    """
    parts = {
        "model_hash": build_config["model_hash"],
        "trt": trt_version,
        "gpu": gpu_name,
        "precision": build_config["precision"],
        "profiles": build_config["profiles"],
        "opset": build_config["opset"],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def find_plan(engine_dir: str | Path, build_config: dict[str, Any], *, trt_version: str, gpu_name: str) -> Path:
    """Path of the plan for this TensorRT version and GPU (it may not exist yet)."""
    key = engine_cache_key(build_config, trt_version=trt_version, gpu_name=gpu_name)
    return Path(engine_dir) / f"vision-{key}.plan"


def build_engine(
    engine_dir: str | Path,
    *,
    precision: str | None = None,
    force: bool = False,
    workspace_gib: float | None = None,
) -> Path:
    """Build (or reuse) the TensorRT plan for `engine_dir` with the `tensorrt` Python API.

    Parses `vision.onnx` with `OnnxParser`, sets FP16/BF16 flags, one optimisation profile
    per entry of the build config (min/opt/max on the patch axis, N/m² on the token axis),
    loads and saves the timing cache, and serializes the plan. A plan for the same model
    hash, TensorRT version, GPU name, precision and profiles is reused unless `force`.

    Args:
        engine_dir: a folder written by `streamvg engine export`.
        precision: "fp16", "bf16" or "fp32"; default: the build config's.
        force: rebuild even when a matching plan exists.
        workspace_gib: builder workspace in GiB; default: the build config's.

    Returns:
        The plan file.

    Raises:
        ConfigError: the folder has no (valid) build config or ONNX file.
        EngineUnavailableError: `tensorrt` is not installed or no GPU is visible.
        GroundingError: TensorRT could not parse the ONNX or build the engine.
    """
    folder = Path(engine_dir)
    cfg = read_build_config(folder)
    if precision is not None:
        if precision not in ("fp16", "bf16", "fp32"):
            raise ConfigError(f"precision {precision!r} is not one of fp16, bf16, fp32", field="precision")
        cfg["precision"] = precision
    onnx_path = folder / cfg["onnx"]
    if not onnx_path.is_file():
        raise ConfigError(f"{onnx_path}: missing; re-run `streamvg engine export`", field="engine_dir")
    trt = require_tensorrt()
    gpu = require_cuda()
    plan = find_plan(folder, cfg, trt_version=trt.__version__, gpu_name=gpu)
    if plan.is_file() and not force:
        log.info("reusing %s (same model hash, TensorRT %s, %s)", plan, trt.__version__, gpu)
        return plan

    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise GroundingError(f"{onnx_path}: TensorRT could not parse the ONNX graph ({errors}); re-export with a supported opset (17)")
    config = builder.create_builder_config()
    workspace = workspace_gib if workspace_gib is not None else float(cfg.get("workspace_gib", 8.0))
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace * (1 << 30)))
    if cfg["precision"] == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif cfg["precision"] == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)

    spec = VisionSpec.from_dict(cfg["vision"])
    network_inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    one_image = patches_for_pixels(int(cfg["pixels"]["max_pixels"]), spec)
    for prof in cfg["profiles"]:
        profile = builder.create_optimization_profile()
        shapes = profile_shapes(spec, prof, one_image)
        for name, tensor in network_inputs.items():
            if name not in shapes:
                raise GroundingError(f"{onnx_path}: unexpected graph input {name!r}; re-export with this StreamVG version")
            lo, opt, hi = shapes[name]
            del tensor
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)

    cache_path = folder / f"timing-{_slug(trt.__version__)}-{_slug(gpu)}.cache"
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise GroundingError(f"{onnx_path}: TensorRT failed to build the engine (see the TensorRT log above); try --precision fp32 or a larger --workspace-gib")
    plan.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    manifest = {
        "plan": plan.name,
        "model_hash": cfg["model_hash"],
        "tensorrt": trt.__version__,
        "gpu": gpu,
        "precision": cfg["precision"],
        "profiles": cfg["profiles"],
        "build_s": round(time.perf_counter() - started, 1),
    }
    plan.with_suffix(".json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log.info("built %s in %.0fs", plan, manifest["build_s"])
    return plan


class _HostPreparedVisionEncoder:
    """The shared half of the ONNX Runtime and TensorRT encoders: everything but the session.

    `encode()` validates its inputs, splits the images into chunks that fit the largest
    optimisation profile, prepares each chunk's host inputs (cached per grid, since frames of
    one camera share a size), runs the chunk and concatenates the merged tokens in order.
    """

    def __init__(self, engine_dir: str | Path, *, dtype: torch.dtype | None = None) -> None:
        self.engine_dir = Path(engine_dir)
        self.build_config = read_build_config(self.engine_dir)
        self.spec = VisionSpec.from_dict(self.build_config["vision"])
        self.max_patches = max(int(p["max_patches"]) for p in self.build_config["profiles"])
        self.dtype = dtype
        self._host_cache: OrderedDict[tuple[tuple[int, int, int], ...], HostInputs] = OrderedDict()

    def _host(self, grids: tuple[tuple[int, int, int], ...]) -> HostInputs:
        hit = self._host_cache.get(grids)
        if hit is not None:
            self._host_cache.move_to_end(grids)
            return hit
        prepared = host_inputs(torch.tensor(grids, dtype=torch.long), self.spec)
        self._host_cache[grids] = prepared
        if len(self._host_cache) > 64:
            self._host_cache.popitem(last=False)
        return prepared

    def _run(self, patches: torch.Tensor, host: HostInputs) -> torch.Tensor:
        raise NotImplementedError

    def check_max_pixels(self, max_pixels: int) -> None:
        """Refuse, at load time, a pixel budget whose largest frame the engine's profiles cannot hold."""
        need = patches_for_pixels(int(max_pixels), self.spec)
        built = int(self.build_config["pixels"]["max_pixels"])
        if need > self.max_patches:
            raise ConfigError(
                f"engine.max_pixels ({max_pixels}) needs up to {need} patches per frame, but the engine in "
                f"{self.engine_dir} was exported for max_pixels {built} (at most {self.max_patches} patches per call); "
                f"set engine.max_pixels to {built} or less, or re-export with --max-pixels {max_pixels}",
                field="engine.max_pixels",
            )

    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Merged visual tokens (sum t·h·w/m², out_hidden) for the images, in order."""
        grids = [(int(t), int(h), int(w)) for t, h, w in torch.as_tensor(grid_thw).reshape(-1, 3).tolist()]
        sizes = [t * h * w for t, h, w in grids]
        total = sum(sizes)
        if pixel_values.ndim != 2 or pixel_values.shape[0] != total or pixel_values.shape[1] != self.spec.patch_dim:
            raise ConfigError(
                f"pixel_values has shape {tuple(pixel_values.shape)} but grid_thw needs ({total}, {self.spec.patch_dim}); pass the image processor's output unchanged"
            )
        chunks: list[list[int]] = [[]]
        used = 0
        for i, n in enumerate(sizes):
            if n > self.max_patches:
                raise ConfigError(
                    f"image {i} has {n} patches but the engine in {self.engine_dir} was built for at most {self.max_patches}; set max_pixels <= {self.build_config['pixels']['max_pixels']} or re-export with a larger --max-pixels"
                )
            if used + n > self.max_patches and chunks[-1]:
                chunks.append([])
                used = 0
            chunks[-1].append(i)
            used += n
        starts = np.concatenate([[0], np.cumsum(sizes)])
        outputs = []
        for chunk in chunks:
            lo, hi = int(starts[chunk[0]]), int(starts[chunk[-1] + 1])
            out = self._run(pixel_values[lo:hi], self._host(tuple(grids[i] for i in chunk)))
            outputs.append(out)
        result = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
        return result.to(self.dtype) if self.dtype is not None else result

    def close(self) -> None:
        """Release the session (idempotent)."""


class OnnxRuntimeVisionEncoder(_HostPreparedVisionEncoder):
    """The exported vision graph in ONNX Runtime: the CPU twin of `TensorRTVisionEncoder`.

    Useful to check an export (and the host-side preprocessing) on any machine; slower than
    PyTorch on CPU because attention is dense over each chunk.
    """

    def __init__(self, engine_dir: str | Path, *, dtype: torch.dtype | None = None, providers: list[str] | None = None) -> None:
        super().__init__(engine_dir, dtype=dtype)
        import onnxruntime as ort

        onnx_path = self.engine_dir / self.build_config["onnx"]
        if not onnx_path.is_file():
            raise ConfigError(f"{onnx_path}: missing; re-run `streamvg engine export`", field="engine_dir")
        self._session = ort.InferenceSession(str(onnx_path), providers=providers or ["CPUExecutionProvider"])
        self._input_names = {i.name for i in self._session.get_inputs()}

    def _run(self, patches: torch.Tensor, host: HostInputs) -> torch.Tensor:
        feeds: dict[str, np.ndarray] = {"pixel_patches": patches.detach().to("cpu", torch.float32).numpy()}
        for name, tensor in host.as_dict().items():
            feeds[name] = tensor.numpy()
        # The exporter drops inputs a model does not use (window_segments for Qwen2-VL).
        out = self._session.run([OUTPUT_NAME], {k: v for k, v in feeds.items() if k in self._input_names})[0]
        return torch.from_numpy(np.asarray(out)).to(patches.device)


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.bfloat16: torch.bfloat16,
        trt.int32: torch.int32,
        trt.int64: torch.int64,
        trt.bool: torch.bool,
    }
    if dtype not in table:
        raise GroundingError(f"TensorRT tensor type {dtype} is not supported by StreamVG's vision encoder; re-export the engine")
    return table[dtype]


class TensorRTVisionEncoder(_HostPreparedVisionEncoder):
    """Visual tokens from the TensorRT plan built by `streamvg engine build` (VisionEncoder protocol).

    Tensors stay on the GPU: inputs are copied to `device`, the plan runs on PyTorch's current
    CUDA stream (so later PyTorch work is ordered after it), and the output is a CUDA tensor.
    The optimisation profile is chosen per call: the smallest whose max patch count fits.
    """

    def __init__(self, engine_dir: str | Path, *, device: str | torch.device = "cuda", dtype: torch.dtype | None = None) -> None:
        super().__init__(engine_dir, dtype=dtype)
        trt = require_tensorrt("the TensorRT vision encoder")
        require_cuda("the TensorRT vision encoder")
        self._trt = trt
        self.device = torch.device(device)
        gpu = str(torch.cuda.get_device_name(self.device))
        plan = find_plan(self.engine_dir, self.build_config, trt_version=trt.__version__, gpu_name=gpu)
        if not plan.is_file():
            raise EngineUnavailableError(
                f"{self.engine_dir}: no engine built for {gpu} with TensorRT {trt.__version__}; run `streamvg engine build {self.engine_dir}` on this machine"
            )
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
        if self._engine is None:
            raise GroundingError(f"{plan}: TensorRT could not load the plan; rebuild it with `streamvg engine build --force {self.engine_dir}`")
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self._inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._dtypes = {n: _torch_dtype(trt, self._engine.get_tensor_dtype(n)) for n in names}
        self._profile_max = [int(p["max_patches"]) for p in self.build_config["profiles"]]
        self._active_profile = 0
        self.plan = plan

    def _pick_profile(self, n: int) -> int:
        fitting = [i for i, hi in enumerate(self._profile_max) if n <= hi]
        return min(fitting, key=lambda i: self._profile_max[i])

    def _run(self, patches: torch.Tensor, host: HostInputs) -> torch.Tensor:
        stream = torch.cuda.current_stream(self.device)
        profile = self._pick_profile(host.num_patches)
        if profile != self._active_profile:
            self._context.set_optimization_profile_async(profile, stream.cuda_stream)
            self._active_profile = profile
        feeds = {"pixel_patches": patches, **host.as_dict()}
        keep: list[torch.Tensor] = []
        for name in self._inputs:
            if name not in INPUT_NAMES and name not in WINDOWED_INPUTS:
                raise GroundingError(f"{self.plan}: unexpected engine input {name!r}; re-export and rebuild the engine")
            t = feeds[name].to(self.device, self._dtypes[name], non_blocking=True).contiguous()
            keep.append(t)
            self._context.set_input_shape(name, tuple(t.shape))
            self._context.set_tensor_address(name, t.data_ptr())
        out = torch.empty(tuple(self._context.get_tensor_shape(OUTPUT_NAME)), dtype=self._dtypes[OUTPUT_NAME], device=self.device)
        self._context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise GroundingError(f"{self.plan}: TensorRT execution failed for {host.num_patches} patches")
        return out

    def close(self) -> None:
        self._context = None
        self._engine = None


class VisualAdapter(torch.nn.Module):
    """Stands in for a transformers Qwen-VL `model.visual`, answering from a `VisionEncoder`.

    `get_image_features` reads `visual.dtype` and `visual.spatial_merge_size` and takes
    `visual(pixel_values, grid_thw=...).pooler_output`; this module provides exactly that, so
    `generate()` runs unchanged with the vision tower replaced (benchmarks, and engines
    without their own encoder hook).
    """

    def __init__(self, encoder: Any, *, dtype: torch.dtype, spatial_merge_size: int) -> None:
        super().__init__()
        self.encoder = encoder
        self._dtype = dtype
        self.spatial_merge_size = spatial_merge_size

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def forward(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        tokens = self.encoder.encode(hidden_states, grid_thw).to(self._dtype)
        return BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=tokens)


def attach_vision_encoder(model: Any, encoder: Any) -> Any:
    """Replace a loaded Qwen2(.5)-VL model's `visual` by `encoder`; returns the original tower."""
    inner = model.model if hasattr(model, "model") and hasattr(model.model, "visual") else model
    original: Any = inner.visual
    dtype = next(original.parameters()).dtype
    inner.visual = VisualAdapter(encoder, dtype=dtype, spatial_merge_size=int(original.spatial_merge_size))
    return original


def create_trt_engine(cfg: EngineConfig) -> Any:
    """The 'gemvg-trt' engine: GeM-VG with its vision encoder in TensorRT.

    The language model runs in transformers (the HF engine, bf16, with its GPU options); the
    TensorRT vision encoder replaces the model's `visual` behind the visual-token cache.

    Raises:
        EngineUnavailableError: TensorRT or a GPU is missing, or no plan was built for this GPU.
        ConfigError: `engine_dir` is not set or not an exported engine folder.
    """
    what = "engine kind 'gemvg-trt'"
    require_tensorrt(what, otherwise=", or use engine kind 'gemvg' (transformers) here")
    require_cuda(what)
    if not cfg.engine_dir:
        raise ConfigError(
            "engine.engine_dir is not set; kind 'gemvg-trt' needs the folder made by `streamvg engine export` and `streamvg engine build`",
            field="engine.engine_dir",
        )
    device = cfg.device if cfg.device.startswith("cuda") else "cuda"
    encoder = TensorRTVisionEncoder(cfg.engine_dir, device=device)
    built_from = Path(encoder.build_config.get("model", ""))
    if cfg.model and Path(cfg.model).exists() and Path(cfg.model).resolve() != built_from:
        log.warning("engine %s was exported from %s but engine.model is %s; check they are the same weights", cfg.engine_dir, built_from, cfg.model)
    if importlib.util.find_spec("tensorrt_llm") is not None:
        log.info("TensorRT-LLM is installed, but StreamVG runs the language model in transformers (TensorRT-LLM LLM path not wired yet)")
    from streamvg.grounding.hf import GemVGEngine

    engine = GemVGEngine(cfg, vision_encoder=encoder)
    hf_model = getattr(engine, "model", None)
    if hf_model is not None:
        use_static_cache(hf_model)
    return engine


def use_static_cache(model: Any) -> bool:
    """Make `generate()` use a static KV cache, which transformers compiles on CUDA.

    With `cache_implementation="static"` transformers runs the decode step through
    `torch.compile` (CUDA graphs) on GPU; the first batch of each shape pays the compile.
    Returns whether the setting was applied (only for CUDA models with a generation config).
    """
    gen = getattr(model, "generation_config", None)
    device = getattr(model, "device", None)
    if gen is None or device is None or torch.device(device).type != "cuda":
        return False
    gen.cache_implementation = "static"
    return True
