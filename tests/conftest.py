"""Shared pytest set-up.

- Without CUDA, Triton kernels run under Triton's CPU interpreter: TRITON_INTERPRET=1 must be
  set before triton is first imported, which is why it happens here, before any test module
  imports moe_engine. On a CUDA machine the compiled kernels are tested instead.
- Tests marked `gpu` run where CUDA is present and are skipped elsewhere.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
