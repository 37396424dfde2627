"""What every benchmark shares: the machine it ran on, units, tables, progress, and the files it writes."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

GB = 1e9
MiB = 1 << 20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    """1-minute load average: other processes on the machine make every figure here noisier."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def machine_info(dev: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if dev.type == "cuda" else None,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "host": platform.node(),
        "load_average_1m": load_average(),
    }
    return info


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def fraction(value: float, ceiling: float | None) -> str:
    return f"{100 * value / ceiling:.1f}%" if ceiling else "-"


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A markdown table; every column but the first is right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        padded = [
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    print(line(headers))
    print(
        "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    )
    for r in rows:
        print(line(r))


def print_machine(title: str, machine: dict[str, Any]) -> None:
    print(f"## {title}\n")
    cuda = f", CUDA {machine['cuda']}" if machine["cuda"] else ""
    load = machine["load_average_1m"]
    busy = f"; load average {load:.2f}" if load is not None else ""
    print(
        f"machine:  {machine['device']} ({machine['device_name']}); torch {machine['torch']}{cuda}; "
        f"{machine['torch_threads']} torch threads, {machine['cpu_count']} CPUs{busy}"
    )


def finish(args: argparse.Namespace, title: str, machine: dict[str, Any], results: dict[str, Any]) -> None:
    load = load_average()
    machine["load_average_1m_after"] = load
    if load is not None:
        print(f"\nload average at the end: {load:.2f}")
    if args.json:
        doc = {"bench": args.command, "title": title, "argv": sys.argv[1:], "machine": machine}
        doc["results"] = results
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")


# -- what a run leaves behind: the printed report, its JSON, its plots -----------------------------------


class _Tee:
    """Writes to the terminal and keeps a copy (the run's markdown report)."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return int(self.out.write(text))

    def flush(self) -> None:
        self.out.flush()


class Report:
    """``with Report(name, folder):`` everything printed meanwhile is the report; with a folder it
    is written there as ``<name>.md``, the JSON goes to ``<name>.json`` (the benchmark writes it to
    ``json_path``), and each markdown table becomes ``<name>-<n>.png`` (matplotlib, when installed)."""

    def __init__(self, name: str, folder: str | None) -> None:
        self.name = name
        self.folder = Path(folder) if folder else None
        self.json_path = self.folder / f"{name}.json" if self.folder else None
        self._tee = _Tee(sys.stdout)
        self._redirect = contextlib.redirect_stdout(self._tee)

    def __enter__(self) -> Report:
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        self._redirect.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._redirect.__exit__(None, None, None)
        if self.folder is None or exc[0] is not None:
            return
        text = "".join(self._tee.parts)
        md = self.folder / f"{self.name}.md"
        md.write_text(text)
        if self.json_path is not None and not self.json_path.exists():  # a bench without raw figures
            tables = [{"headers": h, "rows": r} for h, r in markdown_tables(text)]
            self.json_path.write_text(json.dumps({"bench": self.name, "tables": tables}, indent=2) + "\n")
        plots = plot_tables(text, self.folder, self.name)
        print(
            f"wrote {md}"
            + (f" and {len(plots)} plot(s)" if plots else " (no plots: pip install kvtier[bench])")
        )


def markdown_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """The ``| a | b |`` tables of a report: (headers, rows)."""
    tables: list[tuple[list[str], list[list[str]]]] = []
    lines = [line.strip() for line in text.splitlines()]
    i = 0
    while i + 1 < len(lines):
        if lines[i].startswith("|") and set(lines[i + 1]) <= set("|-: "):
            headers = [c.strip() for c in lines[i].strip("|").split("|")]
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            tables.append((headers, rows))
        else:
            i += 1
    return tables


def _number(cell: str) -> float | None:
    try:
        return float(cell.replace(",", "").rstrip("%x").split()[0])
    except (ValueError, IndexError):
        return None


def plot_tables(text: str, folder: Path, name: str) -> list[Path]:
    """One horizontal bar chart per table (its numeric columns, rows by their first cell); [] when
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written: list[Path] = []
    for n, (headers, rows) in enumerate(markdown_tables(text), start=1):
        columns = [
            j
            for j in range(1, len(headers))
            if rows and all((_number(r[j]) is not None or r[j] in ("-", "")) for r in rows if j < len(r))
        ]
        if not columns:
            continue
        ncols = min(4, len(columns))
        nrows = -(-len(columns) // ncols)
        size = (3.6 * ncols, (0.3 * len(rows) + 1.2) * nrows)
        fig, axes = plt.subplots(nrows, ncols, figsize=size, squeeze=False)
        labels = [" ".join(r[: columns[0]]) for r in rows]  # the cells before the first number
        for ax in axes.flat[len(columns) :]:
            ax.axis("off")
        for ax, j in zip(axes.flat, columns, strict=False):
            ax.barh(labels, [_number(r[j]) or 0.0 for r in rows])
            ax.set_title(headers[j], fontsize=8)
            ax.tick_params(labelsize=7)
            ax.invert_yaxis()
        fig.tight_layout()
        path = folder / f"{name}-{n}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def progress(items: Sequence[Any] | range, description: str) -> Iterator[Any]:
    """``items`` with a progress bar on stderr (the report on stdout stays clean); plain when
    stderr is not a terminal."""
    from rich.console import Console
    from rich.progress import track

    console = Console(stderr=True)
    yield from track(
        items, description=description, console=console, transient=True, disable=not console.is_terminal
    )
