#!/usr/bin/env python3
"""Print the project's runtime dependencies without the model stack, one per line.

The CPU image (`deploy/Dockerfile.cpu`) installs these, then StreamVG with `--no-deps`:
ingest workers and consumers never load a model, so PyTorch (several GB as a CUDA build)
and transformers stay out.

    python deploy/cpu_requirements.py pyproject.toml > requirements-cpu.txt
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

#: Distributions only the grounding engine needs (compared by normalized name).
MODEL_STACK = frozenset({"torch", "transformers", "tokenizers", "safetensors"})


def _name(requirement: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if m is None:
        raise ValueError(f"cannot read a distribution name from {requirement!r}")
    return re.sub(r"[-_.]+", "-", m.group(1)).lower()


def cpu_requirements(pyproject: Path) -> list[str]:
    """`[project].dependencies` of `pyproject` less `MODEL_STACK`, in file order."""
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    deps: list[str] = data["project"]["dependencies"]
    return [d for d in deps if _name(d) not in MODEL_STACK]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: cpu_requirements.py PYPROJECT", file=sys.stderr)
        return 2
    print("\n".join(cpu_requirements(Path(argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
