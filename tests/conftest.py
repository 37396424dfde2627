"""Shared test set-up: real redis-server fixtures for every test file, and a fixed torch thread count."""

import torch

pytest_plugins = ["tests.redis_servers"]

# Two threads match the CI machine; tests stay comparable whatever the host has.
torch.set_num_threads(min(2, torch.get_num_threads()))
