"""A bounded, append-only on-disk FIFO of byte records that survives crashes and damage.

Layout of a spool folder:

```
seg-000000000001-3f9a1c2e.log   records: [b"SVR1"][u32 length][u32 crc][payload], little-endian
seg-000000000002-77b0d413.log   ... (a new segment every `segment_bytes`; the suffix is random)
cursor                          {"seq", "token", "offset", "dropped"}: a hint, see below
lock                            flock'd by the process that owns the spool
```

* **Framed and checksummed.** Each record carries a magic, its length and a CRC32 of the
  length and the payload. Opening a spool scans every segment; a damaged stretch (a torn
  tail, garbage, flipped bits) loses the records in it alone: the scan resynchronises on
  the next valid record. Every lost record is counted in `dropped_by_reason` and logged
  once per segment with the count.
* **Segments are the source of truth, the cursor a hint.** The cursor names the first
  undelivered record by segment number, the segment's random token and a byte offset. It
  is trusted only when a segment with that number and token exists; otherwise every
  segment is replayed from its start (duplicates, never loss). Records are deleted only
  once delivered (`commit`) or dropped by the size cap, never because of a cursor.
* **Writes go straight to the OS** (`os.write`, no user-space buffer), so a killed
  process loses nothing it appended; `fsync` every `fsync_every` records (and on `sync()`
  / `close()`) bounds what a power loss can take.
* **Never stops its caller.** A full disk, a read-only or vanished folder: the records
  that cannot be written are counted (`"disk"`), one WARNING per episode says so with the
  count, and appends go on as soon as the disk takes them again.
* **Bounded.** Beyond `max_bytes` the oldest segment goes; its undelivered records are
  counted (`"full"`), one WARNING per episode.

Delivery is "peek, send, commit": a crash between sending and committing replays those
records again (at-least-once). The spool knows nothing of events: any sink can use it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import struct
import threading
import zlib
from array import array
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from streamvg.errors import PublishError

__all__ = ["DROP_REASONS", "Spool", "SpoolPosition"]

log = logging.getLogger(__name__)

_MAGIC = b"SVR1"
_HEADER = struct.Struct("<4sII")  # magic, payload length, crc32(length bytes + payload)
_LEN = struct.Struct("<I")
_MAX_RECORD = 1 << 30

#: Why records can be lost: the size cap, a failed write, damage found on disk.
DROP_REASONS = ("full", "disk", "corrupt", "unreadable")


def _crc(payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(_LEN.pack(len(payload))))


def frame(payload: bytes) -> bytes:
    """One record as written on disk."""
    return _HEADER.pack(_MAGIC, len(payload), _crc(payload)) + payload


@dataclass
class _Segment:
    seq: int
    token: str
    path: Path
    size: int = 0  # bytes in the file that belong to good records (the write position)
    starts: array[int] = field(default_factory=lambda: array("Q"))  # record start offsets
    lens: array[int] = field(default_factory=lambda: array("I"))  # payload lengths

    @property
    def count(self) -> int:
        return len(self.starts)


@dataclass(frozen=True)
class SpoolPosition:
    """Where a `peek` ended (give it to `commit`): segment number, byte offset, record index."""

    seq: int
    offset: int
    index: int


def scan_records(data: bytes) -> tuple[list[tuple[int, int]], int]:
    """Valid records in a segment's bytes, resynchronising after damage.

    Returns ([(start, payload_length)], records_lost). A damaged stretch counts as the
    number of record magics inside it, at least one (a record whose magic itself was hit
    leaves no trace to count).
    """
    out: list[tuple[int, int]] = []
    lost = 0
    pos, n = 0, len(data)
    while pos < n:
        good = _valid_at(data, pos)
        if good is not None:
            out.append((pos, good))
            pos += _HEADER.size + good
            continue
        nxt = pos + 1
        while True:
            nxt = data.find(_MAGIC, nxt)
            if nxt < 0:
                nxt = n
                break
            if _valid_at(data, nxt) is not None:
                break
            nxt += 1
        lost += max(1, data.count(_MAGIC, pos, nxt))
        pos = nxt
    return out, lost


def _valid_at(data: bytes, pos: int) -> int | None:
    if pos + _HEADER.size > len(data):
        return None
    magic, length, crc = _HEADER.unpack_from(data, pos)
    if magic != _MAGIC or length > _MAX_RECORD:
        return None
    end = pos + _HEADER.size + length
    if end > len(data):
        return None
    if zlib.crc32(data[pos + _HEADER.size : end], zlib.crc32(data[pos + 4 : pos + 8])) != crc:
        return None
    return int(length)


class Spool:
    """Bounded append-only on-disk FIFO of byte records; thread-safe, crash- and damage-safe.

    Args:
        directory: Folder of the spool (created). One process owns it at a time.
        max_bytes: Cap on the segments' disk use; beyond it the oldest segment's records
            are dropped and counted (`"full"`). Larger keeps more through a long outage.
        segment_bytes: Size at which a new segment file starts (default `max_bytes / 8`,
            at least 4 KiB); the cap drops a segment at a time, so smaller segments drop
            less at once but mean more files.
        fsync_every: Records appended between fsyncs; lower loses less to a power cut,
            higher is faster. (A killed process loses nothing either way.)

    Attributes:
        dropped_by_reason: Records lost by this instance, by reason (`DROP_REASONS`).
        lifetime_dropped: The same, summed over every run of this spool folder (kept in
            the cursor file, with the damage already counted so that a restart does not
            count it again; a lost cursor file starts both afresh).

    Raises:
        PublishError: another process holds the folder. A folder that cannot be created
            or written does not raise: the spool counts what it cannot keep (`"disk"`).

    Example:
        >>> import tempfile
        >>> with Spool(tempfile.mkdtemp()) as sp:
        ...     sp.extend([b"a", b"b"])
        ...     records, pos = sp.peek()
        ...     sp.commit(pos)
        ...     records, len(sp)
        ([b'a', b'b'], 0)
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
        self.dropped_by_reason: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self.lifetime_dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self._lock = threading.RLock()
        self._segments: deque[_Segment] = deque()
        self._head = 0  # record index of the first undelivered record in _segments[0]
        self._total = 0  # records in all segments (delivered part of the head segment included)
        self._bytes = 0
        self._next_seq = 1
        self._wfd: int | None = None  # the tail segment, open for appending
        self._rfd: tuple[int, int] | None = None  # (seq, fd) of the segment being read
        self._unsynced = 0
        self._closed = False
        self._episodes: dict[str, int] = {}  # reason -> records dropped in the open episode
        self._cursor_broken = False
        self._cap_dropped: dict[int, int] = {}  # seq of a segment the cap dropped -> its head then
        self._damage: dict[str, int] = {}  # segment token -> damaged records already counted
        self._lockf: int | None = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lockf = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            self._start_episode("disk", 0, exc)
            return
        try:
            fcntl.flock(self._lockf, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lockf)
            self._lockf = None
            raise PublishError(
                f"spool folder {self.directory} is in use by another StreamVG process; "
                "give each running pipeline its own spool_dir"
            ) from exc
        self._open_existing()

    # --- opening -------------------------------------------------------------------

    def _open_existing(self) -> None:
        legacy = self._read_legacy()
        found: list[tuple[int, str, Path]] = []
        for p in self.directory.glob("seg-*.log"):
            parts = p.stem.split("-")
            if len(parts) != 3 or not parts[1].isdigit():
                continue
            found.append((int(parts[1]), parts[2], p))
        found.sort()
        cursor = self._read_cursor()
        for seq, token, path in found:
            self._next_seq = max(self._next_seq, seq + 1)
            try:
                data = path.read_bytes()
            except OSError as exc:
                # Kept on disk (renamed) for whoever can read it; not counted twice.
                self._lose("unreadable", 1, f"segment {path.name} cannot be read ({exc.strerror})")
                with contextlib.suppress(OSError):
                    path.rename(path.with_suffix(".unreadable"))
                continue
            records, lost = scan_records(data)
            # Damage counted by an earlier run (the cursor remembers it) is not counted twice.
            new = lost - self._damage.get(token, 0)
            if new > 0:
                self._lose("corrupt", new, f"segment {path.name} is damaged; its other records are kept")
            if lost:
                self._damage[token] = max(lost, self._damage.get(token, 0))
            if not records and not lost:
                path.unlink(missing_ok=True)  # an empty file holds nothing
                continue
            seg = _Segment(seq, token, path, size=len(data))
            for start, length in records:
                seg.starts.append(start)
                seg.lens.append(length)
            self._segments.append(seg)
            self._total += seg.count
            self._bytes += seg.size
        if cursor is not None:
            self._next_seq = max(self._next_seq, cursor[0] + 1)
            self._apply_cursor(*cursor)
        if legacy:
            self._adopt_legacy(legacy)
        elif self._segments and (self.directory / "cursor").exists():
            log.warning(
                "spool %s: the cursor file is unreadable; replaying every spooled record from the "
                "start (consumers drop the duplicates by event_id)", self.directory,
            )
        # Drop segments with nothing left to deliver (their records may all be damaged).
        self._trim_head()
        if self._segments or any(self.dropped_by_reason.values()):
            self._write_cursor()
        n = len(self)
        if n:
            log.info("spool %s holds %d undelivered records from an earlier run", self.directory, n)

    def _read_legacy(self) -> list[tuple[Path, list[bytes]]]:
        """Records of segments written before framing (`seg-N.log`: [u32 length][u32
        crc32 of the payload][payload]), from the old cursor on, so an upgrade loses nothing."""
        paths = sorted(p for p in self.directory.glob("seg-*.log") if len(p.stem.split("-")) == 2)
        if not paths:
            return []
        start_seq, start_off = 0, 0
        try:
            d = json.loads((self.directory / "cursor").read_text())
            if "token" not in d:
                start_seq, start_off = int(d["seq"]), int(d["offset"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        out: list[tuple[Path, list[bytes]]] = []
        for p in paths:
            try:
                seq = int(p.stem.split("-")[1])
                data = p.read_bytes()
            except (ValueError, OSError):
                continue
            pos = start_off if seq == start_seq else 0
            if seq < start_seq:
                pos = len(data)  # delivered by the old version
            records: list[bytes] = []
            while pos + 8 <= len(data):
                length, crc = struct.unpack_from("<II", data, pos)
                end = pos + 8 + length
                if end > len(data) or zlib.crc32(data[pos + 8 : end]) != crc:
                    break  # the old format cannot resynchronise: the rest is its torn tail
                records.append(data[pos + 8 : end])
                pos = end
            out.append((p, records))
        return out

    def _adopt_legacy(self, legacy: list[tuple[Path, list[bytes]]]) -> None:
        """Rewrite old-format records as one framed segment ahead of the rest, then delete
        the old files (a crash in between replays them twice, never loses them)."""
        records = [r for _p, rs in legacy for r in rs]
        if records:
            seq = (self._segments[0].seq - 1) if self._segments else self._next_seq
            if seq < 1:  # no number left before the first segment: put them after (rare)
                seq = self._next_seq
            token = secrets.token_hex(4)
            path = self.directory / f"seg-{seq:012d}-{token}.log"
            data = b"".join(frame(r) for r in records)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            seg = _Segment(seq, token, path, size=len(data))
            pos = 0
            for r in records:
                seg.starts.append(pos)
                seg.lens.append(len(r))
                pos += _HEADER.size + len(r)
            if self._segments and seq < self._segments[0].seq:
                self._segments.appendleft(seg)
                self._head = 0  # the old records come first, before the new segment's head
            else:
                self._segments.append(seg)
            self._next_seq = max(self._next_seq, seq + 1)
            self._total += seg.count
            self._bytes += seg.size
            log.info("spool %s: %d records of the previous spool format kept", self.directory, len(records))
        for p, _rs in legacy:
            p.unlink(missing_ok=True)

    def _apply_cursor(self, seq: int, token: str, offset: int) -> None:
        match = next((s for s in self._segments if s.seq == seq and s.token == token), None)
        if match is None:
            if self._segments:
                log.warning(
                    "spool %s: the cursor names segment %d, which is not there; replaying every "
                    "spooled record from the start (consumers drop the duplicates by event_id)",
                    self.directory, seq,
                )
            return
        # The cursor proves everything before it was delivered: earlier segments too.
        while self._segments[0] is not match:
            self._remove_first()
        # First record starting at or after the offset (an offset inside damage, or past a
        # truncated end, moves to the next good record or the end).
        lo, hi = 0, match.count
        while lo < hi:
            mid = (lo + hi) // 2
            if match.starts[mid] < offset:
                lo = mid + 1
            else:
                hi = mid
        self._head = lo

    def _read_cursor(self) -> tuple[int, str, int] | None:
        try:
            d = json.loads((self.directory / "cursor").read_text())
            dropped = d.get("dropped", {})
            for k in DROP_REASONS:
                self.lifetime_dropped[k] = int(dropped.get(k, 0))
            self._damage = {str(k): int(v) for k, v in d.get("damage", {}).items()}
            return int(d["seq"]), str(d["token"]), int(d["offset"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def _write_cursor(self) -> None:
        """Write the hint atomically (no fsync: a stale hint only replays duplicates)."""
        if self._lockf is None:
            return
        if self._segments:
            s = self._segments[0]
            seq, token = s.seq, s.token
            offset = s.starts[self._head] if self._head < s.count else s.size
        else:
            seq, token, offset = self._next_seq - 1, "", 0
        live = {s.token for s in self._segments}
        damage = {k: v for k, v in self._damage.items() if k in live}
        body = json.dumps({"seq": seq, "token": token, "offset": offset, "dropped": self.lifetime_dropped,
                           "damage": damage})
        tmp = self.directory / "cursor.tmp"
        try:
            tmp.write_text(body)
            os.replace(tmp, self.directory / "cursor")
            self._cursor_broken = False
        except OSError as exc:
            if not self._cursor_broken:  # once per episode; the segments stay the truth
                log.warning("spool %s: cannot write the cursor (%s); a restart may replay duplicates",
                            self.directory, exc.strerror)
            self._cursor_broken = True

    # --- losses --------------------------------------------------------------------

    def _lose(self, reason: str, n: int, detail: str) -> None:
        """Count `n` lost records and log it (a one-off loss: damage found on disk)."""
        self.dropped_by_reason[reason] += n
        self.lifetime_dropped[reason] += n
        log.warning("spool %s: %s: %d record(s) lost (%s so far: %d)",
                    self.directory, detail, n, reason, self.dropped_by_reason[reason])

    def _start_episode(self, reason: str, n: int, exc: OSError | None = None) -> None:
        """Count records lost to a lasting condition; log once when the episode starts."""
        self.dropped_by_reason[reason] += n
        self.lifetime_dropped[reason] += n
        if reason in self._episodes:
            self._episodes[reason] += n
            return
        self._episodes[reason] = n
        if reason == "full":
            log.warning(
                "spool %s is full (%d bytes cap): dropping the oldest undelivered records until "
                "Redis takes them (%d dropped now); raise spool_max_bytes to keep more through an outage",
                self.directory, self.max_bytes, n,
            )
        else:
            why = exc.strerror if exc is not None and exc.strerror else str(exc)
            log.warning(
                "spool %s cannot be written (%s): records that do not fit are dropped and counted "
                "(%d so far); free space under spool_dir or make it writable", self.directory, why, n,
            )

    def _end_episode(self, reason: str, *, closing: bool = False) -> None:
        n = self._episodes.pop(reason, None)
        if n is not None:
            what = "full" if reason == "full" else "unwritable"
            if closing:
                log.warning("spool %s closed while %s; %d record(s) were dropped meanwhile",
                            self.directory, what, n)
            else:
                log.warning("spool %s is no longer %s; %d record(s) were dropped while it was",
                            self.directory, what, n)

    # --- state ---------------------------------------------------------------------

    def __len__(self) -> int:
        """Records not yet delivered."""
        with self._lock:
            return self._total - self._head

    @property
    def dropped(self) -> int:
        """Records this instance lost, all reasons together."""
        return sum(self.dropped_by_reason.values())

    @property
    def size_bytes(self) -> int:
        """Bytes on disk in segment files."""
        with self._lock:
            return self._bytes

    # --- writing -------------------------------------------------------------------

    def append(self, payload: bytes) -> None:
        """Add one record at the end."""
        self.extend((payload,))

    def extend(self, payloads: tuple[bytes, ...] | list[bytes]) -> None:
        """Add records at the end, in order; never raises for a full or broken disk
        (what cannot be written is counted as dropped, reason `"disk"`).

        Raises:
            PublishError: the spool is closed.
        """
        if not payloads:
            return
        with self._lock:
            if self._closed:
                raise PublishError(f"spool {self.directory} is closed")
            i = 0
            while i < len(payloads):
                # As many records as fit in the tail segment, written with one syscall.
                try:
                    seg = self._writable_tail(len(payloads[i]))
                except OSError as exc:
                    self._start_episode("disk", len(payloads) - i, exc)
                    return
                room = max(self.segment_bytes - seg.size, 0)
                recs: list[bytes] = []
                took = 0
                while i < len(payloads):
                    rec = frame(payloads[i])
                    if recs and took + len(rec) > room:
                        break
                    recs.append(rec)
                    took += len(rec)
                    i += 1
                if not self._write(seg, recs, len(payloads) - i):
                    return
                self._enforce_cap()
            if self._unsynced >= self.fsync_every:
                self._sync_locked()

    def _write(self, seg: _Segment, recs: list[bytes], after: int) -> bool:
        assert self._wfd is not None
        data = b"".join(recs)
        try:
            written = os.write(self._wfd, data)
            if written != len(data):  # a partial write means the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as exc:
            # Cut what half-landed so the segment ends on a record boundary.
            try:
                os.ftruncate(self._wfd, seg.size)
            except OSError:
                self._close_tail()  # the next append starts a new segment
            self._start_episode("disk", len(recs) + after, exc)
            return False
        self._end_episode("disk")
        pos = seg.size
        for rec in recs:
            seg.starts.append(pos)
            seg.lens.append(len(rec) - _HEADER.size)
            pos += len(rec)
        seg.size = pos
        self._bytes += len(data)
        self._total += len(recs)
        self._unsynced += len(recs)
        return True

    def _writable_tail(self, payload_len: int) -> _Segment:
        """The segment to append to, starting a new one when the tail is full or not ours."""
        if self._lockf is None:
            # The folder could not be opened at start: try again (the disk may be back).
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lockf = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(self._lockf, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(self._lockf)
                self._lockf = None
                raise
            self._open_existing()
        tail = self._segments[-1] if self._segments else None
        if (
            tail is not None and self._wfd is not None
            and (tail.size == 0 or tail.size + _HEADER.size + payload_len <= self.segment_bytes)
        ):
            return tail
        self._close_tail()
        seq = self._next_seq
        token = secrets.token_hex(4)
        path = self.directory / f"seg-{seq:012d}-{token}.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._next_seq = seq + 1
        self._wfd = fd
        seg = _Segment(seq, token, path)
        self._segments.append(seg)
        with contextlib.suppress(OSError):  # the new name survives a power cut
            dfd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return seg

    def _close_tail(self) -> None:
        if self._wfd is not None:
            with contextlib.suppress(OSError):
                if self._unsynced:
                    os.fsync(self._wfd)
            with contextlib.suppress(OSError):
                os.close(self._wfd)
            self._wfd = None
            self._unsynced = 0

    def _enforce_cap(self) -> None:
        while self._bytes > self.max_bytes and len(self._segments) > 1:
            seg = self._segments[0]
            lost = seg.count - self._head
            # A replay of this segment may be in flight: `commit` gives back what it delivered.
            self._cap_dropped[seg.seq] = self._head
            self._remove_first(write_cursor=False)
            self._start_episode("full", lost)
            self._write_cursor()  # before the file goes: the count survives a crash
            seg.path.unlink(missing_ok=True)

    def _remove_first(self, *, write_cursor: bool = True) -> None:
        seg = self._segments.popleft()
        self._total -= seg.count
        self._bytes -= seg.size
        self._head = 0
        if self._rfd is not None and self._rfd[0] == seg.seq:
            with contextlib.suppress(OSError):
                os.close(self._rfd[1])
            self._rfd = None
        if write_cursor:
            self._write_cursor()
            seg.path.unlink(missing_ok=True)

    def _trim_head(self) -> None:
        """Delete leading segments that are wholly delivered."""
        while self._segments and self._head >= self._segments[0].count:
            if len(self._segments) == 1 and self._wfd is not None:
                # All delivered: retire the tail too, so its disk space comes back at once
                # (the next append starts a new segment).
                self._close_tail()
            self._remove_first()

    def sync(self) -> None:
        """Push appended records to the disk (fsync)."""
        with self._lock:
            self._sync_locked()

    def _sync_locked(self) -> None:
        if self._wfd is not None and self._unsynced:
            try:
                os.fsync(self._wfd)
            except OSError as exc:
                log.warning("spool %s: fsync failed (%s); records stay in the OS cache",
                            self.directory, exc.strerror)
            self._unsynced = 0

    # --- reading -------------------------------------------------------------------

    def peek(self, max_records: int = 256, max_bytes: int = 1 << 20) -> tuple[list[bytes], SpoolPosition]:
        """The oldest undelivered records (in order) and the position after them.

        Nothing is removed until `commit(position)`. Each record's checksum is checked
        again as it is read; a record damaged since the spool was opened is skipped and
        counted (`"corrupt"`).
        """
        with self._lock:
            while True:
                out: list[bytes] = []
                if not self._segments or len(self) == 0:
                    return out, self._position(self._head)
                seg = self._segments[0]
                if self._head >= seg.count:
                    self._trim_head()
                    if self._segments and self._segments[0] is not seg:
                        continue
                    return out, self._position(self._head)
                end_i = self._head
                total = 0
                while end_i < seg.count and end_i - self._head < max_records:
                    total += seg.lens[end_i]
                    end_i += 1
                    if total >= max_bytes:
                        break
                lo = seg.starts[self._head]
                hi = seg.starts[end_i - 1] + _HEADER.size + seg.lens[end_i - 1]
                try:
                    data = self._pread(seg, hi - lo, lo)
                except OSError as exc:
                    self._lose("unreadable", seg.count - self._head,
                               f"segment {seg.path.name} cannot be read ({exc.strerror})")
                    self._head = seg.count
                    self._skip_broken(seg)
                    continue
                bad = 0
                for i in range(self._head, end_i):
                    off = seg.starts[i] - lo
                    if _valid_at(data, off) != seg.lens[i]:
                        bad += 1
                        continue
                    out.append(data[off + _HEADER.size : off + _HEADER.size + seg.lens[i]])
                if bad:
                    self._lose("corrupt", bad, f"segment {seg.path.name} was damaged after it was opened")
                    self._damage[seg.token] = self._damage.get(seg.token, 0) + bad
                    if not out:
                        self._head = end_i  # lost already: move past them
                        self._write_cursor()
                        continue
                return out, self._position(end_i)

    def _skip_broken(self, seg: _Segment) -> None:
        if len(self._segments) > 1 or self._wfd is None:
            self._remove_first()
        else:
            self._close_tail()

    def _position(self, index: int) -> SpoolPosition:
        if not self._segments:
            return SpoolPosition(self._next_seq, 0, 0)
        s = self._segments[0]
        offset = s.starts[index] if index < s.count else s.size
        return SpoolPosition(s.seq, offset, index)

    def _pread(self, seg: _Segment, n: int, offset: int) -> bytes:
        if self._rfd is None or self._rfd[0] != seg.seq:
            if self._rfd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._rfd[1])
            self._rfd = (seg.seq, os.open(seg.path, os.O_RDONLY))
        data = os.pread(self._rfd[1], n, offset)
        return data

    def commit(self, position: SpoolPosition) -> None:
        """Mark everything before `position` (from `peek`) delivered; deletes finished segments."""
        with self._lock:
            head_at_drop = self._cap_dropped.pop(position.seq, None)
            if head_at_drop is not None:
                # Dropped by the cap while its replay was in flight: those records were
                # delivered after all, so they are not lost.
                back = max(0, position.index - head_at_drop)
                self.dropped_by_reason["full"] -= back
                self.lifetime_dropped["full"] -= back
                return
            if not self._segments or position.seq != self._segments[0].seq:
                return
            if position.index <= self._head:
                return
            self._head = min(position.index, self._segments[0].count)
            self._trim_head()
            if len(self) == 0:
                self._end_episode("full")
            self._write_cursor()

    def close(self) -> None:
        """fsync and release the folder (undelivered records stay for the next run)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._close_tail()
            if self._rfd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._rfd[1])
                self._rfd = None
            for reason in list(self._episodes):
                self._end_episode(reason, closing=True)
            if self._lockf is None:
                return
            if len(self) == 0 and not any(self.lifetime_dropped.values()):
                for seg in self._segments:
                    seg.path.unlink(missing_ok=True)
                self._segments.clear()
                (self.directory / "cursor").unlink(missing_ok=True)
            else:
                self._trim_head()
                if self._segments and self._segments[-1].count == 0:
                    self._segments.pop().path.unlink(missing_ok=True)
                if len(self) == 0:
                    for seg in self._segments:
                        seg.path.unlink(missing_ok=True)
                    self._segments.clear()
                self._write_cursor()
            with contextlib.suppress(OSError):
                fcntl.flock(self._lockf, fcntl.LOCK_UN)
            os.close(self._lockf)
            self._lockf = None

    def _crash_for_tests(self) -> None:
        """Fake a killed process (tests only): release the files without syncing or tidying."""
        with self._lock:
            self._closed = True
            for fd in (self._wfd, self._rfd[1] if self._rfd else None, self._lockf):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._wfd = self._rfd = self._lockf = None

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
