"""Model and optimizer states of expert-parallel ranks: canonical (whole experts) or per expert shard.

Canonical: every expert tensor whole, (E, ...), exactly what a single-process run holds. Saving
gathers each expert tensor over the expert-parallel group; loading slices out the E/P experts a
rank holds (`canonical_state`, `load_canonical_state`).

Per shard (what expert-parallel checkpoints write, no gathering): each EP rank's block of every
expert tensor and of its optimizer state (Adam moments), keyed by parameter name and labelled with
the global expert ids of its rows (`expert_shard_state`), and, once, everything else
(`replicated_state`). `load_sharded_state` reads only the shards that hold a rank's experts and
slices them, so a checkpoint written at one EP size loads at any other (EP=2 saved, EP=4 or EP=1
loaded).
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
    optim_sd = _map_expert_states(model, optimizer, optim_sd, lambda v: local_expert_slice(v, ep_rank, ep_size))
    optimizer.load_state_dict(_fit_scalar_states(optimizer, optim_sd))


def expert_shard_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, ep_rank: int, ep_size: int) -> dict[str, Any]:
    """This EP rank's experts: {"ep_rank", "ep_size", "expert_ids": {name: [global id of each row]},
    "model": {name: (L, ...) tensor}, "optimizer": {name: that parameter's optimizer state}}."""
    names = _expert_names(model)
    model_sd = model.state_dict()
    experts = {name: model_sd[name] for name in sorted(names)}
    expert_ids = {name: list(range(ep_rank * t.shape[0], (ep_rank + 1) * t.shape[0])) for name, t in experts.items()}
    optim_states = {}
    if optimizer is not None:
        state = optimizer.state_dict()["state"]
        for index, name in _optimizer_names(model, optimizer).items():
            if name in names and index in state:
                optim_states[name] = state[index]
    return {"ep_rank": ep_rank, "ep_size": ep_size, "expert_ids": expert_ids, "model": experts, "optimizer": optim_states}


def replicated_state(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, ep_size: int
) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, int]]:
    """(model state without the expert tensors, optimizer state without the expert parameters'
    states (param_groups whole), {expert tensor name: E, its number of experts in the whole model})."""
    names = _expert_names(model)
    model_sd = model.state_dict()
    num_experts = {name: model_sd[name].shape[0] * ep_size for name in sorted(names)}
    replicated = {k: v for k, v in model_sd.items() if k not in names}
    if optimizer is None:
        return replicated, None, num_experts
    optim_sd = optimizer.state_dict()
    expert_indices = {index for index, name in _optimizer_names(model, optimizer).items() if name in names}
    state = {index: s for index, s in optim_sd["state"].items() if index not in expert_indices}
    return replicated, {**optim_sd, "state": state}, num_experts


def load_sharded_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    model_sd: dict[str, Any],
    optim_sd: dict[str, Any] | None,
    num_experts: dict[str, int],
    read_shard: Callable[[int], dict[str, Any]],
    saved_ep_size: int,
    ep_rank: int,
    ep_size: int,
) -> None:
    """Load a per-shard checkpoint into a model holding experts [ep_rank * E/ep_size, (ep_rank + 1) * E/ep_size).

    model_sd, optim_sd, num_experts: what `replicated_state` returned when it was saved;
    read_shard(r): what `expert_shard_state` returned on saved EP rank r of saved_ep_size. Only the
    shards holding this rank's experts are read. Raises ValueError naming the tensor when the
    checkpoint's experts do not fit the model (other names, another number of experts).
    """
    names = _expert_names(model)
    params = dict(model.named_parameters())
    missing, unexpected = sorted(names - num_experts.keys()), sorted(num_experts.keys() - names)
    if missing or unexpected:
        raise ValueError(f"expert tensors: missing from the checkpoint {missing}, not in this model {unexpected}")
    shards: dict[int, dict[str, Any]] = {}
    experts, optim_states = {}, {}
    for name in sorted(names):
        rows = params[name].shape[0]
        if num_experts[name] != rows * ep_size:
            raise ValueError(
                f"{name}: the checkpoint holds {num_experts[name]} experts, this model {rows * ep_size} "
                f"({rows} on each of {ep_size} expert-parallel ranks)"
            )
        if num_experts[name] % saved_ep_size:
            raise ValueError(f"{name}: {num_experts[name]} experts cannot be split over {saved_ep_size} saved shards")
        wanted = range(ep_rank * rows, (ep_rank + 1) * rows)
        picks = _pick_rows(name, wanted, num_experts[name] // saved_ep_size, shards, read_shard)
        experts[name] = torch.cat([shard["model"][name].index_select(0, index) for shard, index in picks])
        optim_states[name] = _gather_optimizer_state(name, params[name].dim(), picks)
    model.load_state_dict({**model_sd, **experts})
    if optimizer is None or optim_sd is None:
        return
    state = dict(optim_sd["state"])
    for index, name in _optimizer_names(model, optimizer).items():
        if name in names and optim_states[name] is not None:
            state[index] = optim_states[name]
    optimizer.load_state_dict(_fit_scalar_states(optimizer, {**optim_sd, "state": state}))


def _fit_scalar_states(optimizer: torch.optim.Optimizer, optim_sd: dict[str, Any]) -> dict[str, Any]:
    """optim_sd with the 0-dim per-element states (Adam's moments) of a parameter that is now (1,)
    reshaped to (1,): files saved before a scalar parameter became (1,) (the generalist's
    logit_scale, because DeepSpeed's engine cannot broadcast a 0-dim parameter) still resume;
    torch's load_state_dict casts states but does not reshape them. "step" stays 0-dim."""
    params = _optimizer_params(optimizer)
    state = dict(optim_sd["state"])
    for index, entries in optim_sd["state"].items():
        if index < len(params) and params[index].shape == (1,):
            state[index] = {
                key: value.reshape(1) if key != "step" and torch.is_tensor(value) and value.dim() == 0 else value
                for key, value in entries.items()
            }
    return {**optim_sd, "state": state}


def _optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """{optimizer state index: parameter name}, for the parameters of `model` the optimizer holds."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return {index: name_of[id(p)] for index, p in enumerate(_optimizer_params(optimizer)) if id(p) in name_of}


def _pick_rows(name, wanted_ids: range, rows_per_shard: int, shards: dict, read_shard) -> list[tuple[dict, torch.Tensor]]:
    """[(shard, row index into it)] covering `wanted_ids` in order, reading shards into `shards` as needed."""
    picks = []
    for rank in range(wanted_ids[0] // rows_per_shard, wanted_ids[-1] // rows_per_shard + 1):
        if rank not in shards:
            shards[rank] = read_shard(rank)
        held = shards[rank]["expert_ids"].get(name, [])
        position = {expert: row for row, expert in enumerate(held)}
        here = [e for e in wanted_ids if e in position]
        if not here:
            continue
        picks.append((shards[rank], torch.tensor([position[e] for e in here], dtype=torch.long)))
    found = sum(index.numel() for _, index in picks)
    if found != len(wanted_ids):
        raise ValueError(
            f"{name}: the shards hold {found} of the experts {wanted_ids.start}..{wanted_ids.stop - 1} this rank needs"
        )
    return picks


def _gather_optimizer_state(name: str, param_dim: int, picks: list[tuple[dict, torch.Tensor]]) -> dict[str, Any] | None:
    """One expert parameter's optimizer state for the picked rows: per-expert tensors (shaped like the
    parameter: exp_avg, ...) sliced and joined, scalars (step) from the first shard."""
    states = [shard["optimizer"].get(name) for shard, _ in picks]
    if all(s is None for s in states):
        return None
    if any(s is None for s in states) or any(s.keys() != states[0].keys() for s in states):
        raise ValueError(f"{name}: the shards disagree on which optimizer state they hold")
    # Copies throughout (cat, clone): the shards may be memory-mapped files.
    return {
        key: torch.cat([s[key].index_select(0, index) for s, (_, index) in zip(states, picks)])
        if torch.is_tensor(value) and value.dim() == param_dim
        else value.clone() if torch.is_tensor(value) else value
        for key, value in states[0].items()
    }
