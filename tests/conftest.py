"""Shared test set-up: real redis-server fixtures for every test file, hermetic cache settings."""

import os

import torch

pytest_plugins = ["tests.redis_servers", "tests.memcached_servers"]

# Tests that want tiers ask for them; others must not read or write the user's cache folder.
os.environ.setdefault("KVTIER_TIERS", "none")
os.environ.pop("KVTIER_CACHE_SECRET", None)

# Two threads match the CI machine; tests stay comparable whatever the host has.
torch.set_num_threads(min(2, torch.get_num_threads()))
