"""CI: the package imports and the gemvg engine grounds a window with the oldest transformers pyproject allows.

Run by `.ci/run` in a second venv that pins `transformers` to the minimum in pyproject.toml
(the PIL Qwen2-VL image processor and `mm_encoder_outputs` in generate() first appear there).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np


def main() -> int:
    import transformers

    from streamvg.grounding.hf import GemVGEngine
    from streamvg.testing.tiny_model import build
    from streamvg.types import Frame, Query, Window

    with tempfile.TemporaryDirectory() as tmp:
        for family in ("qwen2_5_vl", "qwen2_vl"):
            folder = build(Path(tmp) / family, family)  # type: ignore[arg-type]
            engine = GemVGEngine(folder, device="cpu", max_new_tokens=4, generation_kwargs={"min_new_tokens": 4})
            rng = np.random.default_rng(0)
            frames = tuple(Frame(camera="c", index=i, pts=float(i), image=rng.integers(0, 255, (144, 176, 3), dtype=np.uint8)) for i in range(2))
            (g,) = engine.ground([Window(frames)], Query(id="q", text="the cup"))
            if g.error is not None or not g.raw_text:
                print(f"transformers {transformers.__version__}: {family} grounding failed: {g.error!r}")
                return 1
            print(f"transformers {transformers.__version__}: {family} ok ({engine.stats.vision_images} frames encoded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
