"""Latency CDFs as an SVG file: no plotting library needed (none is a dependency of kvtier)."""

from __future__ import annotations

import math
from typing import Any

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def plot_svg(body: dict[str, Any], path: str) -> None:
    """Latency CDFs (TTFT, ITL, e2e), one panel each, one line per run; log-scaled time axis."""
    panels = (("ttft", "TTFT"), ("itl", "inter-token latency"), ("e2e", "end-to-end latency"))
    width, height, pad = 360, 260, 40
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width * 3}" height="{height + 30}" '
        'font-family="sans-serif" font-size="11">'
    ]
    for p, (key, title) in enumerate(panels):
        x0 = p * width
        series = {}
        for name, run in body["runs"].items():
            samples = [s for s in run["samples"] if not s["error"]]
            values = [x for s in samples for x in s["itl"]] if key == "itl" else [s[key] for s in samples]
            series[name] = sorted(v * 1e3 for v in values if v > 0)
        everything = [v for vs in series.values() for v in vs]
        if not everything:
            continue
        lo, hi = math.log10(min(everything)), math.log10(max(everything))
        hi = hi if hi > lo else lo + 1

        def sx(v: float, x0: int = x0, lo: float = lo, hi: float = hi) -> float:
            return x0 + pad + (math.log10(v) - lo) / (hi - lo) * (width - 2 * pad)

        def sy(q: float) -> float:
            return height - pad + 10 - q * (height - 2 * pad)

        parts.append(f'<text x="{x0 + width / 2}" y="14" text-anchor="middle">{title} (ms, CDF)</text>')
        parts.append(
            f'<rect x="{x0 + pad}" y="{sy(1)}" width="{width - 2 * pad}" height="{height - 2 * pad}" '
            'fill="none" stroke="#999"/>'
        )
        for tick in range(math.floor(lo), math.ceil(hi) + 1):
            if lo <= tick <= hi:
                x = sx(10.0**tick)
                parts.append(f'<text x="{x}" y="{sy(0) + 14}" text-anchor="middle">{10.0**tick:g}</text>')
        for i, (name, vs) in enumerate(series.items()):
            if not vs:
                continue
            color = _COLORS[i % len(_COLORS)]
            step = max(1, len(vs) // 400)  # at most ~400 points a line
            pts = " ".join(
                f"{sx(v):.1f},{sy((j + 1) / len(vs)):.1f}" for j, v in enumerate(vs) if j % step == 0
            )
            parts.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.5"/>')
            parts.append(f'<text x="{x0 + pad + 6}" y="{sy(1) + 14 + 13 * i}" fill="{color}">{name}</text>')
    parts.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(parts))
