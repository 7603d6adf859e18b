"""A bounded, append-only on-disk queue of event payloads, replayed in order.

Layout of a spool folder:

```
seg-000000000001.log   records: [u32 length][u32 crc32][payload], little-endian
seg-000000000002.log   ... (a new segment every `segment_bytes`)
cursor                 {"seq": S, "offset": O, "index": I}: first record not yet delivered
lock                   flock'd by the process that owns the spool
```

Appends are buffered and fsync'd every `fsync_every` records (and on `sync()` / `close()`),
so a crash loses at most the last unsynced batch, never a synced one. Delivery is
"peek, send, commit": a crash between sending and committing replays those records again
(at-least-once; consumers drop duplicates by `event_id`). When the spool would exceed
`max_bytes`, the oldest segment is dropped and its undelivered records are counted in
`dropped` and logged, never silently. A torn record at the end of a segment (a crash in
the middle of a write) is cut off when the spool is opened.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import struct
import threading
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from streamvg.errors import PublishError

__all__ = ["Spool", "SpoolPosition"]

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<II")


@dataclass
class _Segment:
    seq: int
    path: Path
    size: int
    count: int


@dataclass(frozen=True)
class SpoolPosition:
    """Where the spool's next undelivered record starts (returned by `peek`, given to `commit`)."""

    seq: int
    offset: int
    index: int


class Spool:
    """Bounded append-only on-disk FIFO of byte payloads; thread-safe.

    Args:
        directory: Folder of the spool (created). One process owns it at a time.
        max_bytes: Cap on the spool's disk use; beyond it the oldest segment's records are
            dropped and counted. Larger keeps more history through a long outage.
        segment_bytes: Size at which a new segment file starts (default `max_bytes / 8`,
            at least 4 KiB); dropping happens a segment at a time.
        fsync_every: Records appended between fsyncs; lower is safer against power loss,
            higher is faster.

    Raises:
        PublishError: the folder cannot be created or another process holds it.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int = 256 * 1024 * 1024,
        segment_bytes: int | None = None,
        fsync_every: int = 256,
    ) -> None:
        if max_bytes < 1024:
            raise ValueError(f"spool max_bytes must be at least 1024, got {max_bytes}")
        self.directory = Path(directory)
        self.max_bytes = int(max_bytes)
        self.segment_bytes = int(segment_bytes or max(self.max_bytes // 8, 4096))
        self.fsync_every = max(1, int(fsync_every))
        self.dropped = 0
        self._lock = threading.RLock()
        self._unsynced = 0
        self._closed = False
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lockf = open(self.directory / "lock", "a+b")  # noqa: SIM115 (held for life)
        except OSError as exc:
            raise PublishError(
                f"spool folder {self.directory} cannot be created or written ({exc.strerror}); "
                "give a writable spool_dir"
            ) from exc
        try:
            fcntl.flock(self._lockf.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lockf.close()
            raise PublishError(
                f"spool folder {self.directory} is in use by another StreamVG process; "
                "give each running pipeline its own spool_dir"
            ) from exc
        self._segments: deque[_Segment] = deque()
        self._head = SpoolPosition(0, 0, 0)
        self._open_existing()
        self._wf: IO[bytes] | None = None
        self._new_segment()

    # --- opening -------------------------------------------------------------------

    def _open_existing(self) -> None:
        paths = sorted(self.directory.glob("seg-*.log"))
        for p in paths:
            try:
                seq = int(p.stem.split("-")[1])
            except (IndexError, ValueError):
                continue
            size, count = self._scan(p)
            if count == 0:
                p.unlink(missing_ok=True)
                continue
            self._segments.append(_Segment(seq, p, size, count))
        cursor = self._read_cursor()
        if self._segments:
            first = self._segments[0]
            head = SpoolPosition(first.seq, 0, 0)
            if cursor is not None:
                # Segments before the cursor's are fully delivered.
                while self._segments and self._segments[0].seq < cursor.seq:
                    self._segments.popleft().path.unlink(missing_ok=True)
                if self._segments and self._segments[0].seq == cursor.seq:
                    seg = self._segments[0]
                    if cursor.offset <= seg.size and cursor.index <= seg.count:
                        head = cursor
                    else:
                        head = SpoolPosition(seg.seq, 0, 0)
                elif self._segments:
                    head = SpoolPosition(self._segments[0].seq, 0, 0)
            self._head = head
            n = len(self)
            if n:
                log.info("spool %s holds %d undelivered events from an earlier run", self.directory, n)

    @staticmethod
    def _scan(path: Path) -> tuple[int, int]:
        """Count valid records; cut off a torn or corrupt tail. Returns (size, count)."""
        data = path.read_bytes()
        pos = count = 0
        n = len(data)
        while pos + _HEADER.size <= n:
            length, crc = _HEADER.unpack_from(data, pos)
            end = pos + _HEADER.size + length
            if end > n or zlib.crc32(data[pos + _HEADER.size : end]) != crc:
                break
            pos = end
            count += 1
        if pos != n:
            log.warning("spool segment %s: cut %d bytes of a torn or corrupt record", path, n - pos)
            with open(path, "r+b") as f:
                f.truncate(pos)
        return pos, count

    def _read_cursor(self) -> SpoolPosition | None:
        try:
            d = json.loads((self.directory / "cursor").read_text())
            return SpoolPosition(int(d["seq"]), int(d["offset"]), int(d["index"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_cursor(self) -> None:
        tmp = self.directory / "cursor.tmp"
        h = self._head
        tmp.write_text(json.dumps({"seq": h.seq, "offset": h.offset, "index": h.index}))
        os.replace(tmp, self.directory / "cursor")

    def _new_segment(self) -> None:
        if self._wf is not None:
            self._wf.flush()
            os.fsync(self._wf.fileno())
            self._wf.close()
            self._unsynced = 0
        seq = (self._segments[-1].seq + 1) if self._segments else max(self._head.seq + 1, 1)
        path = self.directory / f"seg-{seq:012d}.log"
        self._wf = open(path, "ab")  # noqa: SIM115 (closed on rotation / close)
        self._segments.append(_Segment(seq, path, 0, 0))
        if len(self._segments) == 1:
            self._head = SpoolPosition(seq, 0, 0)

    # --- state ---------------------------------------------------------------------

    def __len__(self) -> int:
        """Records not yet delivered."""
        with self._lock:
            if not self._segments:
                return 0
            total = sum(s.count for s in self._segments)
            return total - self._head.index

    @property
    def size_bytes(self) -> int:
        """Bytes on disk in segment files."""
        with self._lock:
            return sum(s.size for s in self._segments)

    # --- writing -------------------------------------------------------------------

    def append(self, payload: bytes) -> None:
        """Add one record at the end."""
        self.extend((payload,))

    def extend(self, payloads: tuple[bytes, ...] | list[bytes]) -> None:
        """Add records at the end, in order; drops the oldest segment(s) if over `max_bytes`."""
        if not payloads:
            return
        with self._lock:
            if self._closed:
                raise PublishError(f"spool {self.directory} is closed")
            for p in payloads:
                tail = self._segments[-1]
                rec = _HEADER.pack(len(p), zlib.crc32(p)) + p
                if tail.size and tail.size + len(rec) > self.segment_bytes:
                    self._new_segment()
                    tail = self._segments[-1]
                assert self._wf is not None
                self._wf.write(rec)
                tail.size += len(rec)
                tail.count += 1
                self._unsynced += 1
                self._enforce_cap()
            if self._unsynced >= self.fsync_every:
                self._sync_locked()

    def _enforce_cap(self) -> None:
        while self.size_bytes > self.max_bytes and len(self._segments) > 1:
            seg = self._segments.popleft()
            lost = seg.count - (self._head.index if seg.seq == self._head.seq else 0)
            seg.path.unlink(missing_ok=True)
            nxt = self._segments[0]
            self._head = SpoolPosition(nxt.seq, 0, 0)
            self.dropped += lost
            self._write_cursor()
            log.warning(
                "spool %s is full (%d bytes cap): dropped the %d oldest undelivered events "
                "(%d dropped so far); raise spool_max_bytes to keep more through an outage",
                self.directory, self.max_bytes, lost, self.dropped,
            )

    def sync(self) -> None:
        """Flush appended records to disk (fsync)."""
        with self._lock:
            self._sync_locked()

    def _sync_locked(self) -> None:
        if self._wf is not None and self._unsynced:
            self._wf.flush()
            os.fsync(self._wf.fileno())
            self._unsynced = 0

    # --- reading -------------------------------------------------------------------

    def peek(self, max_records: int = 256, max_bytes: int = 1 << 20) -> tuple[list[bytes], SpoolPosition]:
        """The oldest undelivered records (in order) and the position after them.

        Nothing is removed until `commit(position)`.
        """
        with self._lock:
            out: list[bytes] = []
            if not self._segments or len(self) == 0:
                return out, self._head
            if self._wf is not None:
                self._wf.flush()
            # Skip fully read leading segments.
            pos = self._head
            seg_i = 0
            while seg_i < len(self._segments) and self._segments[seg_i].seq != pos.seq:
                seg_i += 1
            seg = self._segments[seg_i]
            if pos.index >= seg.count and seg_i + 1 < len(self._segments):
                seg = self._segments[seg_i + 1]
                pos = SpoolPosition(seg.seq, 0, 0)
            total = 0
            with open(seg.path, "rb") as f:
                f.seek(pos.offset)
                data = f.read(max(max_bytes, 1) + 64 * 1024)
            off = 0
            idx = pos.index
            while idx < seg.count and len(out) < max_records and off + _HEADER.size <= len(data):
                length, _crc = _HEADER.unpack_from(data, off)
                end = off + _HEADER.size + length
                if end > len(data):
                    if not out:  # one record larger than the read: read it whole
                        with open(seg.path, "rb") as f:
                            f.seek(pos.offset + off + _HEADER.size)
                            out.append(f.read(length))
                        off = end
                        idx += 1
                    break
                out.append(data[off + _HEADER.size : end])
                total += length
                off = end
                idx += 1
                if total >= max_bytes:
                    break
            return out, SpoolPosition(seg.seq, pos.offset + off, idx)

    def commit(self, position: SpoolPosition) -> None:
        """Mark everything before `position` (from `peek`) delivered; deletes finished segments."""
        with self._lock:
            if not self._segments or position.seq < self._segments[0].seq:
                return  # those records were dropped meanwhile
            while self._segments and self._segments[0].seq < position.seq:
                self._segments.popleft().path.unlink(missing_ok=True)
            self._head = position
            seg = self._segments[0]
            if position.index >= seg.count:
                if len(self._segments) > 1:
                    self._segments.popleft().path.unlink(missing_ok=True)
                    self._head = SpoolPosition(self._segments[0].seq, 0, 0)
                else:
                    # Everything delivered: start a fresh segment, delete the old one.
                    old = seg
                    self._new_segment()
                    self._segments.remove(old)
                    old.path.unlink(missing_ok=True)
                    self._head = SpoolPosition(self._segments[0].seq, 0, 0)
            self._write_cursor()

    def close(self) -> None:
        """fsync and release the folder (undelivered records stay for the next run)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._wf is not None:
                self._sync_locked()
                self._wf.close()
                self._wf = None
            # Drop an empty tail segment so the folder stays tidy.
            for seg in list(self._segments):
                if seg.count == 0:
                    seg.path.unlink(missing_ok=True)
                    self._segments.remove(seg)
            if len(self) == 0:
                (self.directory / "cursor").unlink(missing_ok=True)
            fcntl.flock(self._lockf.fileno(), fcntl.LOCK_UN)
            self._lockf.close()
