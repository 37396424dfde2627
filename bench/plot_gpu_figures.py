"""The GPU figures of docs/benchmarks.md's "GPU throughput and the step loop (issue 12)", as plots.

    python bench/plot_gpu_figures.py throughput \\
        docs/results/h200-throughput-1b-overlap-c79d4d1.json \\
        docs/results/h200-throughput-1b-nooverlap-c79d4d1.json \\
        docs/results/h200-throughput-1b-hf-peer.json \\
        docs/results/h200-throughput-8b-4e0f963.json -o docs/results/h200-throughput.png
    python bench/plot_gpu_figures.py prefix docs/results/h200-prefix-8b-at-once-30ms.json \\
        -o docs/results/h200-prefix-8b.png

``throughput`` takes ``kvtier bench throughput --json`` files: one bar of output tok/s per run (and
one for Hugging Face's continuous batching where the run has ``--hf-peer``), in the order given,
with the issue's targets over the bars they apply to; a second panel shows the share of device
time the device sat idle between steps, where the JSON has the device busy/idle times.

``prefix`` takes one ``kvtier bench prefix --json`` file: for each row (cold, in the device pool,
loaded from the host tier) the median TTFT with its min-max range beside the row's compute floor,
on a log scale (the rows span ~30x), with each target drawn as the TTFT it allows.

Every figure comes from the JSON; only the targets below are written here.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

# Targets of issue 12, as docs/benchmarks.md's tables quote them.
# Offline throughput (256 requests, lengths 100..1024), output tok/s, per model.
THROUGHPUT_TARGET_TOK_S = {
    "synthetic:llama-3.2-1b": 20_000,
    "synthetic:llama-3.1-8b": 6_000,
}
# kvtier's output tok/s over Hugging Face continuous batching's, same run (--hf-peer).
HF_RATIO_TARGET = 18.0
# 4,096-token prefix TTFT: cold, the compute floor is >= 70% of the TTFT.
COLD_FLOOR_SHARE_TARGET = 0.70
# Prefix in the device pool: TTFT within 2x its compute floor.
DEVICE_POOL_FLOOR_FACTOR_TARGET = 2.0
# Prefix loaded from the host tier: TTFT <= 10% of the cold TTFT.
HOST_OF_COLD_TARGET = 0.10

TARGET_COLOR = "C3"


def label_above(ax, x: float, y: float, text: str) -> None:
    """A bar's value in bold just above its top."""
    ax.annotate(
        text,
        (x, y),
        xytext=(0, 3),
        textcoords="offset points",
        ha="center",
        va="bottom",
        fontsize=9,
        fontweight="bold",
    )


def _load(path: str) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def _short_model(model: str) -> str:
    return model.removeprefix("synthetic:")


def _device_idle_share(results: dict[str, Any]) -> float | None:
    busy, idle = results.get("device_busy_s"), results.get("device_idle_s")
    if busy is None or idle is None or busy + idle <= 0:
        return None
    return idle / (busy + idle)


def _tags(paths: list[str]) -> list[str]:
    """Each file's name less the prefix the files share, to tell the bars apart by their source."""
    stems = [Path(p).stem for p in paths]
    if len(stems) == 1:
        return stems
    parts = [s.split("-") for s in stems]
    n = 0
    while all(len(p) > n + 1 and p[n] == parts[0][n] for p in parts):
        n += 1
    return ["-".join(p[n:]) for p in parts]


def plot_throughput(paths: list[str], dst: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = [_load(p) for p in paths]
    # (label, tok/s, model or None for the HF bar, idle share or None, note above the number)
    bars: list[tuple[str, float, str | None, float | None, str]] = []
    for doc, tag in zip(docs, _tags(paths), strict=True):
        res, model = doc["results"], doc["settings"]["model"]
        loop = "overlapped loop" if res.get("overlap_steps", True) else "one step at a time"
        note = ""
        peer = res.get("hf_peer")
        if peer:
            ratio = res["output_tokens_per_s"] / peer["output_tokens_per_s"]
            note = f"{ratio:.1f}x HF\n(target >= {HF_RATIO_TARGET:g}x)"
        bars.append(
            (
                f"kvtier {_short_model(model)}\n{loop}\n[{tag}]",
                res["output_tokens_per_s"],
                model,
                _device_idle_share(res),
                note,
            )
        )
        if peer:
            bars.append(
                (
                    f"HF continuous batching\n{_short_model(model)}, same run\n[{tag}]",
                    peer["output_tokens_per_s"],
                    None,
                    None,
                    "",
                )
            )

    has_idle = any(b[3] is not None for b in bars)
    width = max(7.0, 1.9 * len(bars))
    fig, axes = plt.subplots(
        2 if has_idle else 1,
        1,
        figsize=(width, 8.6 if has_idle else 5.6),
        sharex=True,
        gridspec_kw={"height_ratios": [3, 1.3]} if has_idle else None,
        squeeze=False,
    )
    ax = axes[0][0]
    xs = range(len(bars))
    colors = ["C0" if model else "0.55" for _, _, model, _, _ in bars]
    rects = ax.bar(xs, [b[1] for b in bars], color=colors, width=0.62)
    top = max(b[1] for b in bars)
    for rect, (_, value, _, _, note) in zip(rects, bars, strict=True):
        text = f"{value:,.0f}" + (f"\n{note}" if note else "")
        label_above(ax, rect.get_x() + rect.get_width() / 2, value, text)
    first = True
    for x, (_, _, model, _, _) in zip(xs, bars, strict=True):
        target = THROUGHPUT_TARGET_TOK_S.get(model) if model else None
        if target is None:
            continue
        ax.hlines(
            target,
            x - 0.42,
            x + 0.42,
            colors=TARGET_COLOR,
            linestyles="--",
            linewidth=1.6,
            label="issue 12 target for the model" if first else None,
        )
        first = False
        ax.annotate(
            f"target >= {target:,}",
            (x, target),
            ha="center",
            va="center",
            fontsize=7.5,
            color=TARGET_COLOR,
            bbox={
                "boxstyle": "round,pad=0.2",
                "facecolor": "white",
                "edgecolor": TARGET_COLOR,
                "linewidth": 0.6,
            },
        )
    if not first:
        ax.legend(loc="upper right", fontsize=8.5)
    ax.set_ylim(0, top * 1.28)
    ax.set_ylabel("output tok/s")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    titles = {d.get("title", "") for d in docs}
    devices = {d.get("machine", {}).get("device_name", "") for d in docs}
    title = "Offline throughput on " + ", ".join(sorted(devices))
    if len(titles) == 1:
        title += "\n" + titles.pop().removeprefix("throughput: ")
    ax.set_title(title, fontsize=10)

    if has_idle:
        ax2 = axes[1][0]
        shares = [b[3] for b in bars]
        for x, share in zip(xs, shares, strict=True):
            if share is None:
                ax2.annotate("not measured", (x, 0), xytext=(0, 3), textcoords="offset points", ha="center")
                continue
            ax2.bar(x, 100 * share, color="C1", width=0.62)
            label_above(ax2, x, 100 * share, f"{100 * share:.1f}%")
        ax2.set_ylim(0, max(100 * s for s in shares if s is not None) * 1.35 + 1)
        ax2.set_ylabel("device idle\nbetween steps, %")
        ax2.set_title("share of device time the device waited for the host", fontsize=9)
        bottom = ax2
    else:
        bottom = ax
    bottom.set_xticks(list(xs), [b[0] for b in bars], fontsize=8.5)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


PREFIX_ROWS = (
    ("cold", "cold"),
    ("warm", "in the device pool"),
    ("tier", "loaded from the host tier"),
)


def plot_prefix(path: str, dst: str, clock: str = "engine") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = _load(path)
    res = doc["results"]
    key = f"ttft_{clock}_s"
    rows = [(k, label) for k, label in PREFIX_ROWS if k in res]
    cold_median = statistics.median(res["cold"][key]) if "cold" in res else None

    fig, ax = plt.subplots(figsize=(9.5, 6.2))
    w = 0.36
    ticks = []
    for i, (k, label) in enumerate(rows):
        row = res[k]
        ttfts = [t * 1e3 for t in row[key]]
        med, lo, hi = statistics.median(ttfts), min(ttfts), max(ttfts)
        floor = row["compute_floor_s"] * 1e3
        cached = statistics.median(row["cached_tokens"])
        computed = statistics.median(
            p - c for p, c in zip(row["prompt_tokens"], row["cached_tokens"], strict=True)
        )
        ticks.append(f"{label}\ncached {cached:,.0f}, computed {computed:,.0f}")

        ax.bar(i - w / 2, med, w, color="C0", label="TTFT, median (bar: min-max)" if i == 0 else None)
        ax.errorbar(i - w / 2, med, yerr=[[med - lo], [hi - med]], color="k", capsize=5, linewidth=1.2)
        ax.bar(i + w / 2, floor, w, color="0.65", label="compute floor" if i == 0 else None)
        # Inside the bar (the target lines sit just over the bars' tops), at its middle on the log axis.
        ax.annotate(
            f"{med:.1f} ms\n({lo:.1f}-{hi:.1f})",
            (i - w / 2, med**0.5),
            ha="center",
            va="center",
            fontsize=8.5,
            fontweight="bold",
            color="white",
        )
        ax.annotate(
            f"{floor:.1f} ms",
            (i + w / 2, floor),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8.5,
        )

        # Each target as the TTFT it allows, over the TTFT bar.
        if k == "cold":
            allowed = floor / COLD_FLOOR_SHARE_TARGET
            text = f"floor/TTFT {floor / med:.1%}\ntarget >= {COLD_FLOOR_SHARE_TARGET:.0%}"
            met = floor / med >= COLD_FLOOR_SHARE_TARGET
        elif k == "warm":
            allowed = floor * DEVICE_POOL_FLOOR_FACTOR_TARGET
            text = f"TTFT {med / floor:.2f}x floor\ntarget <= {DEVICE_POOL_FLOOR_FACTOR_TARGET:g}x"
            met = med <= allowed
        elif cold_median is not None:
            cold_ms = cold_median * 1e3
            allowed = cold_ms * HOST_OF_COLD_TARGET
            text = f"TTFT {med / cold_ms:.1%} of cold\ntarget <= {HOST_OF_COLD_TARGET:.0%}"
            met = med <= allowed
        else:
            continue
        ax.hlines(
            allowed,
            i - w - 0.04,
            i + 0.02,
            colors=TARGET_COLOR,
            linestyles="--",
            linewidth=1.6,
            label="TTFT the target allows" if i == 0 else None,
        )
        ax.annotate(
            f"{text}: {'met' if met else 'missed'}",
            (i - w - 0.04, allowed),
            xytext=(-4, 0),
            textcoords="offset points",
            ha="right",
            va="center",
            fontsize=8,
            color=TARGET_COLOR,
        )

    load = res.get("tier_load")
    if load and "tier" in res:
        pinned = load.get("pinned_h2d_bytes_per_s")
        text = (
            f"host-tier load: {load['loaded_bytes'] / 1e6:,.0f} MB, "
            f"whole TTFT at {load['bytes_per_s'] / 1e9:.1f} GB/s"
        )
        if pinned:
            text += f"\n= {load['bytes_per_s'] / pinned:.0%} of the pinned copy ({pinned / 1e9:.1f} GB/s)"
        ax.text(0.99, 0.985, text, transform=ax.transAxes, ha="right", va="top", fontsize=8)

    ax.set_yscale("log")
    ax.set_ylim(1, ax.get_ylim()[1] * 2.5)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_ylabel(f"TTFT, ms ({clock} clock, log scale)")
    ax.set_xticks(range(len(rows)), ticks, fontsize=9)
    ax.set_xlim(-1.05, len(rows) - 0.5)
    settings = doc.get("settings", {})
    ax.set_title(
        f"{settings.get('model', '')} on {doc.get('machine', {}).get('device_name', '')}: "
        f"{doc.get('title', '').removeprefix('prefix-ttft: ')}",
        fontsize=9.5,
    )
    ax.legend(loc="upper center", fontsize=8.5, ncols=3, bbox_to_anchor=(0.5, -0.14), frameon=False)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="figure", required=True)
    tp = sub.add_parser("throughput", help="output tok/s per `kvtier bench throughput --json` run")
    tp.add_argument("json", nargs="+", help="throughput JSON files, in the order of the bars")
    tp.add_argument("-o", "--out", required=True, help="PNG to write")
    px = sub.add_parser("prefix", help="TTFT per row of one `kvtier bench prefix --json` run")
    px.add_argument("json", help="prefix JSON file")
    px.add_argument("-o", "--out", required=True, help="PNG to write")
    px.add_argument(
        "--clock",
        choices=("engine", "wall"),
        default="engine",
        help="which TTFT: the engine's (what docs/benchmarks.md quotes) or the client's wall clock",
    )
    args = parser.parse_args(argv)
    if args.figure == "throughput":
        plot_throughput(args.json, args.out)
    else:
        plot_prefix(args.json, args.out, args.clock)


if __name__ == "__main__":
    main()
