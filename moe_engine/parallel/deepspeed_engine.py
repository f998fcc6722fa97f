"""Training under DeepSpeed's engine: `deepspeed --num_gpus N --module moe_engine.train --deepspeed_config ...`.

DeepSpeed owns backward, gradient reduction (ZeRO stage 0/1/2), clipping, the optimizer and
scheduler steps, and checkpoints; moe_engine keeps the routing, the dispatch and the experts.

Experts run replicated under DeepSpeed (expert_parallel_size = 1): DeepSpeed 0.19 recognises
expert parameters and saves expert shards only for modules of its own class
(`deepspeed.moe.layer.MoE`), found with isinstance; a foreign MoE layer's sharded experts would be
reduced over the wrong group and half of them lost from its checkpoints. Expert parallelism is
launched with torchrun (launch/torchrun.sh), whose loop reduces and checkpoints shards correctly.

Gradient scale: DeepSpeed divides every reduced gradient by the data-parallel world size W.
moe_engine's losses are normalised for a SUM over ranks (see runtime.py), so the loss handed to
`engine.backward` is multiplied by W, which makes DeepSpeed's gradients those of the
single-process run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from moe_engine.config import Config


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed JSON config that does not fit the run config; the message names both values."""


def load_deepspeed_config(path: str | Path, cfg: Config, world_size: int, bf16: bool) -> dict[str, Any]:
    """Read a DeepSpeed JSON config and fill its "auto" values from the run config.

    train_batch_size = data.batch_size (the global batch), train_micro_batch_size_per_gpu =
    data.batch_size / W, gradient_accumulation_steps = 1, gradient_clipping = optim.grad_clip,
    bf16.enabled = whether the run trains in bf16. Explicit values must agree with the run config.
    """
    path = Path(path)
    if not path.is_file():
        raise DeepSpeedConfigError(f"--deepspeed_config {str(path)!r}: no such file")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DeepSpeedConfigError(f"--deepspeed_config {str(path)!r}: not valid JSON: {err}") from err
    batch = cfg.data.batch_size
    if batch % world_size:
        raise DeepSpeedConfigError(f"data.batch_size = {batch} does not divide over {world_size} ranks")
    wanted = {
        "train_batch_size": batch,
        "train_micro_batch_size_per_gpu": batch // world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.grad_clip if cfg.optim.grad_clip is not None else 0.0,
    }
    for key, value in wanted.items():
        given = ds.get(key, "auto")
        if given == "auto":
            ds[key] = value
        elif given != value:
            raise DeepSpeedConfigError(f"{path}: {key} = {given!r}, but the run config implies {value!r} (or use \"auto\")")
    ds.setdefault("bf16", {})
    if ds["bf16"].get("enabled", "auto") == "auto":
        ds["bf16"]["enabled"] = bf16
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise DeepSpeedConfigError(f"{path}: zero_optimization.stage = {stage!r}: moe_engine supports 0, 1 and 2")
    return ds


def init_deepspeed_distributed(backend: str) -> None:
    """Join the job the deepspeed launcher started (env:// rendezvous), through deepspeed.comm."""
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend)


def initialize_engine(
    model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, ds_config: dict[str, Any]
) -> Any:
    """deepspeed.initialize with our optimizer and scheduler; returns the engine."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine


def latest_tag(checkpoint_dir: Path) -> str | None:
    """The tag DeepSpeed's `latest` file names in a checkpoint directory, or None."""
    latest = checkpoint_dir / "latest"
    return latest.read_text().strip() if latest.is_file() else None
