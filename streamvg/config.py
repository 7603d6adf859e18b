"""The pipeline file (YAML) as pydantic models, with `STREAMVG_…` environment overrides.

A pipeline file names its sources, how frames are sampled into windows, the standing
queries, the grounding engine, the tracker and the sinks:

```yaml
name: lobby
sources:
  - {name: door, uri: "rtsp://viewer:${CAM_PASSWORD}@10.0.0.5/stream1"}
sampling: {fps: 1.0, window_size: 4, stride: 2}
queries:
  - {id: vest, text: "the man in the yellow vest"}
engine: {kind: gemvg, model: /models/gem-vg-7b}
sinks: {redis: {url: "redis://localhost:6379/0"}}
```

`${VAR}` in string values is replaced from the environment (so passwords stay out of the
file). Any field can also be overridden by an environment variable named
`STREAMVG_<SECTION>__<FIELD>` (for example `STREAMVG_SINKS__REDIS__URL` or
`STREAMVG_ENGINE__MODEL`), merged field by field: the environment wins over the file and
over a command's defaults, a flag given on the command line wins over the environment
(`env_overrides`, `merge_config_data`).

`load_pipeline(path)` returns a `PipelineConfig` or raises `ConfigError` with one line
naming the field (`sources[1].uri: …`).
"""

from __future__ import annotations

import difflib
import json
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from streamvg.errors import ConfigError
from streamvg.redaction import mask_url, remember_secret, remember_url_secret

__all__ = [
    "ControlConfig",
    "EngineConfig",
    "GatingConfig",
    "IdentityConfig",
    "JsonlSinkConfig",
    "MetricsConfig",
    "MqttSinkConfig",
    "PipelineConfig",
    "QueryConfig",
    "RedisSinkConfig",
    "SamplingConfig",
    "ScaleoutConfig",
    "SinksConfig",
    "SourceConfig",
    "TrackerConfig",
    "env_overrides",
    "format_validation_error",
    "load_pipeline",
    "merge_config_data",
    "parse_pipeline",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class SourceConfig(_Model):
    """One video file or camera."""

    name: str = Field(description="Camera name used in events and Redis keys (letters, digits, _ . -).")
    uri: str = Field(
        description="File path, rtsp://, rtsps://, http(s)://, tcp://, udp://, .m3u8 URL, "
        "/dev/videoN or a device index."
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Backend options, e.g. {rtsp_transport: tcp} for PyAV or {width: 1280} for OpenCV.",
    )
    start_s: float = Field(
        default=0.0,
        description="Common-clock seconds at this file's first frame (multi-camera files that started at "
        "different moments); multi-camera windows align frames on start_s + media time.",
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"{v!r} is not a valid camera name; use letters, digits, '_', '.' or '-'")
        return v

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("empty; give a file path, a stream URL or a device")
        return v


class SamplingConfig(_Model):
    """How frames are sampled and grouped into windows."""

    fps: float | None = Field(
        default=1.0, gt=0, description="Frames per second sampled from each source (null = every frame)."
    )
    window_size: int = Field(default=4, ge=1, le=32, description="Frames per window (model images per prompt).")
    stride: int = Field(default=2, ge=1, description="Frames the window advances by; < window_size overlaps.")
    snap: Literal["exact", "keyframe"] = Field(
        default="exact",
        description="'exact' decodes the frame at each sample time; 'keyframe' takes the nearest "
        "keyframe within tolerance_s, decoding far less.",
    )
    tolerance_s: float | None = Field(
        default=None, gt=0, description="Keyframe snap / multi-camera alignment tolerance in seconds "
        "(default: half the sampling period)."
    )
    multi_camera: bool = Field(
        default=False,
        description="Ground one frame per camera at the same instant (cross-camera queries) instead of "
        "one camera over time.",
    )
    max_frame_pixels: int | None = Field(
        default=3840 * 2160, ge=1,
        description="Frames with more pixels are downscaled on decode to at most this many, aspect kept "
        "(files, streams, devices; null = never). The default is 4K UHD (8.3 Mpx).",
    )

    @model_validator(mode="after")
    def _stride_le_size(self) -> SamplingConfig:
        if self.stride > self.window_size:
            raise ValueError(
                f"stride ({self.stride}) is larger than window_size ({self.window_size}), "
                "so frames would be skipped; use stride <= window_size"
            )
        return self


class QueryConfig(_Model):
    """A standing query asked of every window."""

    id: str = Field(description="Short stable id used in events (letters, digits, _ . -).")
    text: str = Field(min_length=1, description="The natural-language question.")
    mode: Literal["direct", "reason"] = Field(default="direct", description="'reason' thinks before answering.")
    min_score: float = Field(default=0.0, ge=0, le=1, description="Drop boxes scoring below this.")

    @field_validator("id")
    @classmethod
    def _check_id(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"{v!r} is not a valid query id; use letters, digits, '_', '.' or '-'")
        return v


class EngineConfig(_Model):
    """The grounding engine."""

    kind: Literal["gemvg", "gemvg-trt", "replay", "openai"] = Field(
        default="gemvg",
        description="'gemvg' (transformers), 'gemvg-trt' (TensorRT vision encoder), 'replay' "
        "(stored groundings, no model), 'openai' (remote OpenAI-compatible server).",
    )
    model: str | None = Field(default=None, description="Model directory or hub id (gemvg, gemvg-trt, openai).")
    device: str = Field(default="auto", description="'auto' (cuda if present, else cpu), 'cpu', 'cuda', 'cuda:1'.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="'auto' is bfloat16 on GPU, float32 on CPU."
    )
    convention: Literal["auto", "qwen2_vl", "qwen2_5_vl"] = Field(
        default="auto", description="Box convention; 'auto' reads model_type from the model's config.json."
    )
    min_pixels: int | None = Field(
        default=None, gt=0,
        description="Smallest model input per image, in pixels; default: the checkpoint's preprocessor_config.json "
        "(56*56 for the openai kind).",
    )
    max_pixels: int | None = Field(
        default=None, gt=0,
        description="Largest model input per image, in pixels; default: the checkpoint's preprocessor_config.json "
        "(Qwen2.5-VL ships 12845056; 448*448 for the openai kind). Fewer pixels: fewer visual tokens, faster, "
        "small objects missed.",
    )
    batch_size: int = Field(default=4, ge=1, description="Windows grounded together in one batch.")
    max_new_tokens: int = Field(default=256, ge=1, description="Answer length cap, in tokens.")
    add_vision_id: bool | None = Field(
        default=None,
        description="Label images 'Picture k:' in the prompt; default: the processor's (off, as in Qwen's and "
        "Migician's reference inference). On can help multi-image answers name their image (gemvg, gemvg-trt).",
    )
    cache_bytes: int = Field(
        default=512 * 1024 * 1024, ge=0,
        description="Visual-token cache budget in bytes (0 disables it); frames shared by overlapping windows "
        "are encoded once (gemvg, gemvg-trt).",
    )
    cache_key: Literal["content", "frame"] = Field(
        default="content",
        description="'content' hashes the pixels (never another frame's tokens, ~1 ms per MB of frame); 'frame' "
        "keys by (camera, index, pts, size), free but wrong when a name is reused (a restarted producer).",
    )
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = Field(
        default="sdpa",
        description="Attention kernel: 'sdpa' (PyTorch), 'flash_attention_2' (needs the flash-attn package and "
        "a GPU; Qwen2.5-VL's windowed vision attention then runs as one varlen call), 'eager'.",
    )
    device_map: str | None = Field(
        default=None,
        description="transformers device_map ('auto' spreads a model over several GPUs); overrides device.",
    )
    replay_path: str | None = Field(default=None, description="Groundings JSONL for kind 'replay'.")
    replay_latency_s: float = Field(
        default=0.0, ge=0, description="Simulated model time per batch for kind 'replay', seconds (capacity drills)."
    )
    engine_dir: str | None = Field(default=None, description="Built TensorRT engine folder for kind 'gemvg-trt'.")
    base_url: str | None = Field(default=None, description="OpenAI-compatible endpoint for kind 'openai'.")
    api_key: str | None = Field(default=None, description="API key for kind 'openai' (never logged).")
    timeout_s: float = Field(default=60.0, gt=0, description="Remote request timeout in seconds (openai).")
    retries: int = Field(
        default=3, ge=0, le=10,
        description="Retries of a remote request after HTTP 5xx/429, a timeout or a dropped connection, "
        "with exponential backoff (openai).",
    )
    concurrency: int = Field(
        default=4, ge=1, le=256,
        description="Remote requests in flight at once (openai); more keeps a batching server busy.",
    )
    max_consecutive_failures: int | None = Field(
        default=None, ge=0,
        description="Windows in a row whose grounding may fail (engine raised: model server down, out of "
        "memory) before the run stops; failed windows are skipped and counted. 0: never stop. Default: 5 "
        "when every source is a file, never when any is live (grounding resumes when the engine recovers).",
    )

    @model_validator(mode="after")
    def _check_kind(self) -> EngineConfig:
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) is larger than max_pixels ({self.max_pixels})")
        if self.kind == "replay" and not self.replay_path:
            raise ValueError("kind 'replay' needs replay_path (a groundings JSONL file)")
        if self.kind == "openai" and not self.base_url:
            raise ValueError("kind 'openai' needs base_url (e.g. http://localhost:8000/v1)")
        return self


class TrackerConfig(_Model):
    """Time-aware tracker settings, in media seconds, hits and box sizes, so they hold at any rate.

    The same defaults work from 30 updates per second down to 1 (an MLLM grounding a camera):
    motion is predicted by elapsed seconds and matches are gated by how far the prediction
    can be off after that long, not by box overlap alone. See `streamvg.tracking.Tracker`.
    """

    high_score: float = Field(default=0.5, ge=0, le=1, description="Boxes at or above this score extend confirmed tracks first and may start new tracks; raising it avoids tracks from doubtful boxes but starts real ones later.")
    low_score: float = Field(default=0.1, ge=0, le=1, description="Boxes scoring from low_score up to high_score only extend existing confirmed tracks (ByteTrack's second stage); boxes below are ignored.")
    min_confirm_hits: int = Field(default=2, ge=1, description="Matched updates before a track is confirmed, gets an id and is reported; higher removes flicker from false boxes but delays new ids (at 1 update/s, by a second per hit).")
    confirm_s: float = Field(default=0.1, ge=0, description="Seconds of updates a new track must span before it is reported, capped by min_confirm_hits: at high rates a stray box has to repeat, while at grounding rates (updates sparser than this) a track reports from its first box, since waiting for a second would hide every real object for a whole update interval. 0 always waits for min_confirm_hits.")
    max_lost_s: float = Field(default=3.0, gt=0, description="Media seconds a confirmed track survives without a match; longer bridges occlusions and missed answers but risks handing the id to another object.")
    max_missed_updates: int = Field(default=15, ge=1, description="Updates in a row a confirmed track may miss before it ends, whichever comes first with max_lost_s: at high rates that many misses show the object is gone (15 at 25 updates/s is 0.6 s) and its widening gate would take a passer-by's box; at grounding rates max_lost_s decides (15 updates at 2/s are 7.5 s).")
    gate_sigmas: float = Field(default=4.0, gt=0, description="Largest distance of a box from a track's predicted box (centre and size together), in standard deviations of the prediction; the allowance widens by itself with the seconds since the track was seen. Higher re-finds fast movers, lower confuses neighbours less.")
    min_iou: float = Field(default=0.3, ge=0, le=1, description="Overlap with the predicted box that allows a match even outside the gate (sudden size changes at high rates); 1 disables it.")
    recover_iou: float = Field(default=0.3, ge=0, le=1, description="Overlap with where a confirmed track was last seen that re-finds it when the motion prediction misses (a bounce off the frame edge, a sudden stop); lower re-finds more but may swap neighbours, 1 disables.")
    iou_weight: float = Field(default=4.0, ge=0, description="How much overlap with the prediction favours a match, against the gate's distance (squared standard deviations); 0 matches by motion alone.")
    measurement_noise: float = Field(default=0.08, gt=0, le=1, description="Expected error (one standard deviation) of a box's centre and size, as a fraction of the box's width or height; higher smooths noisy boxes but follows real turns later.")
    velocity_change: float = Field(default=1.0, gt=0, description="How much an object's velocity may change within one second, in box sizes per second (one standard deviation); higher follows sudden turns, lower keeps neighbours apart.")
    initial_speed: float = Field(default=1.5, gt=0, description="Speed a new object may have, in box sizes per second (one standard deviation); sets how far from its first box a track is found at its second sighting.")
    velocity_memory_s: float = Field(default=2.0, gt=0, description="Seconds over which a track's velocity is forgotten while it is predicted; bounds the travel guessed over a long gap (at most speed × this).")

    @model_validator(mode="after")
    def _check_scores(self) -> TrackerConfig:
        if self.low_score > self.high_score:
            raise ValueError(
                f"low_score must be at most high_score (= {self.high_score}); the value given is {self.low_score}"
            )
        return self


class IdentityConfig(_Model):
    """Cross-camera identity: one `global_id` for the same object across cameras (`streamvg.identity`).

    Needs `sampling.multi_camera` (windows of one frame per camera at one instant). Per-camera
    track ids and events stay as they are; track events gain `global_id`. Links come from the
    model's own multi-image answers and need several agreeing windows, so one bad answer does
    not merge two people; two tracks seen at the same time in one camera are never one identity.
    """

    one_referent: list[str] = Field(
        default_factory=list,
        description="Ids of queries that name one object ('the man in the yellow vest'; '*' = every "
        "query): their boxes in different cameras of one window are that object, linked at no extra "
        "model cost. Other queries are linked by correspondence requests.",
    )
    correspondence: bool = Field(
        default=True,
        description="Ask the model which box in the other cameras is the same object as a track's box "
        "(one extra request per asked track and window) for queries with several targets.",
    )
    max_requests_per_window: int = Field(
        default=4, ge=0,
        description="Correspondence requests at most per multi-camera window and query; more links "
        "faster but costs model time (one generate() each).",
    )
    ask_every_s: float = Field(
        default=0.0, ge=0,
        description="Media seconds between two correspondence requests about the same track; 0 asks in "
        "every window (subject to max_requests_per_window).",
    )
    min_agree: int = Field(
        default=3, ge=1,
        description="Agreeing windows before two tracks are linked; higher resists wrong answers but links later.",
    )
    max_contradiction: float = Field(
        default=0.5, ge=0, le=1,
        description="A link holds while contradicting votes are at most this fraction of agreeing ones; "
        "beyond it the link is undone.",
    )
    match_iou: float = Field(
        default=0.3, gt=0, le=1,
        description="Overlap an answered box needs with a tracked box to count as pointing at that track.",
    )

class GatingConfig(_Model):
    """Change gating: windows in which nothing changed are not sent to the engine.

    Each sampled frame is compared with the last frame of its camera that was grounded
    (downscaled to `width` pixels, grayscale, brightness and contrast matched to the
    reference so slow lighting drift and auto-exposure do not count); a cell counts as
    changed when it differs by more than `pixel_threshold` gray levels, and a frame as
    changed when more than `min_changed_fraction` of its cells did. A window none of whose
    new frames changed is carried over: trackers hold their tracks, grounding events repeat
    the last answer with `carried_over: true`. See `streamvg.gating`.
    """

    enabled: bool | Literal["auto"] = Field(
        default="auto",
        description="true, false, or 'auto': on for model engines (gemvg, gemvg-trt, openai), off for "
        "replay, whose stored answers cost nothing and are ground truth for each frame.",
    )
    max_unchanged_s: float = Field(
        default=30.0, gt=0,
        description="Ground a window anyway once this many media seconds passed since the camera was last "
        "grounded; lower catches what the change measure misses sooner, higher saves more model work.",
    )
    pixel_threshold: float = Field(
        default=12.0, gt=0, le=255,
        description="Gray levels (0-255) by which a downscaled cell must differ from the reference to count "
        "as changed; lower sees fainter changes but lets sensor noise and compression flicker through.",
    )
    min_changed_fraction: float = Field(
        default=0.001, gt=0, le=1,
        description="Fraction of cells that must change for a frame to count as changed (0.001 of a 160x90 "
        "image is 14 cells, a 24-pixel object in a 640-wide frame); lower sees smaller objects, higher "
        "ignores more clutter.",
    )
    width: int = Field(
        default=160, ge=16, le=1920,
        description="Width in pixels frames are downscaled to before comparing; larger sees smaller objects "
        "but costs more CPU per frame (160 is about 0.1 ms).",
    )

    def active(self, engine_kind: str) -> bool:
        """Whether gating runs for an engine of kind `engine_kind`."""
        return engine_kind != "replay" if self.enabled == "auto" else bool(self.enabled)


class RedisSinkConfig(_Model):
    """Publish events to Redis Streams + pub/sub."""

    url: str = Field(description="redis://[user:password@]host:port/db or rediss:// for TLS.")
    stream: str | None = Field(default=None, description="Stream key; default streamvg:{pipeline}:events.")
    maxlen: int = Field(default=100_000, ge=1, description="Approximate stream length cap (XADD MAXLEN ~).")
    spool_dir: str = Field(default=".streamvg-spool", description="On-disk spool used while Redis is unreachable.")
    spool_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024, description="Spool size cap; oldest events dropped (and counted) beyond it.")


class JsonlSinkConfig(_Model):
    """Write events as JSON lines."""

    path: str = Field(default="streamvg-events.jsonl", description="File to append events to ('-' = stdout).")
    fsync: bool = Field(
        default=False, description="fsync every written batch: survives a power cut, costs a disk flush per batch "
        "(a killed process loses at most the last batch either way)."
    )


class MqttSinkConfig(_Model):
    """Publish events to an MQTT broker (Home Assistant, Frigate, Node-RED)."""

    url: str = Field(description="mqtt://[user:password@]host:1883, or mqtts:// for TLS.")
    topic: str = Field(default="streamvg/{pipeline}/events", description="Topic template: {pipeline}, {camera}, {kind}, {query_id}.")
    qos: int = Field(default=1, ge=0, le=2, description="0 (fire and forget), 1 (acknowledged, at least once) or 2.")
    retain: bool = Field(default=False, description="Broker keeps the last event per topic for new subscribers.")
    client_id: str | None = Field(default=None, description="MQTT client id; default streamvg-{pipeline}-{random}.")
    spool_dir: str = Field(default=".streamvg-spool", description="On-disk spool (folder mqtt/{pipeline} inside it).")
    spool_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1024, description="Spool size cap; oldest events dropped (and counted) beyond it.")


class SinksConfig(_Model):
    """Where events go. Without a Redis URL the embedded default writes JSONL."""

    redis: RedisSinkConfig | None = Field(default=None, description="Redis Streams + pub/sub sink.")
    jsonl: JsonlSinkConfig | None = Field(default=None, description="JSON-lines sink.")
    mqtt: MqttSinkConfig | None = Field(default=None, description="MQTT sink.")


class ControlConfig(_Model):
    """Limits on the control stream `streamvg:{pipeline}:control` (`streamvg query add`), so a
    hostile or careless command cannot stall the pipeline or blow up every event. A command
    beyond a limit is rejected with one log line and removed from the stream."""

    max_command_bytes: int = Field(
        default=64 * 1024, ge=256, description="Largest control command accepted, in bytes of JSON."
    )
    max_query_chars: int = Field(
        default=1000, ge=1, description="Longest query text a control command may add, in characters "
        "(every event of the query carries it)."
    )
    max_queries: int = Field(
        default=100, ge=1, description="Standing queries at most; an add beyond it is rejected "
        "(each query multiplies the engine's work per window)."
    )


class ScaleoutConfig(_Model):
    """Scale-out roles (`streamvg monitor --role ingest|ground`): leases, limits, buffers.

    A camera is leased to one ground worker; the lease is renewed by a heartbeat thread
    every `heartbeat_s`, however long grounding takes, and moves to another worker
    `lease_s` after its owner stopped renewing (died, froze, lost Redis).
    """

    lease_s: float = Field(default=5.0, gt=0, description="Seconds a camera stays with a worker that stopped renewing its lease; shorter moves a dead worker's cameras sooner but a worker paused longer than this (GC, swap, SIGSTOP) loses them.")
    heartbeat_s: float | None = Field(default=None, gt=0, description="Seconds between lease renewals (default lease_s / 3); must be below lease_s.")
    max_window_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, description="Largest work entry (a window's JPEG frames and metadata) a ground worker decodes, in bytes; larger ones are dead-lettered.")
    max_frame_pixels: int = Field(default=4096 * 4096, ge=64 * 64, description="Largest frame (width × height, read from the JPEG header before decoding) a ground worker decodes; larger windows are dead-lettered.")
    max_state_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, description="Largest saved tracker state, inflated, in bytes (checked against the archive's declared sizes before inflating); larger states are dead-lettered and the camera's tracks restart clean.")
    buffer_windows: int = Field(default=256, ge=1, description="Windows per camera the ingest role keeps in memory while Redis is unreachable; live cameras then drop their stalest (counted), files wait.")
    max_backlog: int = Field(default=1000, ge=1, description="Windows a camera's work stream may hold: live cameras drop their stalest beyond it (counted), files wait for the ground workers.")
    jpeg_quality: int = Field(default=90, ge=10, le=100, description="JPEG quality of frames on the work streams.")

    @model_validator(mode="after")
    def _check_heartbeat(self) -> ScaleoutConfig:
        if self.heartbeat_s is not None and self.heartbeat_s >= self.lease_s:
            raise ValueError(
                f"heartbeat_s must be below lease_s (= {self.lease_s}), or leases expire between renewals; "
                f"the value given is {self.heartbeat_s}"
            )
        return self

    @property
    def heartbeat_interval_s(self) -> float:
        return self.heartbeat_s if self.heartbeat_s is not None else self.lease_s / 3.0


class MetricsConfig(_Model):
    """The Prometheus endpoint (served when `--metrics-port` is given)."""

    address: str = Field(default="127.0.0.1", description="Address the metrics port binds: 127.0.0.1 (this host only) or 0.0.0.0 (every interface; containers, whose probes and scrapers come from outside).")


class PipelineConfig(BaseSettings):
    """A whole pipeline file. Environment variables `STREAMVG_<SECTION>__<FIELD>` override it."""

    model_config = SettingsConfigDict(
        env_prefix="STREAMVG_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    name: str = Field(default="default", description="Pipeline name; Redis keys are streamvg:{name}:….")
    sources: list[SourceConfig] = Field(default_factory=list, description="Video files and cameras.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    queries: list[QueryConfig] = Field(default_factory=list, description="Standing queries.")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    tracker: TrackerConfig = Field(default_factory=TrackerConfig)
    sinks: SinksConfig = Field(default_factory=SinksConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    scaleout: ScaleoutConfig = Field(default_factory=ScaleoutConfig, description="Scale-out roles: leases, limits, buffers.")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Prometheus endpoint.")
    identity: IdentityConfig | None = Field(
        default=None, description="Cross-camera identities (global_id); off when absent."
    )
    gating: GatingConfig = Field(default_factory=GatingConfig, description="Skip windows in which nothing changed.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment is merged by parse_pipeline / merge_config_data, field by field and
        # under the command line's flags; reading it here as well would put it above them.
        return (init_settings,)

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"{v!r} is not a valid pipeline name; use letters, digits, '_', '.' or '-'")
        return v

    @model_validator(mode="after")
    def _remember_secrets(self) -> PipelineConfig:
        # Every password of the file is masked by value from now on, wherever it shows up
        # (a library's message may print it in a form the URL masking cannot recognise).
        for src in self.sources:
            remember_url_secret(src.uri)
        if self.sinks.redis is not None:
            remember_url_secret(self.sinks.redis.url)
        if self.engine.base_url:
            remember_url_secret(self.engine.base_url)
        if self.engine.api_key:
            remember_secret(self.engine.api_key)
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> PipelineConfig:
        for label, names in (("sources", [s.name for s in self.sources]), ("queries", [q.id for q in self.queries])):
            seen: set[str] = set()
            for n in names:
                if n in seen:
                    raise ValueError(f"{label}: {n!r} appears twice; names must be unique")
                seen.add(n)
        return self

    def masked(self) -> dict[str, Any]:
        """The resolved config as plain data with every password and API key masked."""
        data = self.model_dump(mode="json")
        for src in data["sources"]:
            src["uri"] = mask_url(src["uri"])
        if data["sinks"].get("redis"):
            data["sinks"]["redis"]["url"] = mask_url(data["sinks"]["redis"]["url"])
        if data["sinks"].get("mqtt"):
            data["sinks"]["mqtt"]["url"] = mask_url(data["sinks"]["mqtt"]["url"])
        if data["engine"].get("api_key"):
            data["engine"]["api_key"] = "***"
        if data["engine"].get("base_url"):
            data["engine"]["base_url"] = mask_url(data["engine"]["base_url"])
        return data


def format_validation_error(exc: ValidationError, *, source: str = "pipeline file") -> str:
    """One line per problem, `field.path[1].name: message`, from a pydantic error."""
    lines = []
    for err in exc.errors():
        path = ""
        for part in err["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"
            else:
                path += f".{part}" if path else str(part)
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if err["type"] == "extra_forbidden":
            msg = unknown_field_message(tuple(err["loc"]))
        lines.append(f"{source}: {path or '(top level)'}: {msg}")
    return "\n".join(lines)


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that holds the fields at `loc` (a path of names and list indexes)."""
    model: type[BaseModel] = PipelineConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        sub = _inner_model(field.annotation)
        if sub is None:
            return None
        model = sub
    return model


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    """`SourceConfig` from `list[SourceConfig]`, `RedisSinkConfig | None`, `SamplingConfig`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (list, typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _inner_model(arg)
            if found is not None:
                return found
    return None


def unknown_field_message(loc: tuple[Any, ...]) -> str:
    """"unknown field 'modle'; did you mean 'model'? valid fields: kind, model, …" for a field path."""
    name = str(loc[-1]) if loc else ""
    model = _model_at(loc[:-1])
    if model is None:
        return "unknown field"
    valid = list(model.model_fields)
    near = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return f"unknown field {name!r}{hint}; valid fields: {', '.join(valid)}"


_ENV_PREFIX = "STREAMVG_"


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The `STREAMVG_<SECTION>__<FIELD>` variables as nested pipeline data.

    `STREAMVG_ENGINE__BATCH_SIZE=2` gives `{"engine": {"batch_size": "2"}}` (pydantic turns
    the text into the field's type); `STREAMVG_NAME=lobby` sets a top-level field. A value
    starting with `{` or `[` is read as JSON (`STREAMVG_SINKS__REDIS='{"url": …}'`), `null`
    unsets a field, an empty value is ignored. Variables with no `__` that name no field
    (`STREAMVG_LOG_LEVEL`) are other settings and ignored.

    Raises:
        ConfigError: a variable with `__` names no section or field (with the valid names and
            the nearest one), or its JSON value does not parse.
    """
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    for key in sorted(env):
        if not key.upper().startswith(_ENV_PREFIX) or key.upper() != key:
            continue
        value = env[key]
        if value == "":
            continue
        parts = key[len(_ENV_PREFIX):].lower().split("__")
        nested = len(parts) > 1
        if not nested and parts[0] not in PipelineConfig.model_fields:
            continue
        model: type[BaseModel] | None = PipelineConfig
        for i, part in enumerate(parts):
            if model is None:
                raise ConfigError(f"{key}: {'.'.join(parts[:i])} has no fields under it; drop the __{part.upper()} part", field=".".join(parts))
            if part not in model.model_fields:
                under = f" under {'.'.join(parts[:i])}" if i else ""
                raise ConfigError(f"{key}: {unknown_field_message(tuple(parts[: i + 1]))}{under}", field=".".join(parts))
            model = _inner_model(model.model_fields[part].annotation)
        parsed: Any = value
        if value.lstrip()[:1] in ("{", "["):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{key}: the value starts like JSON but does not parse ({exc.msg}); quote it as JSON or give plain text", field=".".join(parts)) from exc
        elif value == "null":
            parsed = None
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = parsed
    return out


def merge_config_data(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Merge pipeline data field by field, later layers winning (`file, env, flags`).

    Mappings merge key by key at every depth; any other value (a list, a scalar, None)
    replaces what was below it.
    """
    out: dict[str, Any] = {}
    for layer in layers:
        if layer:
            out = _deep_merge(out, layer)
    return out


def _deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(merged.get(k), Mapping):
            merged[k] = _deep_merge(merged[k], v)
        elif isinstance(v, Mapping):
            merged[k] = _deep_merge({}, v)
        else:
            merged[k] = v
    return merged


_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(value: Any, path: str = "") -> Any:
    if isinstance(value, str):

        def _sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(
                f"{path or '(top level)'}: environment variable {name} is not set; export it or write ${{{name}:-default}}",
                field=path,
            )

        return _VAR_RE.sub(_sub, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def parse_pipeline(
    data: Any, *, source: str = "pipeline file", env: bool = True, overrides: Mapping[str, Any] | None = None
) -> PipelineConfig:
    """Validate already-loaded YAML/JSON data; raise `ConfigError` naming the field.

    Args:
        data: The file's data (or a command's defaults).
        source: Named in error messages (the file's path, `streamvg search`).
        env: Merge the `STREAMVG_<SECTION>__<FIELD>` variables over `data` (`env_overrides`).
        overrides: Data merged last, over the environment (flags given on the command line).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (name, sources, queries, …), got {type(data).__name__}")
    data = _expand_env(data)
    data = merge_config_data(data, env_overrides() if env else None, overrides)
    try:
        return PipelineConfig(**data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ConfigError(format_validation_error(exc, source=source), field=loc) from exc


def load_pipeline(path: str | os.PathLike[str]) -> PipelineConfig:
    """Read and validate a pipeline YAML file.

    Raises:
        ConfigError: the file is missing, is not YAML, or a field is invalid; the message
            names the file, the field path and what is expected.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: pipeline file not found; check the path (ready files are in pipelines/)")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid syntax"
        raise ConfigError(f"{p}: not valid YAML{where}: {problem}; fix the file's indentation or quoting") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not a text file; a pipeline file is UTF-8 YAML") from exc
    return parse_pipeline(data, source=str(p))
