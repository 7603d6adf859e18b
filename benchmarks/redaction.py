"""`mask_text` on hostile input: seconds per MiB, against a linear C scan of the same text
in the same run, and the quadratic growth of the pattern it replaced.

For each input shape (1 MiB): `mask_s` is the best of `--repeat` runs of `mask_text`;
`baseline_s` the best of a regex scan that touches every character once
(`re.findall(r"[\\s@]")`); `ratio` = mask_s / baseline_s (a constant factor, not a growth).
`old_pattern` times the pre-issue-14 regex on one shape at 8 k and 16 k characters: its
`growth` (time ratio for twice the text) is about 4 (quadratic); mask_text's is about 2.

    python benchmarks/redaction.py
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable

from streamvg.redaction import mask_text

MIB = 1 << 20
_OLD = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]*)(?::(?P<pw>[^@/\s]*))?@")
_SCAN = re.compile(r"[\s@]")

SHAPES: dict[str, Callable[[int], str]] = {
    "letters_then_at": lambda n: "a" * n + "@",
    "repeated_credential_urls": lambda n: "rtsp://u:p@" * (n // 11),
    "dense_short_urls": lambda n: "a://b@ " * (n // 7),
    "colons_then_at": lambda n: "x:" * (n // 2) + "@",
    "log_line_urls": lambda n: "camera door: cannot open rtsp://viewer:Sl/ash9@10.0.0.5:554/s1 (timeout) " * (n // 73),
}


def _best(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=float, default=1.0, help="Input size per shape, MiB.")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    n = int(args.mib * MIB)
    shapes = {}
    for name, make in SHAPES.items():
        text = make(n)
        mask_s = _best(lambda t=text: mask_text(t), args.repeat)  # type: ignore[misc]
        base_s = _best(lambda t=text: _SCAN.findall(t), args.repeat)  # type: ignore[misc]
        shapes[name] = {"chars": len(text), "mask_s": round(mask_s, 4), "baseline_s": round(base_s, 4),
                        "ratio": round(mask_s / base_s, 2), "mib_per_s": round(len(text) / MIB / mask_s, 1)}
    small, big = "a" * 8000 + "@", "a" * 16000 + "@"
    old_small = _best(lambda: _OLD.sub("", small), 1)
    old_big = _best(lambda: _OLD.sub("", big), 1)
    new_small = _best(lambda: mask_text("a" * 400_000 + "@"), args.repeat)
    new_big = _best(lambda: mask_text("a" * 800_000 + "@"), args.repeat)
    print(json.dumps({
        "benchmark": "redaction", "mib": args.mib, "worst_mask_s": max(s["mask_s"] for s in shapes.values()),
        "shapes": shapes,
        "old_pattern": {"chars": [8000, 16000], "s": [round(old_small, 3), round(old_big, 3)],
                        "growth": round(old_big / old_small, 2)},
        "mask_text_growth": round(new_big / new_small, 2),
    }))


if __name__ == "__main__":
    main()
