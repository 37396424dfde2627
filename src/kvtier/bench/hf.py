"""`kvtier bench hf`: Hugging Face ``generate`` with and without kvtier's store, for prompts sharing
a long prefix (was bench/bench_hf.py, which now calls this).

A random Llama of the given shape is saved with save_pretrained to a temporary folder and loaded
back with from_pretrained (the store fingerprints the folder). Each round asks a new suffix after
the same prefix, greedy: plain ``model.generate`` computes the whole prompt every time;
``KVTierStore.generate`` loads the prefix's blocks from the tier (stored by an untimed first call)
and prefills only the suffix. Reported: median seconds per call, the speedup, and its ceiling,
the plain call's time over the time of a plain call on the suffix alone (what a free load of the
prefix would give; the decode steps still attend over the whole context). Never asserts on time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvtier.bench.report import finish, machine_info, print_machine, print_table


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix-len", type=int, default=1024)
    p.add_argument("--suffix-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--tiers", default="disk")


def make_model(folder: Path, args: argparse.Namespace) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 128),
        max_position_embeddings=args.prefix_len + args.suffix_len + args.new_tokens + 64,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return LlamaForCausalLM.from_pretrained(folder).eval()


def timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench_hf(args: argparse.Namespace) -> None:
    from kvtier.integrations.hf import KVTierStore

    gen = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, args.vocab, (args.prefix_len,), generator=gen)

    def prompt(i: int) -> torch.Tensor:
        suffix = torch.randint(
            0, args.vocab, (args.suffix_len,), generator=torch.Generator().manual_seed(100 + i)
        )
        return torch.cat([prefix, suffix])[None]

    kw: dict[str, Any] = dict(max_new_tokens=args.new_tokens, do_sample=False)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp) / "model", args)
        store = KVTierStore(model, tiers=args.tiers, disk_path=str(Path(tmp) / "cache"))

        def plain(ids: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
            return out

        with torch.inference_mode():
            plain(prompt(0))  # warm-up
            store.generate(prompt(0), **kw)  # untimed: stores the prefix
            t_plain, t_store, t_suffix, same = [], [], [], True
            for i in range(1, args.rounds + 1):
                a, ta = timed(lambda i=i: plain(prompt(i)))  # type: ignore[misc]
                b, tb = timed(lambda i=i: store.generate(prompt(i), **kw))  # type: ignore[misc]
                _, tc = timed(lambda i=i: plain(prompt(i)[:, args.prefix_len :]))  # type: ignore[misc]
                same = same and torch.equal(a, b)
                t_plain.append(ta)
                t_store.append(tb)
                t_suffix.append(tc)
        loaded = store.stats.loaded_tokens
        store.close()
    mp, ms, mc = (statistics.median(t) for t in (t_plain, t_store, t_suffix))
    title = (
        f"hf: Llama hidden {args.hidden} x {args.layers} layers, prefix {args.prefix_len} + suffix "
        f"{args.suffix_len}, {args.new_tokens} new tokens, tier {args.tiers}"
    )
    machine = machine_info(torch.device("cpu"))
    print_machine(title, machine)
    print(f"greedy outputs identical: {same}; prompt tokens loaded from the store: {loaded}\n")
    print_table(
        ["call", "median s", "speedup", "ceiling"],
        [
            ["model.generate", f"{mp:.3f}", "1.00x", ""],
            ["KVTierStore.generate", f"{ms:.3f}", f"{mp / ms:.2f}x", f"{mp / mc:.2f}x"],
        ],
    )
    results = dict(plain=t_plain, store=t_store, suffix=t_suffix, identical=same, loaded_tokens=loaded)
    finish(args, title, machine, results)
