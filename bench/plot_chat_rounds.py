"""Per-round wall time and TTFT p50 of each configuration of a ``kvtier bench chat --json`` file.

    python bench/plot_chat_rounds.py docs/results/h200-chat-8b-long-device-loads.json out.png

The chat bench's own plots (``--out``) show the median round; this shows every round, so the
spread between rounds that the issue's target speaks of can be seen beside the gaps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(src: str, dst: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = json.loads(Path(src).read_text())["results"]["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.7 * len(runs) + 1.5))
    for ax, (key, scale, label) in zip(
        axes, (("wall_s", 1.0, "wall, s"), ("ttft_p50_s", 1e3, "TTFT p50, ms")), strict=True
    ):
        for y, run in enumerate(runs):
            values = [r[key] * scale for r in run["rounds"]]
            ax.plot([min(values), max(values)], [y, y], color="0.7", linewidth=6, solid_capstyle="butt")
            ax.scatter(values, [y] * len(values), color="C0", zorder=3)
        ax.set_yticks(range(len(runs)), [run["label"] for run in runs])
        ax.set_xlabel(label + " (each dot a round; bar: the range)")
        ax.set_xlim(left=0)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
