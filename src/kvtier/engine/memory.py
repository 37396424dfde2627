"""How many blocks the KV pool gets. On the CPU: what max_num_seqs sequences of the whole context
can use, at most a share of the available RAM. On CUDA: a share of the memory free after the
weights, less the largest step's activations, measured at start-up rather than guessed.

The pool is allocated once and never grows, so whatever a step needs on top must be free when it
runs. The largest step is a prefill of ``max_num_batched_tokens`` tokens sampling ``max_num_seqs``
rows (the vocabulary projection of every sampled row is the largest single tensor of a small
model); running it once on a scratch pool and reading the allocator's peak gives its real size,
kernels' workspaces included. Decode graphs, captured after the pool, need much less (their batch
is at most ``max_num_seqs`` rows of one token).
"""

from __future__ import annotations

import logging

import torch

from kvtier.cache.keys import KVLayout
from kvtier.config import EngineConfig
from kvtier.model.attention import AttentionMetadata
from kvtier.model.llama import CausalLM
from kvtier.model.registry import ModelConfig

log = logging.getLogger(__name__)

MIN_CPU_KV_BYTES = 64 << 20


def max_model_len(config: EngineConfig, model: ModelConfig) -> int:
    """The context the engine allows: the setting, at most the model's own."""
    return min(config.scheduler.max_model_len or model.max_position_embeddings, model.max_position_embeddings)


def pool_blocks(
    config: EngineConfig, model: CausalLM, layout: KVLayout, device: torch.device, max_len: int
) -> int:
    """Blocks of the pool: ``kv_cache_memory`` when set, else sized for the device (see above)."""
    ps, ss = config.pool, config.scheduler
    if ps.kv_cache_memory is not None:
        budget = ps.kv_cache_memory
    elif device.type == "cuda":
        budget = cuda_pool_budget(
            model, layout, device, ps.gpu_memory_utilization, ss.max_num_batched_tokens, ss.max_num_seqs
        )
    else:  # no more than the engine can ever use: max_num_seqs sequences of max_len tokens
        usable = ss.max_num_seqs * -(-max_len // ps.block_size) * layout.bytes_per_block
        budget = min(usable, max(MIN_CPU_KV_BYTES, int(available_ram() * ps.cpu_kv_cache_fraction)))
    num = budget // layout.bytes_per_block
    if num < 1:
        raise ValueError(
            f"kv_cache_memory={budget} bytes holds no block: one block takes {layout.bytes_per_block} bytes"
        )
    return int(num)


def available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


@torch.inference_mode()
def peak_step_bytes(model: CausalLM, layout: KVLayout, num_tokens: int, num_rows: int) -> int:
    """Bytes the largest step allocates beyond what is allocated now (CUDA): one sequence of
    ``num_tokens`` new tokens whose last ``num_rows`` rows are sampled, on a scratch pool."""
    device = next(model.parameters()).device
    bs = layout.block_size
    blocks = -(-num_tokens // bs)
    shape = (layout.num_layers, 2, blocks, bs, layout.num_kv_heads, layout.head_dim)
    dtype = getattr(torch, layout.dtype)
    if dtype.itemsize == 1:  # fp8: zeros made as bytes (the same bits), as the pool's own are
        scratch = torch.zeros(shape, dtype=torch.uint8, device=device).view(dtype)
    else:
        scratch = torch.zeros(shape, dtype=dtype, device=device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)

    def on_device(data: list[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=device)

    meta = AttentionMetadata(
        slot_mapping=torch.arange(num_tokens, device=device),
        query_start_loc=on_device([0, num_tokens], torch.int32),
        context_lens=on_device([num_tokens], torch.int32),
        block_tables=torch.arange(blocks, dtype=torch.int32, device=device).view(1, blocks),
        query_lens_host=[num_tokens],
        context_lens_host=[num_tokens],
        num_decodes=0,
    )
    ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    rows = torch.arange(num_tokens - min(num_rows, num_tokens), num_tokens, device=device)
    logits = model(ids, torch.arange(num_tokens, device=device), scratch, meta, rows)
    torch.sort(logits.softmax(-1), dim=-1, descending=True)  # the sampler's top-p temporaries
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del logits, scratch
    torch.cuda.empty_cache()
    return int(peak)


def cuda_pool_budget(
    model: CausalLM,
    layout: KVLayout,
    device: torch.device,
    utilization: float,
    num_tokens: int,
    num_rows: int,
) -> int:
    """Bytes for the KV pool: ``utilization`` of the device memory still free (after the weights,
    the CUDA context, and other engines or processes), less the largest step's measured
    activations (they must fit beside the pool: it never shrinks)."""
    activations = peak_step_bytes(model, layout, num_tokens, num_rows)
    free, total = torch.cuda.mem_get_info(device)
    budget = int((free - activations) * utilization)
    gib = 2**30
    log.info(
        "KV pool budget %.2f GiB: %.0f%% of the %.1f GiB free less %.2f GiB for a %d-token step",
        budget / gib, 100 * utilization, free / gib, activations / gib, num_tokens,
    )  # fmt: skip
    if budget <= 0:
        raise ValueError(
            f"no device memory is left for the KV pool: {free / gib:.2f} of {total / gib:.1f} GiB "
            f"are free, and a step of {num_tokens} tokens needs {activations / gib:.2f} GiB: free "
            f"memory, lower max_num_batched_tokens, or set kv_cache_memory"
        )
    return budget
