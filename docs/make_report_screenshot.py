"""Make docs/report.png, the README's picture of `streamvg search --report`.

A generated two-camera scene is searched with the replay engine (ground truth as a perfect
"model"), the report is written, and headless Chromium takes the screenshot.

    python docs/make_report_screenshot.py [OUT.png]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from streamvg.testing.chromium import Chromium
from streamvg.testing.synthetic import replay_records, write_scene


def main(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        scene = write_scene(root / "videos", cameras=2, width=640, height=360, duration_s=10.0, seed=3)
        answers = root / "answers.jsonl"
        recs = replay_records(scene.ground_truth, query="the green circle", labels=["green circle"])
        recs += replay_records(scene.ground_truth, query="the blue square", labels=["blue square"])
        answers.write_text("".join(json.dumps(r) + "\n" for r in recs))
        report = root / "report.html"
        subprocess.run(
            [sys.executable, "-m", "streamvg", "search", str(root / "videos"), "-q", "the green circle",
             "-q", "the blue square", "--engine", "replay", "--replay", str(answers), "--fps", "5",
             "--clips", str(root / "clips"), "--report", str(report), "--json"],
            check=True, stdout=subprocess.DEVNULL,
        )
        with Chromium() as browser, browser.page(width=1100, height=1250) as page:
            page.goto(report.as_uri())
            out.write_bytes(page.screenshot())
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("report.png"))
