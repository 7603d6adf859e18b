"""The on-disk spool: order, restart, torn records, the size cap, one owner at a time."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from streamvg.errors import PublishError
from streamvg.sinks.spool import Spool


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
    assert any("dropped the" in r.getMessage() for r in caplog.records)
    sp.close()


def test_second_owner_is_refused(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    with pytest.raises(PublishError, match="in use by another StreamVG process"):
        Spool(tmp_path)
    sp.close()
    Spool(tmp_path).close()
