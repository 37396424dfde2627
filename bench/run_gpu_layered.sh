#!/usr/bin/env bash
# Issue 12's layered host loads in one device call: the CUDA tests of the paths they touch (GPU
# against the CPU reference and a cold run), then the 4k-prefix TTFT loaded from the host tier with
# a bf16 and an fp8 pool, and the whole-block road as the A/B. Results go to $OUT (default /tmp).
# Kept as a script: it is the recipe of one device call, not a benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/kvtier-gpu}
mkdir -p "$OUT"
prefix=(python3 -m kvtier.cli bench prefix --model synthetic:llama-3.1-8b --device cuda --prefix-len 4096
  --max-num-batched-tokens 8192 --repeats 5 --tiers host --set write_policy=write-through --cold-mode off)
{
  python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'
  python3 -m pytest -q -p no:cacheprovider tests/test_layered_loads.py tests/test_gpu_tiers.py \
    tests/test_extend_graphs.py tests/test_mixed_graphs.py tests/test_overlap.py 2>&1 | tail -25
  "${prefix[@]}" --json "$OUT/prefix-8b-layered.json"
  "${prefix[@]}" --set kv_cache_dtype=fp8 --json "$OUT/prefix-8b-fp8-layered.json"
  "${prefix[@]}" --set layered_loads=false --json "$OUT/prefix-8b-whole-blocks.json"
} 2>&1 | tee "$OUT/gpu_layered.txt"
