"""Hugging Face's continuous batching (``ContinuousBatchingManager``, paged SDPA) as the peer of
`kvtier bench throughput --hf-peer`: the same weights, prompts and output lengths, in the same run.

The peer is measured after kvtier's own run, with kvtier's engine freed first, so neither sees the
other's memory. A failure of the peer (an API that changed between transformers releases) is
reported in the results instead of losing kvtier's figures.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from kvtier.bench.report import sync
from kvtier.engine.engine import Engine


def hf_copy_on_host(engine: Engine, attn_implementation: str = "paged|sdpa") -> Any:
    """A transformers model holding the engine's weights (synthetic ones included), on the host:
    it moves to the device only after the engine (and its KV pool) is freed."""
    from transformers import AutoModelForCausalLM

    from kvtier.bench.gpu_decode import transformers_config

    cfg = transformers_config(engine.loaded.hf_config)
    dtype = engine.loaded.config.dtype
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn_implementation)
    model.load_state_dict(engine.model.state_dict(), strict=False)
    return model.eval()


def run_hf_peer(
    model: Any, prompts: list[list[int]], output_lens: list[int], device: torch.device
) -> dict[str, Any]:
    """Every prompt queued at once with its own ``max_new_tokens``; greedy; EOS never stops a
    request early (its id is set outside the vocabulary), as kvtier's run uses ``ignore_eos``."""
    from transformers.generation import GenerationConfig

    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max(output_lens),
        eos_token_id=model.config.vocab_size + 1,
        pad_token_id=0,
    )
    manager = model.init_continuous_batching(generation_config=config)
    manager.start()
    try:
        _warm_up(manager, prompts[0][:64])
        sync(device)
        t0 = time.perf_counter()
        ids = [
            manager.add_request(p, request_id=f"r{i}", max_new_tokens=o)
            for i, (p, o) in enumerate(zip(prompts, output_lens, strict=True))
        ]
        produced = _collect(manager, len(ids))
        sync(device)
        elapsed = time.perf_counter() - t0
    finally:
        manager.stop(block=True)
    return {
        "elapsed_s": elapsed,
        "output_tokens": produced,
        "output_tokens_per_s": produced / elapsed,
        "how": "transformers ContinuousBatchingManager, attn paged|sdpa, per-request max_new_tokens",
    }


def _warm_up(manager: Any, prompt: list[int]) -> None:
    manager.add_request(prompt, request_id="warm-up", max_new_tokens=8)
    _collect(manager, 1)


def _collect(manager: Any, n: int, timeout_s: float = 1800.0) -> int:
    """Waits for ``n`` finished requests; returns the tokens they generated."""
    tokens, done, deadline = 0, 0, time.monotonic() + timeout_s
    while done < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"HF peer: {done} of {n} requests finished in {timeout_s:.0f} s")
        out = manager.get_result(timeout=1.0)
        if out is None or not _finished(out):
            continue
        done += 1
        tokens += len(out.generated_tokens)
    return tokens


def _finished(out: Any) -> bool:
    finished = getattr(out, "is_finished", None)
    return bool(finished()) if callable(finished) else True


def hf_peer(
    model: Any, device: torch.device, prompts: list[list[int]], output_lens: list[int]
) -> dict[str, Any]:
    """The peer's figures, or the reason it could not run."""
    try:
        return run_hf_peer(model.to(device), prompts, output_lens, device)
    except Exception as e:  # a peer that cannot run is reported, not fatal
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        if device.type == "cuda":
            model.to("cpu")
            torch.cuda.empty_cache()
