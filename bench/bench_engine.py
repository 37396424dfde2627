"""Thin wrapper, kept for old command lines: the engine benchmarks live in ``kvtier.bench``.

python3 bench/bench_engine.py decode | throughput | prefix-ttft [options]
= kvtier bench decode | throughput | prefix [options]     (kvtier bench <name> --help)
"""

import sys

from kvtier.bench.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    main([{"prefix-ttft": "prefix"}.get(a, a) if i == 0 else a for i, a in enumerate(argv)])
