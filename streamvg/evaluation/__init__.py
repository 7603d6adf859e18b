"""Benchmark scoring: does StreamVG's prompt, parser and coordinate mapping reproduce the
GeM-VG paper's numbers?

```
predictions.py  the answers file (JSONL, one line per item, appended as answers come)
migbench.py     MIG-Bench: one box per item, IoU@0.3/0.5/0.7 and mean IoU per task
mcbench.py      MC-Bench: COCO-style AP50 after matching predicted groups to targets,
                plus image-level accuracy
runner.py       `--model`: ask the engine every item not answered yet (resumable)
```

Both benchmarks are scored from the model's **raw answers** through StreamVG's own parser
(`streamvg.grounding.parse_answer_full`), so a prompt, parser or box-convention detail that
costs points shows up in the score. The definitions follow the benchmarks' own scoring
scripts (Migician `eval/MIG_bench_eval.py` + `eval/utils.py`; MC-Bench `eval_mc_bench.py`);
where this code differs from them on purpose, the module docstring says so.
"""

from streamvg.evaluation.mcbench import McBenchScore, score_mc_bench
from streamvg.evaluation.migbench import MigBenchScore, score_mig_bench
from streamvg.evaluation.predictions import Prediction, append_prediction, read_predictions

__all__ = [
    "McBenchScore",
    "MigBenchScore",
    "Prediction",
    "append_prediction",
    "read_predictions",
    "score_mc_bench",
    "score_mig_bench",
]
