"""Thin wrapper, kept for old command lines: ``kvtier bench codec [options]`` (``kvtier.bench.codec``)."""

import sys
from pathlib import Path

try:
    import kvtier  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kvtier.bench.cli import main

if __name__ == "__main__":
    main(["codec", *sys.argv[1:]])
