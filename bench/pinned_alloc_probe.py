"""Does a page-locked allocation on one thread stall CUDA launches on another? (H200 figures:
docs/benchmarks.md, issue 12, "Page-locked memory made mid-run".)

    python3 bench/pinned_alloc_probe.py
"""

import threading
import time

import torch

x = torch.zeros(1024, device="cuda")


def launches(n=3000):
    t = time.perf_counter()
    for _ in range(n):
        x.add_(1)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


launches()
base = [round(launches(), 1) for _ in range(3)]
t = time.perf_counter()
keep = [torch.empty(64 << 20, dtype=torch.uint8, pin_memory=True) for _ in range(8)]
alloc_ms = (time.perf_counter() - t) / 8 * 1e3
stop = False
chunks = []


def alloc_loop():
    while not stop and len(chunks) < 48:
        chunks.append(torch.empty(64 << 20, dtype=torch.uint8, pin_memory=True))


th = threading.Thread(target=alloc_loop)
th.start()
conc = [round(launches(), 1) for _ in range(3)]
stop = True
th.join()
# a 2 MiB copy between page-locked rows on another thread (the host tier's write)
src = torch.empty(2 << 20, dtype=torch.uint8, pin_memory=True)
dst = torch.empty(2 << 20, dtype=torch.uint8, pin_memory=True)
t = time.perf_counter()
for _ in range(200):
    dst.copy_(src)
copy_us = (time.perf_counter() - t) / 200 * 1e6
stop = False


def copy_loop():
    while not stop:
        dst.copy_(src)


th = threading.Thread(target=copy_loop)
th.start()
conc_copy = [round(launches(), 1) for _ in range(3)]
stop = True
th.join()
print(
    f"PIN launch us alone {base}; 64MiB pinned alloc {alloc_ms:.1f} ms; "
    f"launch us during allocs {conc} ({len(chunks)} allocs); "
    f"2MiB pinned copy {copy_us:.0f} us (threads {torch.get_num_threads()}); "
    f"launch us during copies {conc_copy}"
)
