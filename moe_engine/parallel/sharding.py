"""Canonical (unsharded) model and optimizer states from expert-parallel ranks, and back.

Checkpoints hold the canonical state: every expert tensor whole, (E, ...), exactly what a
single-process run saves. Saving gathers each expert tensor over the expert-parallel group;
loading slices out the E/P experts a rank holds. So a checkpoint written at one EP size loads at
any other (EP=2 saved, EP=4 or EP=1 loaded), and single-process runs read it unchanged.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from moe_engine.parallel.groups import ParallelGroups
from moe_engine.parallel.runtime import expert_parameters, gather_expert_tensor, local_expert_slice


def _expert_names(model: nn.Module) -> set[str]:
    expert_ids = {id(p) for p in expert_parameters(model)}
    return {name for name, p in model.named_parameters() if id(p) in expert_ids}


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    # torch numbers optimizer states by a parameter's position across the param groups.
    return [p for group in optimizer.param_groups for p in group["params"]]


def _map_expert_states(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    optim_sd: dict[str, Any],
    fn: Callable[[torch.Tensor], torch.Tensor],
) -> dict[str, Any]:
    """`optim_sd` with `fn` applied to the per-expert state tensors (exp_avg, ...) of expert parameters.

    Builds new inner dicts: optimizer.state_dict() shares them with the live optimizer.
    """
    expert_ids = {id(p) for p in expert_parameters(model)}
    params = _optimizer_params(optimizer)
    state = {}
    for index, param_state in optim_sd["state"].items():
        param = params[index]
        if id(param) in expert_ids:
            # Tensors shaped like the parameter are per expert; scalars such as `step` are not.
            param_state = {k: fn(v) if torch.is_tensor(v) and v.dim() == param.dim() else v for k, v in param_state.items()}
        state[index] = param_state
    return {**optim_sd, "state": state}


def canonical_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, groups: ParallelGroups | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model state dict, optimizer state dict) with whole expert tensors. Collective over the EP group."""
    model_sd = model.state_dict()
    optim_sd = optimizer.state_dict()
    if groups is None or groups.ep_size == 1:
        return model_sd, optim_sd
    expert_names = _expert_names(model)
    model_sd = {k: gather_expert_tensor(v, groups) if k in expert_names else v for k, v in model_sd.items()}
    return model_sd, _map_expert_states(model, optimizer, optim_sd, lambda v: gather_expert_tensor(v, groups))


def load_canonical_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    model_sd: dict[str, Any],
    optim_sd: dict[str, Any] | None,
    ep_rank: int,
    ep_size: int,
) -> None:
    """Load a canonical state into a model holding experts [ep_rank * E/P, (ep_rank + 1) * E/P)."""
    expert_names = _expert_names(model)
    model.load_state_dict(
        {k: local_expert_slice(v, ep_rank, ep_size) if k in expert_names else v for k, v in model_sd.items()}
    )
    if optimizer is None or optim_sd is None:
        return
    optimizer.load_state_dict(
        _map_expert_states(model, optimizer, optim_sd, lambda v: local_expert_slice(v, ep_rank, ep_size))
    )
