"""Activation checkpointing of whole transformer blocks (`model.activation_checkpointing`).

A checkpointed block keeps only its inputs for the backward and runs its forward again when the
backward reaches it: memory of one block's activations per layer for about one more forward.
`run_block` is the one place the models call it from, so the choice is the same everywhere:

- non-reentrant `torch.utils.checkpoint` (any outputs, keyword arguments, RNG state restored, so
  dropout masks and noisy routers draw what the forward drew);
- early stopping off: the recomputation runs the block to its end. Under expert parallelism a block
  issues all-to-all exchanges (some asynchronous, with `parallel.a2a_chunks`); every rank must issue
  the same collectives and wait for each one it starts, so the recomputation may not stop between them.
  The recomputed exchanges are real traffic and the dispatcher's meter counts them.
- only where autograd records: under `torch.no_grad()` (evaluation) the block simply runs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop


def run_block(block: Callable[..., Any], *args: Any, checkpointed: bool, **kwargs: Any) -> Any:
    """block(*args, **kwargs), under activation checkpointing when `checkpointed` and autograd records."""
    if not (checkpointed and torch.is_grad_enabled()):
        return block(*args, **kwargs)
    with set_checkpoint_early_stop(False):
        return checkpoint(block, *args, use_reentrant=False, **kwargs)
