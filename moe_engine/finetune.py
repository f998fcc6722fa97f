"""Pre-train, then fine-tune: start a run from a checkpoint's weights and freeze parts of the model.

`moe-engine finetune --from CHECKPOINT --config ...` sets finetune.init_from (and finetune.freeze);
the trainer then builds the model for the run's own tasks, loads the pre-trained weights through
its workload (which maps per-task parameters by task name and initialises those of new tasks,
see `Workload.adapt_pretrained_state`), and leaves frozen parameters out of the optimizer. The
optimizer, schedule and data position start fresh: a fine-tuning run is a new run.

Freezable groups (finetune.freeze):
    experts   every expert's weights (MoE FFN experts, shared experts, MoE-attention expert projections)
    routers   the routers' parameters, and their routing state: the aux-loss-free expert bias and
              AdaMV-MoE's per-task k stop moving too
    backbone  every other shared parameter (attention, norms, tokenizers/embeddings, dense FFNs)
Task-specific parameters (heads, task prompts and embeddings) always train.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from moe_engine.checkpoint import (
    CheckpointMismatchError,
    checkpoint_task_order,
    read_checkpoint_entries,
    read_model_state,
    resolve_checkpoint,
)
from moe_engine.parallel.groups import ParallelGroups
from moe_engine.parallel.sharding import load_canonical_state


def expert_group_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every expert weight: routed experts behind a dispatcher, shared experts, and MoE attention's
    per-expert projections (any module with a `router` whose other parameters are per expert)."""
    params: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for attr in ("experts", "shared_experts"):
            child = getattr(module, attr, None)
            if isinstance(child, nn.Module):
                params.update((id(p), p) for p in child.parameters())
        for attr in ("w_q", "w_o"):  # MoEAttention's per-expert query and output projections
            p = getattr(module, attr, None)
            if isinstance(p, nn.Parameter) and hasattr(module, "router"):
                params[id(p)] = p
    return list(params.values())


def parameter_groups(model: nn.Module, task_params: Sequence[nn.Parameter]) -> dict[str, list[nn.Parameter]]:
    """{"experts", "routers", "backbone", "task"}: a partition of the model's parameters."""
    task_ids = {id(p) for p in task_params}
    experts = [p for p in expert_group_parameters(model) if id(p) not in task_ids]
    taken = task_ids | {id(p) for p in experts}
    routers = []
    for router in getattr(model, "routers", []):
        for p in router.parameters():
            if id(p) not in taken:
                routers.append(p)
                taken.add(id(p))
    backbone = [p for p in model.parameters() if id(p) not in taken]
    return {"experts": experts, "routers": routers, "backbone": backbone, "task": list(task_params)}


@dataclass(frozen=True)
class FrozenGroups:
    """What freeze_groups froze: parameter counts per group, and what still trains."""

    frozen: dict[str, int]
    trainable: int

    def describe(self) -> str:
        parts = ", ".join(f"{name} {count:,}" for name, count in self.frozen.items())
        return f"frozen: {parts}; trainable: {self.trainable:,} parameters"


def freeze_groups(model: nn.Module, workload: Any, names: Sequence[str]) -> FrozenGroups:
    """Set requires_grad=False on the named groups (see the module docstring)."""
    groups = parameter_groups(model, workload.task_parameters(model))
    frozen = {}
    for name in names:
        for p in groups[name]:
            p.requires_grad_(False)
        frozen[name] = sum(p.numel() for p in groups[name])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise ValueError(f"finetune.freeze = {list(names)}: nothing is left to train")
    return FrozenGroups(frozen, trainable)


def load_pretrained_weights(
    model: nn.Module, workload: Any, init_from: str | Path, groups: ParallelGroups | None, architecture: str | None = None,
) -> dict[str, Any]:
    """Load a checkpoint's model weights (either layout, any EP size) into `model` for this run's tasks.

    architecture: this run's model.architecture; a checkpoint of another one is refused by name
    (before any tensor is compared).

    Returns {"checkpoint", "pretrained_tasks", "new_tasks"}. Raises CheckpointMismatchError naming the
    tensors that do not fit. A workload with its own pre-trained formats (`load_initial_weights`, e.g.
    the causal LM's Hugging Face models) loads them itself.
    """
    load_initial = getattr(workload, "load_initial_weights", None)
    if load_initial is not None:
        return load_initial(model, init_from, groups)
    path = resolve_checkpoint(init_from)
    if path.is_dir() and not any(path.glob("model.pt")):
        raise CheckpointMismatchError(
            f"finetune.init_from = {str(init_from)!r}: {path} is not a moe_engine checkpoint (DeepSpeed checkpoints: "
            "resume the run without DeepSpeed once, or point at a moe_engine step_XXXXXXXX.pt / step_XXXXXXXX folder)"
        )
    saved = read_checkpoint_entries(path, ("config", "tasks", "task_names"))
    saved_architecture = saved["config"].get("model", {}).get("architecture", "multitask")
    if architecture is not None and saved_architecture != architecture:
        raise CheckpointMismatchError(
            f"finetune.init_from = {str(init_from)!r}: a model.architecture = {saved_architecture!r} checkpoint; this "
            f"run builds model.architecture = {architecture!r} (set it, with a config of that kind, to fine-tune it)"
        )
    pretrained_tasks = checkpoint_task_order(saved)
    state = read_model_state(path)
    state = workload.adapt_pretrained_state(model, state, pretrained_tasks, saved.get("tasks"))
    ep_rank, ep_size = (groups.ep_rank, groups.ep_size) if groups is not None else (0, 1)
    try:
        load_canonical_state(model, None, state, None, ep_rank, ep_size)
    except RuntimeError as err:
        raise CheckpointMismatchError(f"finetune.init_from = {str(init_from)!r}: the weights do not fit this model: {err}") from err
    new_tasks = [t for t in workload.task_names if t not in pretrained_tasks]
    return {"checkpoint": str(path), "pretrained_tasks": pretrained_tasks, "new_tasks": new_tasks}


def mean_rows_for_new_tasks(
    saved_XD: torch.Tensor, saved_tasks: Sequence[str], tasks: Sequence[str], mean_over: Sequence[str] | None = None,
) -> torch.Tensor:
    """(len(tasks), ...) rows of a per-task tensor for this run's tasks: a pre-trained task keeps its
    row, a new task starts at the mean of the rows of `mean_over` (default: every pre-trained task;
    zeros when it is empty), so it begins as an average task."""
    index = {name: i for i, name in enumerate(saved_tasks)}
    donors = [index[name] for name in (saved_tasks if mean_over is None else mean_over)]
    mean = saved_XD[donors].mean(0) if donors else torch.zeros_like(saved_XD[0])
    return torch.stack([saved_XD[index[name]] if name in index else mean for name in tasks])
