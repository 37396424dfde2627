"""Thin wrapper, kept for old command lines (bench/_wrapper.py):
``python3 bench/bench_memcached.py ARGS`` = ``kvtier bench memcached ARGS``."""

from _wrapper import run

if __name__ == "__main__":
    run("memcached")
