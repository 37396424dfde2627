"""What every thin wrapper in bench/ does: ``python3 bench/bench_NAME.py ARGS`` runs
``kvtier bench NAME ARGS``, from an installed kvtier or from this checkout's src/."""

import sys
from pathlib import Path


def run(command: str, argv: list[str] | None = None) -> None:
    try:
        import kvtier  # noqa: F401
    except ImportError:  # run from a checkout without installing
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from kvtier.bench.cli import main

    main([command, *(sys.argv[1:] if argv is None else argv)])
