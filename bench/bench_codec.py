"""Thin wrapper, kept for old command lines (bench/_wrapper.py):
``python3 bench/bench_codec.py ARGS`` = ``kvtier bench codec ARGS``."""

from _wrapper import run

if __name__ == "__main__":
    run("codec")
