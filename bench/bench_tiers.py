"""Thin wrapper, kept for old command lines: the tier benchmarks live in ``kvtier.bench``.

python3 bench/bench_tiers.py ceilings | chat | policies [options]
= kvtier bench tiers | chat | policies [options]           (kvtier bench <name> --help)
"""

import sys
from pathlib import Path

try:
    import kvtier  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kvtier.bench.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    main([{"ceilings": "tiers"}.get(a, a) if i == 0 else a for i, a in enumerate(argv)])
