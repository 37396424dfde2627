"""Hugging Face ``generate`` with and without kvtier's store, for prompts sharing a long prefix.

    python3 bench/bench_hf.py [--prefix-len 1024] [--suffix-len 32] [--new-tokens 8] [--rounds 3]
                              [--hidden 512 --layers 8] [--threads N] [--tiers disk] [--json PATH]

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
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvtier.bench.report import load_average, machine_info, print_table
from kvtier.integrations.hf import KVTierStore


def make_model(folder: Path, args: argparse.Namespace) -> LlamaForCausalLM:
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


def timed(fn) -> tuple[torch.Tensor, float]:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefix-len", type=int, default=1024)
    p.add_argument("--suffix-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--tiers", default="disk")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, args.vocab, (args.prefix_len,), generator=gen)

    def prompt(i: int) -> torch.Tensor:
        suffix = torch.randint(
            0, args.vocab, (args.suffix_len,), generator=torch.Generator().manual_seed(100 + i)
        )
        return torch.cat([prefix, suffix])[None]

    kw = dict(max_new_tokens=args.new_tokens, do_sample=False)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp) / "model", args)
        store = KVTierStore(model, tiers=args.tiers, disk_path=str(Path(tmp) / "cache"))

        def plain(ids: torch.Tensor) -> torch.Tensor:
            return model.generate(ids, attention_mask=torch.ones_like(ids), **kw)

        with torch.inference_mode():
            plain(prompt(0))  # warm-up
            store.generate(prompt(0), **kw)  # untimed: stores the prefix
            t_plain, t_store, t_suffix, same = [], [], [], True
            for i in range(1, args.rounds + 1):
                a, ta = timed(lambda i=i: plain(prompt(i)))
                b, tb = timed(lambda i=i: store.generate(prompt(i), **kw))
                _, tc = timed(lambda i=i: plain(prompt(i)[:, args.prefix_len :]))
                same = same and torch.equal(a, b)
                t_plain.append(ta)
                t_store.append(tb)
                t_suffix.append(tc)
        loaded = store.stats.loaded_tokens
        store.close()
    mp, ms, mc = (statistics.median(t) for t in (t_plain, t_store, t_suffix))
    info = machine_info(torch.device("cpu"))
    print(
        f"# bench_hf: Llama hidden {args.hidden} x {args.layers} layers, prefix {args.prefix_len} + suffix "
        f"{args.suffix_len}, {args.new_tokens} new tokens, tier {args.tiers}, {info['device_name']}, "
        f"{info['torch_threads']} threads, load {load_average()}"
    )
    print(f"# greedy outputs identical: {same}; prompt tokens loaded from the store: {loaded}")
    print_table(
        ["call", "median s", "speedup", "ceiling"],
        [
            ["model.generate", f"{mp:.3f}", "1.00x", ""],
            ["KVTierStore.generate", f"{ms:.3f}", f"{mp / ms:.2f}x", f"{mp / mc:.2f}x"],
        ],
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(dict(machine=info, args=vars(args), plain=t_plain, store=t_store, suffix=t_suffix))
        )


if __name__ == "__main__":
    main()
