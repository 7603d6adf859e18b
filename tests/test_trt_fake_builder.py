"""The TensorRT build logic against FakeTensorRT, a stand-in for the `tensorrt` module.

TensorRT cannot run here (no GPU, no package), so this fake, named as such, records the
builder calls. Its parser reads the real exported ONNX (input names and shapes), so the
test checks what `build_engine` asks TensorRT for: precision flags, workspace, one
optimisation profile per build-config entry with min/opt/max on the patch axis (and N/4 on
the token axis), the timing cache, the plan file and its reuse by cache key. On a GPU
machine `tests/test_trt.py` builds with the real TensorRT.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from test_onnx_export import save_tiny_model

import streamvg.grounding.trt as trt_mod
from streamvg.errors import GroundingError
from streamvg.grounding.onnx_export import export_vision_onnx, read_build_config


class _Enum:
    def __init__(self, **members: Any) -> None:
        self.__dict__.update(members)


class FakeTensorRT(types.ModuleType):
    """Records what build_engine asks of TensorRT; not TensorRT."""

    def __init__(self, version: str = "10.3.0", parse_ok: bool = True) -> None:
        super().__init__("tensorrt")
        fake = self
        self.__version__ = version
        self.builders: list[Any] = []
        self.parsed: list[str] = []
        self.parse_ok = parse_ok
        self.BuilderFlag = _Enum(FP16="FP16", BF16="BF16")
        self.MemoryPoolType = _Enum(WORKSPACE="WORKSPACE")

        class Logger:
            WARNING = 2

            def __init__(self, level: int) -> None:
                self.level = level

        class Input:
            def __init__(self, name: str, shape: tuple[int, ...]) -> None:
                self.name, self.shape = name, shape

        class Network:
            def __init__(self) -> None:
                self.inputs: list[Input] = []

            @property
            def num_inputs(self) -> int:
                return len(self.inputs)

            def get_input(self, i: int) -> Input:
                return self.inputs[i]

        class OnnxParser:
            def __init__(self, network: Network, logger: Logger) -> None:
                self.network = network
                self.num_errors = 0 if fake.parse_ok else 1

            def parse_from_file(self, path: str) -> bool:
                fake.parsed.append(path)
                model = onnx.load(path, load_external_data=False)
                for inp in model.graph.input:
                    dims = tuple(d.dim_value if d.dim_value else -1 for d in inp.type.tensor_type.shape.dim)
                    self.network.inputs.append(Input(inp.name, dims))
                return fake.parse_ok

            def get_error(self, i: int) -> str:
                return "In node 12 (Where): unsupported"

        class Profile:
            def __init__(self) -> None:
                self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

            def set_shape(self, name: str, lo: tuple[int, ...], opt: tuple[int, ...], hi: tuple[int, ...]) -> None:
                self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

        class TimingCache:
            def __init__(self, data: bytes) -> None:
                self.data = data

            def serialize(self) -> bytes:
                return b"timing:" + self.data

        class Config:
            def __init__(self) -> None:
                self.flags: list[str] = []
                self.pools: dict[str, int] = {}
                self.profiles: list[Profile] = []
                self.cache: TimingCache | None = None

            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                self.pools[pool] = size

            def set_flag(self, flag: str) -> None:
                self.flags.append(flag)

            def add_optimization_profile(self, profile: Profile) -> int:
                self.profiles.append(profile)
                return len(self.profiles) - 1

            def create_timing_cache(self, data: bytes) -> TimingCache:
                return TimingCache(data)

            def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
                self.cache = cache
                return True

            def get_timing_cache(self) -> TimingCache:
                assert self.cache is not None
                return self.cache

        class Builder:
            def __init__(self, logger: Logger) -> None:
                fake.builders.append(self)
                self.config: Config | None = None

            def create_network(self, flags: int) -> Network:
                return Network()

            def create_builder_config(self) -> Config:
                self.config = Config()
                return self.config

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: Network, config: Config) -> bytes:
                return b"PLAN:" + json.dumps([p.shapes for p in config.profiles]).encode()

        self.Logger, self.OnnxParser, self.Builder = Logger, OnnxParser, Builder


@pytest.fixture()
def engine_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fake-trt")
    model_dir = save_tiny_model("qwen2_5_vl", root / "model")
    out = root / "engine"
    export_vision_onnx(model_dir, out, max_pixels=224 * 224, max_images=2, precision="bf16", workspace_gib=2.0)
    return out


def _install(monkeypatch: pytest.MonkeyPatch, fake: FakeTensorRT, gpu: str = "NVIDIA H100 80GB HBM3") -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: gpu)


def test_build_asks_tensorrt_for_the_right_engine(engine_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTensorRT()
    _install(monkeypatch, fake)
    plan = trt_mod.build_engine(engine_dir)
    cfg = read_build_config(engine_dir)
    assert fake.parsed == [str(engine_dir / "vision.onnx")]
    config = fake.builders[0].config
    assert config.flags == ["BF16"]
    assert config.pools == {"WORKSPACE": 2 * (1 << 30)}
    assert len(config.profiles) == 2
    p0, p1 = (p.shapes for p in config.profiles)
    assert p0["pixel_patches"] == ((4, 1176), (256, 1176), (256, 1176))
    assert p1["pixel_patches"] == ((4, 1176), (512, 1176), (512, 1176))
    assert p0["rope_cos"] == ((4, 16), (256, 16), (256, 16))
    assert p1["window_index"] == ((1,), (128,), (128,))
    assert p1["window_scatter"] == ((4,), (512,), (512,)) == p1["image_scatter"]
    # Windows pad to the model's window (56 px / 14 = 4x4 = 16 patches); images to the largest frame (256 patches).
    assert p1["window_gather"] == ((1, 16), (32, 16), (128, 16)) and p1["window_bias"] == p1["window_gather"]
    assert p1["image_gather"] == ((1, 4), (2, 256), (128, 256)) and p0["image_gather"] == ((1, 4), (1, 256), (64, 256))
    assert set(p0) == {"pixel_patches", "rope_cos", "rope_sin", "window_index", "reverse_index", "window_gather", "window_bias",
                       "window_scatter", "image_gather", "image_bias", "image_scatter"}
    # Plan, manifest and timing cache are written under names carrying TensorRT version and GPU.
    key = trt_mod.engine_cache_key(cfg, trt_version="10.3.0", gpu_name="NVIDIA H100 80GB HBM3")
    assert plan == engine_dir / f"vision-{key}.plan" and plan.read_bytes().startswith(b"PLAN:")
    manifest = json.loads(plan.with_suffix(".json").read_text())
    assert manifest["gpu"] == "NVIDIA H100 80GB HBM3" and manifest["tensorrt"] == "10.3.0" and manifest["precision"] == "bf16"
    cache = engine_dir / "timing-10.3.0-nvidia-h100-80gb-hbm3.cache"
    assert cache.read_bytes() == b"timing:"

    # Same model, TensorRT and GPU: the plan is reused, no builder is made.
    assert trt_mod.build_engine(engine_dir) == plan and len(fake.builders) == 1
    # --force rebuilds and feeds the saved timing cache back in.
    assert trt_mod.build_engine(engine_dir, force=True) == plan and len(fake.builders) == 2
    assert fake.builders[1].config.cache.data == b"timing:"
    # fp16 on request: a different plan.
    fp16 = trt_mod.build_engine(engine_dir, precision="fp16")
    assert fp16 != plan and fake.builders[-1].config.flags == ["FP16"]


def test_other_gpu_gets_its_own_plan(engine_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, FakeTensorRT())
    h100 = trt_mod.build_engine(engine_dir)
    _install(monkeypatch, FakeTensorRT(), gpu="NVIDIA L4")
    l4 = trt_mod.build_engine(engine_dir)
    _install(monkeypatch, FakeTensorRT(version="10.5.0"), gpu="NVIDIA L4")
    l4_new_trt = trt_mod.build_engine(engine_dir)
    assert len({h100, l4, l4_new_trt}) == 3 and all(p.is_file() for p in (h100, l4, l4_new_trt))


def test_parse_failure_is_one_sentence(engine_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _install(monkeypatch, FakeTensorRT(parse_ok=False))
    with pytest.raises(GroundingError, match=r"could not parse the ONNX graph \(In node 12 \(Where\): unsupported\)"):
        trt_mod.build_engine(engine_dir)
    assert not list(engine_dir.glob("*.plan"))
