"""Thin wrapper, kept for old command lines: the engine benchmarks live in ``kvtier.bench``.

python3 bench/bench_engine.py decode | throughput | prefix-ttft [options]
= kvtier bench decode | throughput | prefix [options]     (kvtier bench <name> --help)
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
    main([{"prefix-ttft": "prefix"}.get(a, a) if i == 0 else a for i, a in enumerate(argv)])
