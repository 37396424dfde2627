"""One-off: the offline engine, then each of several running servers, round after round (A/B/C...).

    OMP_NUM_THREADS=1 python bench/serve_ab.py ROUNDS URL [URL ...]   # servers: OMP_NUM_THREADS=1 too

`kvtier bench serve` pairs the offline engine with one server; comparing two server builds (before /
after a change) on this shared machine needs them in the same rounds too. Workload: the one of
docs/benchmarks.md "Serving" (synthetic:tiny, 100 chats in flight, 2 turns, 24 tokens a turn).
Prints each round's ratios to that round's offline run, then per server the median and range.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import statistics
import sys

from kvtier.bench import serve as bs
from kvtier.config import EngineConfig

SETTINGS = {"model": "synthetic:tiny", "kv_cache_memory": 64000000, "max_num_seqs": 128, "tiers": "none"}


def main(rounds: int, urls: list[str]) -> None:
    import torch

    # like the servers (OMP_NUM_THREADS=1): torch's default 2 threads stall each other here whenever
    # another process takes a core, which made the offline engine 4x slower in a run without it
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = EngineConfig.load(SETTINGS)
    w = bs.Workload(100, 2, 4, 40, 12, 24, 100)
    ratios: dict[str, tuple[list[float], list[float]]] = {u: ([], []) for u in urls}
    loads = []
    for r in range(rounds):
        wr = dataclasses.replace(w, seed=5000 + r)
        off = bs.summarize(*bs.offline(wr, cfg))
        line = [
            f"r{r} offline {off['output_token_throughput']:.0f} tok/s ttft {off['ttft_cached_p50_ms']:.0f}"
        ]
        for u in urls:
            asyncio.run(bs.run_http(bs.warmup_workload(wr), u, "synthetic:tiny"))
            s = bs.summarize(*asyncio.run(bs.run_http(wr, u, "synthetic:tiny")))
            t = s["output_token_throughput"] / off["output_token_throughput"]
            q = s["ttft_cached_p50_ms"] / off["ttft_cached_p50_ms"]
            ratios[u][0].append(t)
            ratios[u][1].append(q)
            tput, ttft = s["output_token_throughput"], s["ttft_cached_p50_ms"]
            line.append(f"{u} {tput:.0f} ({t:.2f}) ttft {ttft:.0f} ({q:.2f})")
        loads.append(os.getloadavg()[0])
        print(" | ".join(line), f"load {loads[-1]:.2f}", flush=True)
    for u, (t, q) in ratios.items():
        print(
            f"{u}: throughput/offline {statistics.median(t):.2f} [{min(t):.2f}-{max(t):.2f}], "
            f"cached TTFT/offline {statistics.median(q):.2f} [{min(q):.2f}-{max(q):.2f}]"
        )
    print(f"load average over the rounds {min(loads):.2f}-{max(loads):.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:])
