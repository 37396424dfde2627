"""Thin wrapper, kept for old command lines: this benchmark lives in ``kvtier.bench.startup``.

python3 bench/bench_startup.py [options] = kvtier bench startup [options]     (kvtier bench startup --help)
"""

import sys
from pathlib import Path

try:
    import kvtier  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kvtier.bench.cli import main

if __name__ == "__main__":
    main(["startup", *sys.argv[1:]])
