"""Thin wrapper, kept for old command lines: this benchmark lives in ``kvtier.bench.hf``.

python3 bench/bench_hf.py [options] = kvtier bench hf [options]     (kvtier bench hf --help)
"""

import sys
from pathlib import Path

try:
    import kvtier  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kvtier.bench.cli import main

if __name__ == "__main__":
    main(["hf", *sys.argv[1:]])
