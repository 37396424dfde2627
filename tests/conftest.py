"""Shared test set-up: real redis-server fixtures for every test file, hermetic cache settings."""

import gc
import os
from collections.abc import Iterator

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter. The switch must be set before
# anything imports triton (transformers does, while test modules are collected): triton's own
# @jit helpers made without it cannot be called from an interpreted kernel.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest_plugins = ["tests.redis_servers", "tests.memcached_servers"]

# Tests that want tiers ask for them; others must not read or write the user's cache folder.
os.environ.setdefault("KVTIER_TIERS", "none")
# The result cache (on by default) would answer a test's repeated request without running the
# model that test is about; tests of the result cache turn it on.
os.environ.setdefault("KVTIER_RESULT_CACHE", "false")
os.environ.pop("KVTIER_CACHE_SECRET", None)

# Two threads match the CI machine; tests stay comparable whatever the host has.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True, scope="module")
def give_the_gpu_back() -> Iterator[None]:
    """On CUDA, free what a test module's engines held before the next module sizes its pool from
    the free memory: an engine's objects refer to each other, so its pool stays allocated until a
    collection runs; an engine sized "90% of free" in test_gpu_tiers left test_gpu_memory's
    engines 11 MiB of the H200 (both of its tests failed in one run of the GPU files)."""
    yield
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()
