"""Thin wrapper, kept for old command lines: the memcached benchmark lives in ``kvtier.bench.memcached``.

python3 bench/bench_memcached.py [options] = kvtier bench memcached [options]  (see its --help)
"""

import sys
from pathlib import Path

try:
    import kvtier  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kvtier.bench.cli import main

if __name__ == "__main__":
    main(["memcached", *sys.argv[1:]])
