"""On a CUDA machine: does kvtier's greedy output match Hugging Face's on the GPU?

For each architecture, a tiny random model (built with ``tests.models``, saved with
``save_pretrained``) runs in transformers and in kvtier on the same GPU: float32 must give identical
greedy tokens and close logits; bfloat16 reports the first-step logit gap and how many of the greedy
tokens agree (bf16 rounding lets long greedy runs diverge). Prints a table; ``--json`` writes it.
Run from the repository root: ``PYTHONPATH=src:. python bench/gpu_check.py``.

Kept as a script, not a `kvtier bench` command: a correctness check built on the tests'
``tests/models.py``, which the installed package must not import.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch
from tests.models import hf_greedy, make_hf_model, random_prompt, save_model

from kvtier import LLM, SamplingParams

CASES = ("llama", "mistral", "qwen2", "qwen3")
NEW_TOKENS = 32


def check(arch: str, dtype: torch.dtype, folder: str) -> dict[str, object]:
    hf = make_hf_model(arch, seed=1).to("cuda", dtype).eval()
    prompt = random_prompt(40, seed=2)
    ref_tokens, ref_logits = hf_greedy(hf, prompt, NEW_TOKENS)
    llm = LLM(
        folder, device="cuda", dtype=str(dtype).removeprefix("torch."), kv_cache_memory=64 << 20, tiers="none"
    )
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, return_logits=True)
    out = llm.generate([prompt], params)[0].outputs[0]
    assert out.logits is not None
    agree = next(
        (i for i, (a, b) in enumerate(zip(out.token_ids, ref_tokens, strict=True)) if a != b), NEW_TOKENS
    )
    first_gap = (out.logits[0].float() - ref_logits[0].float().cpu()).abs().max().item()
    llm.engine.pool.assert_idle()
    return {
        "arch": arch,
        "dtype": str(dtype),
        "identical": out.token_ids == ref_tokens,
        "tokens_agreeing": agree,
        "first_step_max_logit_diff": first_gap,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check needs a GPU")
    rows = []
    for arch in CASES:
        with tempfile.TemporaryDirectory() as folder:
            save_model(make_hf_model(arch, seed=1), folder)
            for dtype in (torch.float32, torch.bfloat16):
                rows.append(check(arch, dtype, folder))
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| arch | dtype | greedy identical | tokens agreeing (of 32) | first-step max logit diff |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['arch']} | {r['dtype']} | {r['identical']} | {r['tokens_agreeing']} | "
            f"{r['first_step_max_logit_diff']:.2e} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
