"""The on-disk spool: order, restart, torn records, the size cap, one owner at a time,
damage of every kind (each loses the damaged records alone, counted), a full disk, and a
hypothesis state machine of appends, replays, acks, reopen, truncation and byte flips."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from streamvg.errors import PublishError
from streamvg.sinks.spool import Spool

REPO = Path(__file__).resolve().parents[1]


def _drain(sp: Spool) -> list[bytes]:
    out: list[bytes] = []
    while True:
        chunk, pos = sp.peek(7)
        if not chunk:
            return out
        out += chunk
        sp.commit(pos)


def test_fifo_across_segments_and_reopen(tmp_path: Path) -> None:
    sp = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=4096, fsync_every=10)
    items = [f"event-{i:05d}".encode() * 10 for i in range(300)]
    sp.extend(items[:200])
    assert len(list(tmp_path.glob("seg-*.log"))) > 2  # several segments
    chunk, pos = sp.peek(50)  # at most one segment's worth
    assert chunk == items[: len(chunk)]
    sp.commit(pos)
    n = len(chunk)
    sp.close()
    sp = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=4096)  # a new run
    assert len(sp) == 200 - n
    sp.extend(items[200:])
    assert _drain(sp) == items[n:]
    assert len(sp) == 0
    sp.close()
    assert not list(tmp_path.glob("seg-*.log"))


def test_uncommitted_peek_is_replayed(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    sp.extend([b"a", b"b", b"c"])
    chunk, _pos = sp.peek(2)
    assert chunk == [b"a", b"b"]
    sp.close()  # crashed before commit: at-least-once
    sp = Spool(tmp_path)
    assert _drain(sp) == [b"a", b"b", b"c"]
    sp.close()


def test_torn_tail_is_cut(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    sp.extend([b"one", b"two"])
    sp.close()
    seg = sorted(tmp_path.glob("seg-*.log"))[-1]
    with open(seg, "ab") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00")  # half a header + nothing: a crash mid-write
    sp = Spool(tmp_path)
    assert _drain(sp) == [b"one", b"two"]
    sp.close()


def test_cap_drops_oldest_counted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    sp = Spool(tmp_path, max_bytes=8192, segment_bytes=2048)
    items = [f"{i:06d}".encode() * 20 for i in range(200)]  # 120 B each, 24 KB in all
    sp.extend(items)
    assert sp.size_bytes <= 8192 + 2048
    left = _drain(sp)
    assert sp.dropped > 0 and len(left) + sp.dropped == 200
    assert left == items[sp.dropped:]  # the oldest went, order kept
    full = [r for r in caplog.records if "is full" in r.getMessage()]
    assert len(full) == 1, "one line per episode, not one per dropped segment"
    assert sp.dropped_by_reason["full"] == sp.dropped
    sp.close()


def test_second_owner_is_refused(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    with pytest.raises(PublishError, match="in use by another StreamVG process"):
        Spool(tmp_path)
    sp.close()
    Spool(tmp_path).close()


# --- damage: each case loses at most the damaged records, counted and logged ------------


def _ids(records: list[bytes]) -> list[int]:
    return [int(r.split(b":")[0]) for r in records]


def _filled(tmp_path: Path, n: int = 300) -> list[bytes]:
    sp = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=8192)
    items = [b"%d:" % i + b"x" * 60 for i in range(n)]
    sp.extend(items)
    sp.close()
    return items


def _segs(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.glob("seg-*.log"))


def _reopen_and_drain(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> tuple[list[int], Spool]:
    caplog.clear()
    sp = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=8192)
    got = _ids(_drain(sp))
    sp.close()
    return got, sp


def test_garbage_mid_segment_loses_only_the_records_it_hit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    _filled(tmp_path)
    seg = _segs(tmp_path)[1]
    data = bytearray(seg.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 16] = b"\x00garbage!garbage"
    seg.write_bytes(bytes(data))
    got, sp = _reopen_and_drain(tmp_path, caplog)
    lost = sorted(set(range(300)) - set(got))
    assert got == sorted(got), "order kept"
    assert 1 <= len(lost) <= 2, "16 bytes hit one record, or two across a boundary"
    assert sp.dropped_by_reason["corrupt"] == len(lost)
    assert any("damaged" in r.getMessage() and f"{len(lost)} record(s) lost" in r.getMessage() for r in caplog.records)


def test_torn_tail_random_segment_and_zero_length_segment(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    _filled(tmp_path)
    segs = _segs(tmp_path)
    # Torn tail of the last segment: half a record.
    last = segs[-1]
    last.write_bytes(last.read_bytes()[:-30])
    # A segment of random bytes and an empty one, numbered after the rest.
    rnd = tmp_path / "seg-000000000900-deadbeef.log"
    rnd.write_bytes(os.urandom(4096))
    (tmp_path / "seg-000000000901-cafebabe.log").write_bytes(b"")
    got, sp = _reopen_and_drain(tmp_path, caplog)
    assert got == list(range(299)), "only the torn record is lost"
    assert sp.dropped_by_reason["corrupt"] == 2  # the torn record + the random segment (one unit)
    assert not _segs(tmp_path), "everything delivered or lost is gone; nothing else was deleted"


@pytest.mark.parametrize("cursor", [b"\x00\xffnot json", b'{"seq": 99999, "token": "x", "offset": 0}',
                                    b'{"seq": 1, "token": "0000", "offset": 999999}'])
def test_bad_or_ahead_cursor_replays_everything(tmp_path: Path, cursor: bytes, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    items = _filled(tmp_path)
    sp = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=8192)
    chunk, pos = sp.peek(50)
    sp.commit(pos)  # 50 delivered; then the cursor is lost or points elsewhere
    sp.close()
    (tmp_path / "cursor").write_bytes(cursor)
    got, sp = _reopen_and_drain(tmp_path, caplog)
    # Segments wholly delivered are gone; the rest is replayed from its start (duplicates).
    assert set(got) >= set(range(50, 300)) and got == sorted(got)
    assert sp.dropped == 0
    assert any("replaying every spooled record" in r.getMessage() for r in caplog.records)
    del items, chunk


def test_cursor_of_an_old_generation_never_deletes_new_segments(tmp_path: Path) -> None:
    """The reported loss: a cursor left by a killed run pointed past segments numbered anew."""
    sp = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=4096)
    sp.extend([b"%d:old" % i for i in range(200)])
    _drain(sp)
    sp._crash_for_tests()  # killed right after a replay: the cursor stays
    sp = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=4096)
    sp.extend([b"%d:new" % i for i in range(804)])
    sp.close()  # "804 events stay in spool"
    sp = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=4096)
    assert len(sp) == 804
    assert _ids(_drain(sp)) == list(range(804))
    sp.close()


# --- a full or unwritable disk ----------------------------------------------------------

_FULL_DISK = r"""
import json, logging, os, resource, signal, sys
from streamvg.sinks.spool import Spool
logging.basicConfig(level=logging.WARNING, format="%(message)s")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG instead of a killed process
limit = int(sys.argv[2])
if limit:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sp = Spool(sys.argv[1], max_bytes=1 << 24, segment_bytes=1 << 22)
for i in range(2000):
    sp.append(b"%d:" % i + b"y" * 200)
written = len(sp)
drained = []
while True:
    chunk, pos = sp.peek(100)
    if not chunk:
        break
    drained += [int(c.split(b":")[0]) for c in chunk]
    sp.commit(pos)
for i in range(2000, 2010):  # space came back (segments delivered): appends work again
    sp.append(b"%d:" % i)
sp.close()
print(json.dumps({"written": written, "dropped": sp.dropped_by_reason, "drained": drained, "after": len(Spool(sys.argv[1]))}))
"""


def _full_disk_dir(tmp_path: Path) -> tuple[Path, int]:
    """A 64 KiB tmpfs when this machine lets us mount one, else a 64 KiB file-size limit."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                           capture_output=True, check=False)
        if r.returncode == 0:
            return mnt, 0
    return mnt, 64 * 1024


def test_full_disk_counts_drops_logs_once_and_goes_on(tmp_path: Path) -> None:
    where, limit = _full_disk_dir(tmp_path)
    try:
        out = subprocess.run(
            [sys.executable, "-c", _FULL_DISK, str(where / "spool"), str(limit)],
            capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    finally:
        if limit == 0:
            subprocess.run(["umount", "-l", str(where)], check=False)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert 0 < res["written"] < 2000
    assert res["written"] + res["dropped"]["disk"] == 2000, "every record kept or counted"
    assert res["drained"] == list(range(res["written"])), "what was kept comes back in order"
    assert "Traceback" not in out.stderr
    lines = [x for x in out.stderr.splitlines() if "cannot be written" in x]
    assert len(lines) == 1, out.stderr  # one line per episode
    assert "no longer unwritable" in out.stderr
    assert res["after"] == 10


def test_unwritable_folder_does_not_raise(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    sp = Spool(blocker / "spool")  # cannot be created: counted, not raised
    sp.extend([b"a", b"b"])
    assert sp.dropped_by_reason["disk"] == 2 and len(sp) == 0
    sp.close()


# --- the state machine --------------------------------------------------------------------


class SpoolMachine(RuleBasedStateMachine):
    """Appends, replays (committed or not), reopen, crash, truncation, byte flips, a lost
    cursor, in any order. Invariants: records come out in append order; an intact record
    is never skipped; whatever is never delivered was damaged and is counted."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="spool-sm-"))
        self.sp = Spool(self.dir, max_bytes=1 << 22, segment_bytes=1024, fsync_every=4)
        self.next_id = 0
        self.acked: set[int] = set()
        self.damaged: set[int] = set()  # records whose bytes were hit
        self.gone: set[int] = set()  # cut off whole by a truncation: as if never written
        self.last_seen = -1  # last id committed in this session (order check)
        self.counted = 0  # losses the spool instances counted (and logged)
        self.cursor_lost = False
        self.where: dict[int, tuple[str, int, int]] = {}  # id -> (segment name, start, end)
        self.open = True

    def _reopen(self) -> None:
        self.counted += self.sp.dropped
        self.sp = Spool(self.dir, max_bytes=1 << 22, segment_bytes=1024, fsync_every=4)
        self.open = True
        self.last_seen = -1

    def _locate(self) -> None:
        """Where each record sits (scanned from the files as they are now)."""
        from streamvg.sinks.spool import scan_records

        # Positions never change (segments are append-only), so damage does not erase
        # what is known: a record truncated away after a flip is still found "gone".
        for seg in sorted(self.dir.glob("seg-*.log")):
            data = seg.read_bytes()
            for start, length in scan_records(data)[0]:
                rid = int(data[start + 12 : start + 12 + length].split(b":")[0])
                self.where.setdefault(rid, (seg.name, start, start + 12 + length))

    @rule(n=st.integers(1, 20), size=st.integers(0, 90))
    def append(self, n: int, size: int) -> None:
        if not self.open:
            self._reopen()
        self.sp.extend([b"%d:" % (self.next_id + i) + b"z" * size for i in range(n)])
        self.next_id += n

    @rule(k=st.integers(1, 30), ack=st.booleans())
    def replay(self, k: int, ack: bool) -> None:
        if not self.open:
            self._reopen()
        chunk, pos = self.sp.peek(k)
        ids = _ids(chunk)
        prev = self.last_seen
        for rid in ids:
            assert rid > prev, "in order within a run"
            skipped = set(range(prev + 1, rid)) - self.acked - self.gone
            assert skipped <= self.damaged, f"intact records {sorted(skipped - self.damaged)[:5]} skipped"
            prev = rid
        if ack:  # without a commit the same records come again (sent, crashed before commit)
            self.sp.commit(pos)
            self.acked |= set(ids)
            self.last_seen = prev

    @rule()
    def reopen(self) -> None:
        if self.open:
            self.sp.close()
        self._reopen()

    @rule()
    def crash(self) -> None:
        if self.open:
            self.sp._crash_for_tests()
            self.open = False

    @rule(data=st.data())
    def truncate(self, data: st.DataObject) -> None:
        self._close_for_damage()
        segs = sorted(self.dir.glob("seg-*.log"))
        if not segs:
            return
        seg = segs[-1]  # a torn tail: the last segment written
        size = seg.stat().st_size
        cut = data.draw(st.integers(0, size))
        for rid, (name, start, end) in self.where.items():
            if name == seg.name:
                if start >= cut:
                    self.gone.add(rid)
                elif end > cut:
                    self.damaged.add(rid)
        with open(seg, "r+b") as f:
            f.truncate(cut)

    @rule(data=st.data())
    def flip(self, data: st.DataObject) -> None:
        self._close_for_damage()
        segs = sorted(self.dir.glob("seg-*.log"))
        if not segs:
            return
        seg = data.draw(st.sampled_from(segs))
        raw = bytearray(seg.read_bytes())
        if not raw:
            return
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] ^= data.draw(st.integers(1, 255))
        for rid, (name, start, end) in self.where.items():
            if name == seg.name and start <= at < end:
                self.damaged.add(rid)
        seg.write_bytes(bytes(raw))

    @rule()
    def lose_cursor(self) -> None:
        self._close_for_damage()
        (self.dir / "cursor").write_bytes(b"\x00garbage")
        self.cursor_lost = True

    def _close_for_damage(self) -> None:
        if self.open:
            self.sp.close()
            self.open = False
        self._locate()

    @invariant()
    def drops_only_for_damage(self) -> None:
        if self.open:
            assert self.sp.dropped_by_reason["full"] == 0 and self.sp.dropped_by_reason["disk"] == 0

    def teardown(self) -> None:
        if not self.open:
            self._reopen()
        self.last_seen = -1
        delivered: set[int] = set()
        while True:
            chunk, pos = self.sp.peek(50)
            if not chunk:
                break
            ids = _ids(chunk)
            delivered |= set(ids)
            self.sp.commit(pos)
        self.sp.close()
        self.counted += self.sp.dropped
        lost = set(range(self.next_id)) - self.acked - delivered - self.gone
        assert lost <= self.damaged, f"intact records lost: {sorted(lost - self.damaged)[:10]}"
        if lost:
            assert self.counted > 0, "every loss is counted"
        # Damage is counted once, not again at every reopen (unless the cursor, which
        # remembers what was counted, was lost too).
        if not self.cursor_lost:
            assert self.counted <= len(self.damaged), (self.counted, len(self.damaged))
        shutil.rmtree(self.dir, ignore_errors=True)


SpoolMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
test_spool_state_machine = SpoolMachine.TestCase


def test_doctests() -> None:
    import doctest

    import streamvg.sinks.spool as spool_module

    assert doctest.testmod(spool_module).failed == 0


def test_spool_of_the_previous_format_is_replayed_not_stranded(tmp_path: Path) -> None:
    """Segments written before framing (an upgrade with events still spooled): the records
    after the old cursor are replayed, in order, and the old files go only after that."""
    import struct
    import zlib

    def old(payloads: list[bytes]) -> bytes:
        return b"".join(struct.pack("<II", len(p), zlib.crc32(p)) + p for p in payloads)

    first = [b"%d:" % i for i in range(10)]
    (tmp_path / "seg-000000000001.log").write_bytes(old(first))
    (tmp_path / "seg-000000000002.log").write_bytes(old([b"%d:" % i for i in range(10, 20)]) + b"\x05\x00")
    offset = len(old(first[:4]))  # the old run delivered 0..3
    (tmp_path / "cursor").write_text(json.dumps({"seq": 1, "offset": offset, "index": 4}))
    sp = Spool(tmp_path)
    assert _ids(_drain(sp)) == list(range(4, 20))
    sp.close()
    assert not list(tmp_path.glob("seg-*.log"))
