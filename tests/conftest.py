"""Shared pytest set-up.

- Without CUDA, Triton kernels run under Triton's CPU interpreter: TRITON_INTERPRET=1 must be
  set before triton is first imported, which is why it happens here, before any test module
  imports moe_engine. On a CUDA machine the compiled kernels are tested instead.
- Tests marked `gpu` run where CUDA is present and are skipped elsewhere.
- `seen_configs`: the configs the CLI builds Trainers from, with a stand-in Trainer that trains nothing.
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


@pytest.fixture
def seen_configs(monkeypatch):
    """The configs the CLI builds Trainers from (a list, filled as it goes); the stand-in Trainer then
    refuses with a ValueError, which the CLI reports as exit 2, so nothing trains."""
    import moe_engine.train

    seen = []

    def trainer(cfg, **_):
        seen.append(cfg)
        raise ValueError("stand-in Trainer: records its config, trains nothing")

    monkeypatch.setattr(moe_engine.train, "Trainer", trainer)
    return seen
