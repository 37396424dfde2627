"""Thin wrapper, kept for old command lines: ``python3 bench/bench_engine.py decode | throughput |
prefix-ttft ARGS`` = ``kvtier bench decode | throughput | prefix ARGS``."""

import sys

from _wrapper import run

if __name__ == "__main__":
    command, *rest = sys.argv[1:] or ["--help"]
    run({"prefix-ttft": "prefix"}.get(command, command), rest)
