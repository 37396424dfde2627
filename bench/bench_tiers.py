"""Thin wrapper, kept for old command lines: the tier benchmarks live in ``kvtier.bench``.

python3 bench/bench_tiers.py ceilings | chat | policies [options]
= kvtier bench tiers | chat | policies [options]           (kvtier bench <name> --help)
"""

import sys

from kvtier.bench.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    main([{"ceilings": "tiers"}.get(a, a) if i == 0 else a for i, a in enumerate(argv)])
