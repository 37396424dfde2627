#!/usr/bin/env bash
# The tier issue's GPU figures in one device call: the CUDA tests (GPU paths against their CPU
# reference), then tier ceilings for a small and an 8B-model block layout, then the chat workload
# (host + disk tiers, disk only, device pool only, no caching). Results go to $OUT (default /tmp).
# Kept as a script: it is the recipe of one device call (tests and benchmarks together), not a benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-/tmp/kvtier-gpu}
mkdir -p "$OUT"
log="$OUT/gpu_tiers.txt"
{
  python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())'
  python3 -m pytest -q -p no:cacheprovider tests/test_gpu_tiers.py tests/test_sampler.py -k "cuda or gpu" 2>&1 | tail -25
  python3 -m kvtier.cli bench tiers --device cuda --total 1GiB --json "$OUT/ceilings-small.json"
  python3 -m kvtier.cli bench tiers --device cuda --model synthetic:llama-3.1-8b --total 2GiB \
    --json "$OUT/ceilings-8b.json"
  python3 -m kvtier.cli bench chat --device cuda --tiers host,disk --json "$OUT/chat-host-disk.json"
  python3 -m kvtier.cli bench chat --device cuda --tiers disk --json "$OUT/chat-disk.json"
} 2>&1 | tee "$log"
