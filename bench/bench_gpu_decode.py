"""Thin wrapper, kept for old command lines (bench/_wrapper.py):
``python3 bench/bench_gpu_decode.py ARGS`` = ``kvtier bench gpu-decode ARGS``."""

from _wrapper import run

if __name__ == "__main__":
    run("gpu-decode")
