"""Publishing throughput: building + publishing events with RedisSink vs raw redis-py
pipelined XADD, in one run.

Baseline: N pre-serialised ~630-byte payloads sent with redis-py `pipeline(transaction=False)`
XADD (MAXLEN ~), batches of `--batch`. Headline candidate (`ratio`, compared with the 0.8
target): `RedisSink` publishing N events built from `Detections` (3 boxes) inside the timed
loop: `Event.grounding` (rounding, deterministic id, no validation), serialisation, batching,
XADD + the live-channel PUBLISH, and a final flush that waits for Redis to confirm. Also
reported: the same sink publishing ready-made events (`ratio_prebuilt`). Each is the best of
`--repeat` interleaved runs, so all see the same machine load.

    python benchmarks/publish.py --url redis://127.0.0.1:6379/0 --n 50000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid

import numpy as np
import redis

from streamvg.events import Event, _boxes, _boxes_numpy
from streamvg.sinks import RedisSink, stream_key
from streamvg.types import Detections


def _detections(i: int) -> Detections:
    base = np.array([[100, 120, 220, 340], [400, 80, 470, 200], [10, 10, 60, 90]], dtype=np.float32)
    return Detections(xyxy=base + (i % 50), score=np.array([0.91, 0.72, 0.35], dtype=np.float32),
                      image_index=np.array([3, 3, 3]), track_id=np.array([12, 13, -1]))


def _event(pipe: str, i: int, det: Detections) -> Event:
    return Event.grounding(
        pipeline=pipe, camera="lobby-door", query_id="vest",
        query="the man in the yellow vest", t=i * 0.04, frame_index=i,
        frame_size=(1920, 1080), detections=det, model="gem-vg-7b",
        wall_time=1_764_000_000.0 + i * 0.04, latency_ms=180.5,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3, help="Runs of each; the best is reported.")
    args = ap.parse_args()
    r = redis.Redis.from_url(args.url)
    pipe = f"bench-{uuid.uuid4().hex[:8]}"
    key = stream_key(pipe)
    dets = [_detections(i) for i in range(64)]
    payload = _event(pipe, 0, dets[0]).to_json()
    payloads = [_event(pipe, i, dets[i % 64]).to_json() for i in range(args.n)]

    def raw() -> float:
        r.delete(key)
        t0 = time.perf_counter()
        for s in range(0, args.n, args.batch):
            p = r.pipeline(transaction=False)
            for data in payloads[s : s + args.batch]:
                p.xadd(key, {"data": data}, maxlen=100_000, approximate=True)
            p.execute()
        return args.n / (time.perf_counter() - t0)

    events = [_event(pipe, i, dets[i % 64]) for i in range(args.n)]

    def sink(prebuilt: bool) -> float:
        r.delete(key)
        with tempfile.TemporaryDirectory() as spool, RedisSink(
            args.url, pipe, spool_dir=spool, batch_size=args.batch, maxlen=100_000
        ) as s:
            t0 = time.perf_counter()
            if prebuilt:  # serialisation + sending of existing event objects
                for e in events:
                    s.publish(e)
            else:  # also building each event from Detections (fast builder, id, boxes)
                for i in range(args.n):
                    s.publish(_event(pipe, i, dets[i % 64]))
            s.flush()
            dt = time.perf_counter() - t0
            if s.stats.published != args.n:
                raise SystemExit(f"sink published {s.stats.published} of {args.n}")
        return args.n / dt

    # The fast box conversion must give exactly the reference (numpy) values.
    for d in dets:
        if _boxes(d) != _boxes_numpy(d):
            raise SystemExit("Event.grounding boxes differ from the numpy reference")

    raw_best = sink_best = built_best = 0.0
    for _ in range(args.repeat):  # interleaved so all see the same machine load
        raw_best = max(raw_best, raw())
        sink_best = max(sink_best, sink(True))
        built_best = max(built_best, sink(False))
    assert r.xlen(key) == args.n
    r.delete(key)
    print(json.dumps({
        "benchmark": "publish",
        "n": args.n,
        "batch": args.batch,
        "payload_bytes": len(payload),
        "raw_pipeline_xadd_events_per_s": round(raw_best),
        "redis_sink_with_event_build_events_per_s": round(built_best),
        "ratio": round(built_best / raw_best, 3),
        "ratio_is": "RedisSink incl. Event.grounding from Detections (3 boxes) + serialise + batch"
                    " + XADD + live PUBLISH, vs raw redis-py pipelined XADD of pre-serialised payloads",
        "target_ratio": 0.8,
        "meets_target": built_best / raw_best >= 0.8,
        "redis_sink_prebuilt_events_per_s": round(sink_best),
        "ratio_prebuilt": round(sink_best / raw_best, 3),
    }))


if __name__ == "__main__":
    main()
