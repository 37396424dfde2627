"""Thin wrapper, kept for old command lines: the GPU decode benchmark lives in ``kvtier.bench.gpu_decode``.

PYTHONPATH=src python3 bench/bench_gpu_decode.py [--parts ceiling,batch1,...] [--json out.json]
= kvtier bench gpu-decode [options]     (kvtier bench gpu-decode --help)
"""

import sys
from pathlib import Path

try:
    import kvtier  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kvtier.bench.cli import main

if __name__ == "__main__":
    main(["gpu-decode", *sys.argv[1:]])
