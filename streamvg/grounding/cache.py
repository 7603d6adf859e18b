"""Per-frame visual-token cache: each frame is encoded once, whatever number of windows hold it.

Sliding windows overlap when `stride < window_size` (size 4, stride 1 puts every frame in
four windows). Qwen's ViT encodes each image on its own, so a frame's merged visual tokens
are the same in every window; the engine looks them up here before running the vision
encoder and encodes only the misses. The cache is an LRU bounded by bytes (tensor storage),
so memory stays fixed on an endless camera.

Keys are chosen by the engine (`engine.cache_key`):

- `content` (the default): a BLAKE2b digest of the pixels and the size, so the cache can
  never serve another frame's tokens, whatever the frame is called. A restarted producer, a
  re-run file in a long-lived scale-out worker or two cameras with the same name reuse
  (camera, index, pts), never pixels. Its cost is one pass over the frame (about 1 GB/s:
  a few ms for a 1080p frame, against tens of ms for the image processor's resize and the
  vision encoder; `python benchmarks/cache_key.py` measures both in one run).
- `frame`: `(camera, index, pts, width, height)`, free to compute but right only while a
  frame's name identifies its pixels for the engine's life (one run of one source).

Entries own their memory: the encoder's output for a batch of frames is cloned per frame
(not `torch.split` views), so one surviving entry never pins the whole batch, and
`VisualTokenCache.bytes` is exactly the storage the entries hold.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
import torch

from streamvg.types import Frame

__all__ = ["CacheEntry", "VisualTokenCache", "content_key", "frame_key"]


@dataclass(frozen=True)
class CacheEntry:
    """One frame's merged visual tokens and the grid the processor gave it.

    Attributes:
        tokens: `(t*h*w / merge^2, hidden)` merged visual tokens.
        grid_thw: `(t, h, w)` patch grid; the model input size is `(w * patch, h * patch)`.
    """

    tokens: torch.Tensor
    grid_thw: tuple[int, int, int]

    @classmethod
    def owning(cls, tokens: torch.Tensor, grid_thw: tuple[int, int, int]) -> CacheEntry:
        """An entry holding its own copy of `tokens` (a view into a batch's output would pin it)."""
        return cls(tokens.clone(memory_format=torch.contiguous_format), grid_thw)

    @property
    def nbytes(self) -> int:
        """Bytes of the storage behind `tokens` (the whole storage, so a view is not under-counted)."""
        return int(self.tokens.untyped_storage().nbytes())


def frame_key(frame: Frame) -> tuple[str, int, float, int, int]:
    """`(camera, index, pts, width, height)`: unique for a frame of one source."""
    return (frame.camera, frame.index, round(frame.pts, 6), frame.width, frame.height)


def content_key(frame: Frame) -> str:
    """A BLAKE2b digest of the pixels: right even when frames of unrelated sources share names."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{frame.width}x{frame.height}".encode())
    h.update(np.ascontiguousarray(frame.image).data)
    return h.hexdigest()


class VisualTokenCache:
    """LRU of `CacheEntry` by key, bounded by `max_bytes` of token storage.

    Args:
        max_bytes: Memory budget in bytes; 0 disables the cache (every lookup misses).
            A 7B model's frame at 448x448 is 256 tokens x 3584 x 2 bytes = 1.8 MB, so the
            default 512 MiB holds ~280 frames, plenty for overlapping windows.
    """

    def __init__(self, max_bytes: int = 512 * 1024 * 1024) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, CacheEntry] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get(self, key: Hashable) -> CacheEntry | None:
        """The entry for `key` (marked most recently used), or `None`; counts hits and misses."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: Hashable, entry: CacheEntry) -> None:
        """Store `entry`, evicting least recently used entries beyond `max_bytes`."""
        if self.max_bytes == 0 or entry.nbytes > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.nbytes
        self._entries[key] = entry
        self.bytes += entry.nbytes
        while self.bytes > self.max_bytes and self._entries:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.nbytes
            self.evictions += 1

    def clear(self) -> None:
        """Drop every entry (counters are kept)."""
        self._entries.clear()
        self.bytes = 0
