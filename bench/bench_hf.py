"""Thin wrapper, kept for old command lines (bench/_wrapper.py):
``python3 bench/bench_hf.py ARGS`` = ``kvtier bench hf ARGS``."""

from _wrapper import run

if __name__ == "__main__":
    run("hf")
