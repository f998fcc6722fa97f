"""Joining the job a launcher started (torchrun, deepspeed, SLURM via torchrun) and the per-step
collectives of data/expert-parallel training: gradient all-reduce, global norms, global sums.

The rule that makes N ranks train exactly like one process (up to float summation order):
every loss term is normalised by *global* counts (all-reduced before the loss is formed), so the
per-rank losses add up to the single-process loss and gradients are all-reduced with SUM:
replicated parameters over the data-parallel group, expert parameters over the
expert-data-parallel group (the ranks that hold the same experts).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any
import torch
import torch.distributed as dist
from torch import nn

from moe_engine.parallel.groups import ParallelGroups, build_parallel_groups


@dataclass(frozen=True)
class DistributedRun:
    """Where this process sits in the job. `groups` is None for a plain single-process run."""

    rank: int
    world_size: int
    local_rank: int
    groups: ParallelGroups | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun and deepspeed export it (1 when not launched by one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def bind_local_device(device_type: str) -> int:
    """Make this rank's GPU (LOCAL_RANK) the current CUDA device; returns the local rank.

    Call it before any process group, model or kernel: NCCL's communicators and object
    collectives, Triton's launches (the current device and stream) and torch.cuda events all use
    the current device, which is otherwise GPU 0 on every rank of a node.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError("train.device = 'cuda': no CUDA device is available here; use 'auto' or 'cpu'")
        if not 0 <= local_rank < count:
            raise ValueError(
                f"LOCAL_RANK = {local_rank}: this node has {count} CUDA device(s), so local ranks 0..{count - 1}; "
                f"launch at most {count} processes per node"
            )
        torch.cuda.set_device(local_rank)
    return local_rank


def gather_objects(obj: Any, run: DistributedRun) -> list[Any]:
    """[obj of rank 0, ..., obj of rank W-1] on every rank (picklable objects; collective)."""
    if run.world_size == 1:
        return [obj]
    gathered: list[Any] = [None] * run.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def check_backend(backend: str, device_type: str) -> None:
    """ValueError naming parallel.backend when it cannot run on `device_type` ("cpu" or "cuda"):
    NCCL moves CUDA tensors only (torch would fail inside init_process_group or the first collective)."""
    if backend == "nccl" and device_type != "cuda":
        raise ValueError(f"parallel.backend = 'nccl': NCCL needs CUDA and this run is on {device_type} (train.device); "
                         "allowed on CPU: 'gloo', or 'auto' (gloo on CPU, nccl on CUDA)")


def init_distributed(backend: str, device_type: str, ep_size: int, num_experts: int, needs_groups: bool) -> DistributedRun:
    """Join the launcher's process group (env:// rendezvous) and build the EP/EDP/DP groups.

    backend: "auto", "gloo" or "nccl"; needs_groups: the all-to-all dispatcher needs process groups
    even with one rank. A single process with no launcher and no need for groups gets no groups.
    """
    world_size = dist.get_world_size() if dist.is_initialized() else launched_world_size()
    if world_size == 1 and not needs_groups:
        return DistributedRun(0, 1, 0, None)
    if backend == "auto":
        backend = "nccl" if device_type == "cuda" else "gloo"
    if not dist.is_initialized():
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            # One process that still wants groups (EP=1 through the all-to-all path): a private store.
            store = dist.HashStore()
            dist.init_process_group(backend, store=store, rank=0, world_size=1)
        else:
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    rank, local_rank = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    return DistributedRun(rank, dist.get_world_size(), local_rank, build_parallel_groups(ep_size, num_experts))


def shutdown_distributed(run: DistributedRun) -> None:
    if run.groups is not None and dist.is_initialized():
        dist.destroy_process_group()


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the experts that sit behind a token dispatcher (an MoE layer's `experts`):
    the ones expert parallelism shards. Shared experts and everything else are replicated."""
    return [
        p
        for m in model.modules()
        if hasattr(m, "dispatcher") and isinstance(getattr(m, "experts", None), nn.Module)
        for p in m.experts.parameters()
    ]


def _all_reduce_flat(tensors: list[torch.Tensor], group: dist.ProcessGroup) -> None:
    """SUM-all-reduce a list of tensors in one flat buffer (one collective, not one per tensor)."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_gradients(model: nn.Module, groups: ParallelGroups) -> None:
    """SUM gradients: expert parameters over the EDP group, all others over the DP group.

    A trainable parameter this rank's loss did not reach (e.g. the head of a task with no example
    in this rank's slice) gets a zero gradient first: every rank then reduces the same flat buffer.
    """
    expert_ids = {id(p) for p in expert_parameters(model)}
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    _all_reduce_flat([p.grad for p in params if id(p) in expert_ids], groups.edp_group)
    _all_reduce_flat([p.grad for p in params if id(p) not in expert_ids], groups.dp_group)


def global_grad_norm(model: nn.Module, groups: ParallelGroups | None) -> torch.Tensor:
    """The L2 norm of the whole model's gradient: replicated parameters once, every expert shard once."""
    expert_ids = {id(p) for p in expert_parameters(model)}
    grads = [(p.grad, id(p) in expert_ids) for p in model.parameters() if p.grad is not None]
    device = grads[0][0].device if grads else torch.device("cpu")
    replicated, experts = torch.zeros((), device=device), torch.zeros((), device=device)
    for g, is_expert in grads:
        if is_expert:
            experts += g.float().square().sum()
        else:
            replicated += g.float().square().sum()
    if groups is not None:
        dist.all_reduce(experts, group=groups.ep_group)  # each EP rank holds different experts
    return (replicated + experts).sqrt()


def clip_gradients(model: nn.Module, groups: ParallelGroups | None, max_norm: float | None) -> float:
    """Scale gradients so the global norm is at most max_norm (None: only measure). Returns the norm before."""
    norm = global_grad_norm(model, groups)
    if max_norm is not None:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale.to(p.grad.device))
    return float(norm)


def all_reduce_sum(values: torch.Tensor, run: DistributedRun) -> torch.Tensor:
    """Sum of `values` over all ranks (a copy; unchanged values for a single process)."""
    values = values.clone()
    if run.groups is not None:
        dist.all_reduce(values, group=run.groups.dp_group)
    return values


def rank_slice(batch: dict[str, torch.Tensor], run: DistributedRun) -> dict[str, torch.Tensor]:
    """This rank's share of a global batch: rows rank, rank + W, rank + 2W, ..."""
    if run.world_size == 1:
        return batch
    return {k: v[run.rank :: run.world_size] for k, v in batch.items()}


def gather_expert_tensor(local_L: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """(L, ...) on each EP rank -> (E, ...) = the EP ranks' shards in expert order."""
    shards = [torch.empty_like(local_L) for _ in range(groups.ep_size)]
    dist.all_gather(shards, local_L.contiguous(), group=groups.ep_group)
    return torch.cat(shards, dim=0)


def local_expert_slice(full_E: torch.Tensor, ep_rank: int, ep_size: int) -> torch.Tensor:
    """(E, ...) -> the (E/ep_size, ...) block of experts held by ep_rank."""
    num_local = full_E.shape[0] // ep_size
    return full_E[ep_rank * num_local : (ep_rank + 1) * num_local]


def signal_any_rank(signum: int | None, run: DistributedRun, device: torch.device) -> int | None:
    """The signal number any rank received (the largest), so that all ranks stop at the same step."""
    if run.groups is None:
        return signum
    flag = torch.tensor([signum or 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=run.groups.dp_group)
    return int(flag) or None


def barrier(run: DistributedRun) -> None:
    if run.groups is not None:
        dist.barrier(group=run.groups.dp_group)

