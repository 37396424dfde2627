"""Triton kernels for the CUDA path: paged decode attention, the KV write and the small fused
element-wise steps. Importing this package needs ``triton``; ``available()`` says whether it can run.

Every kernel has a torch reference it is tested against (``tests/test_kernels.py``); on a machine
without a GPU the tests run the kernels in Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import importlib.util
import os

import torch


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def available(device: torch.device) -> bool:
    """Whether the kernels can run on tensors of ``device``: CUDA with triton, or the interpreter."""
    if not triton_installed():
        return False
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"
