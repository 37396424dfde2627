"""Thin wrapper, kept for old command lines: ``python3 bench/bench_tiers.py ceilings | chat | policies
ARGS`` = ``kvtier bench tiers | chat | policies ARGS``."""

import sys

from _wrapper import run

if __name__ == "__main__":
    command, *rest = sys.argv[1:] or ["--help"]
    run({"ceilings": "tiers"}.get(command, command), rest)
