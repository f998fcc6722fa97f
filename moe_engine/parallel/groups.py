"""Process groups for expert parallelism, built once from the world and passed explicitly.

With W ranks and expert-parallel size P (P divides W and E):
- `ep_group`:  P consecutive ranks that together hold one full set of E experts
               (rank r holds experts [(r % P) * E/P, (r % P + 1) * E/P)); tokens move by all-to-all here.
- `edp_group`: the W/P ranks that hold the *same* experts ({r % P == i}); expert gradients are
               all-reduced here (expert-data parallelism).
- `dp_group`:  all W ranks; every other parameter (attention, router, dense FFN) is replicated
               across it and its gradients are all-reduced over it.

Groups are never stored in configs or globals: whoever builds them hands them on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelGroups:
    world_size: int
    rank: int
    ep_size: int
    ep_group: dist.ProcessGroup
    edp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup

    @property
    def ep_rank(self) -> int:
        """This rank's index inside its expert-parallel group: which slice of experts it holds."""
        return self.rank % self.ep_size

    @property
    def edp_size(self) -> int:
        return self.world_size // self.ep_size


def check_parallel_sizes(world_size: int, ep_size: int, num_experts: int) -> None:
    """Refuse sizes that cannot be laid out, naming the values and the sizes that would work."""
    if ep_size < 1:
        raise ValueError(f"parallel.expert_parallel_size = {ep_size}: must be >= 1")
    allowed = [d for d in range(1, world_size + 1) if world_size % d == 0 and num_experts % d == 0]
    if world_size % ep_size:
        raise ValueError(
            f"parallel.expert_parallel_size = {ep_size} does not divide the world size {world_size}; "
            f"sizes that divide both it and moe.num_experts = {num_experts}: {allowed}"
        )
    if num_experts % ep_size:
        raise ValueError(
            f"parallel.expert_parallel_size = {ep_size} does not divide num_experts {num_experts}; "
            f"sizes that divide both it and the world size {world_size}: {allowed}"
        )


def build_parallel_groups(ep_size: int, num_experts: int) -> ParallelGroups:
    """Create the groups on every rank of the initialised default process group (a collective call)."""
    if not dist.is_initialized():
        raise RuntimeError("build_parallel_groups needs torch.distributed initialised (torchrun or deepspeed sets it up)")
    world_size, rank = dist.get_world_size(), dist.get_rank()
    check_parallel_sizes(world_size, ep_size, num_experts)
    # new_group is collective over the whole world and must be called in the same order everywhere,
    # including for groups this rank is not in.
    ep_group = edp_group = None
    for start in range(0, world_size, ep_size):
        group = dist.new_group(list(range(start, start + ep_size)))
        if start <= rank < start + ep_size:
            ep_group = group
    for offset in range(ep_size):
        group = dist.new_group(list(range(offset, world_size, ep_size)))
        if rank % ep_size == offset:
            edp_group = group
    return ParallelGroups(world_size, rank, ep_size, ep_group, edp_group, dist.group.WORLD)
