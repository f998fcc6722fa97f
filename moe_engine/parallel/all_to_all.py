"""`AllToAllDispatcher`: expert parallelism. Each rank of an expert-parallel group holds E/P experts;
tokens travel to the rank of their expert and back by all-to-all.

dispatch, for the T tokens of this rank:
  1. local permute: sort the T*K choices by global expert (experts are laid out rank-major, so this
     also groups rows by destination rank)                                   -> x_ND
  2. exchange per-expert counts (P x L blocks), all-to-all the rows with uneven splits
                                                                             -> x_RD, by (source, local expert)
  3. regroup received rows by local expert (stable over sources)             -> x_MD, tokens_per_local_expert_L
combine runs the same steps backwards, then the weighted sum over each token's K choices.

Capacity mode (`fixed_splits=True` with a capacity router): every rank sends exactly C rows per
expert, zero rows padding the empty slots. Splits are then static: no count exchange, no
device-to-host sync, and static shapes, at the price of computing the padding rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moe_engine.kernels.permute import expert_order, permute, unpermute
from moe_engine.parallel.collectives import all_to_all, all_to_all_counts
from moe_engine.parallel.telemetry import TrafficMeter
from moe_engine.routing.types import Routing


@dataclass(frozen=True)
class AllToAllDispatchMeta:
    """What combine needs from dispatch.

    choice_N: (N,) flat choice indices in global-expert order (this rank's kept choices).
    weights_TK: (T, K) routing weights. send_splits/recv_splits: rows sent to / received from each
    rank. regroup_M: (M,) received-row index of each expert-grouped row (None in fixed-split mode).
    slot_N: (N,) padded-buffer row of each choice (fixed-split mode only).
    """

    choice_N: torch.Tensor
    weights_TK: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    regroup_M: torch.Tensor | None
    slot_N: torch.Tensor | None


class AllToAllDispatcher:
    """Moves rows to the ranks of `ep_group` that hold their experts, and back.

    num_experts: E in the whole model; the group's size P must divide it. fixed_splits: in
    capacity mode, pad each expert's rows to the capacity so splits are static.
    """

    def __init__(self, num_experts: int, ep_group: dist.ProcessGroup, *, fixed_splits: bool = False) -> None:
        self.ep_size = dist.get_world_size(ep_group)
        if num_experts % self.ep_size:
            raise ValueError(f"expert-parallel size {self.ep_size} does not divide num_experts {num_experts}")
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size
        self.ep_rank = dist.get_rank(ep_group)
        self.group = ep_group
        self.fixed_splits = fixed_splits
        # Bytes and time of this dispatcher's exchanges (token rows only), read once a step by the trainer.
        self.traffic = TrafficMeter()

    @property
    def local_expert_ids(self) -> range:
        """The global ids of the experts this rank holds."""
        start = self.ep_rank * self.num_local_experts
        return range(start, start + self.num_local_experts)

    def dispatch(
        self, x_TD: torch.Tensor, routing: Routing
    ) -> tuple[torch.Tensor, torch.Tensor, AllToAllDispatchMeta]:
        """x_TD: (T, D) this rank's tokens. Returns x_MD (M, D) rows for the local experts grouped by
        expert, tokens_per_local_expert_L (L,) int64, and the meta that combine needs."""
        P, L = self.ep_size, self.num_local_experts
        dropless = routing.capacity is None
        num_rows = routing.experts_TK.numel() if dropless else None
        choice_N, tokens_per_expert_E = expert_order(routing.experts_TK, self.num_experts, num_rows)
        x_ND = permute(x_TD, choice_N, routing.top_k)
        if self.fixed_splits and not dropless:
            return self._dispatch_fixed(x_ND, choice_N, tokens_per_expert_E, routing)
        counts_PL = tokens_per_expert_E.view(P, L)
        received_PL = all_to_all_counts(counts_PL, self.group)  # received_PL[r, l]: rows from rank r for expert l
        both = torch.stack([counts_PL.sum(1), received_PL.sum(1)]).tolist()  # NOTE: device-to-host sync (split sizes)
        send_splits, recv_splits = both
        x_RD = all_to_all(x_ND, recv_splits, send_splits, self.group, self.traffic)
        # Received rows come by (source rank, local expert); a stable sort by local expert regroups them.
        local_expert_R = torch.repeat_interleave(
            torch.arange(L, device=x_TD.device).repeat(P), received_PL.reshape(-1), output_size=x_RD.shape[0]
        )
        regroup_M = torch.argsort(local_expert_R, stable=True)
        x_MD = permute(x_RD, regroup_M, 1)
        meta = AllToAllDispatchMeta(choice_N, routing.weights_TK, send_splits, recv_splits, regroup_M, None)
        return x_MD, received_PL.sum(0), meta

    def _dispatch_fixed(self, x_ND, choice_N, tokens_per_expert_E, routing):
        P, L, C = self.ep_size, self.num_local_experts, routing.capacity
        expert_N = routing.experts_TK.reshape(-1).index_select(0, choice_N)
        starts_E = torch.cumsum(tokens_per_expert_E, 0) - tokens_per_expert_E
        slot_N = expert_N * C + (torch.arange(choice_N.numel(), device=x_ND.device) - starts_E[expert_N])
        x_padded = x_ND.new_zeros(self.num_experts * C, x_ND.shape[1]).index_copy(0, slot_N, x_ND)
        splits = [L * C] * P
        x_RD = all_to_all(x_padded, splits, splits, self.group, self.traffic)
        # (source, local expert, slot) -> (local expert, source, slot): a fixed transpose, no index.
        x_MD = x_RD.view(P, L, C, -1).transpose(0, 1).reshape(L * P * C, -1)
        tokens_per_local_expert_L = torch.full((L,), P * C, dtype=torch.int64, device=x_ND.device)
        return x_MD, tokens_per_local_expert_L, AllToAllDispatchMeta(choice_N, routing.weights_TK, splits, splits, None, slot_N)

    def combine(self, y_MD: torch.Tensor, meta: AllToAllDispatchMeta) -> torch.Tensor:
        """y_MD: (M, D) local expert outputs in dispatch order -> y_TD: (T, D) for this rank's tokens."""
        num_tokens = meta.weights_TK.shape[0]
        if meta.slot_N is not None:
            P, L = self.ep_size, self.num_local_experts
            y_RD = y_MD.view(L, P, -1, y_MD.shape[-1]).transpose(0, 1).reshape(y_MD.shape)
            y_padded = all_to_all(y_RD, meta.send_splits, meta.recv_splits, self.group, self.traffic)
            y_ND = y_padded.index_select(0, meta.slot_N)
        else:
            inverse_R = torch.empty_like(meta.regroup_M)
            inverse_R[meta.regroup_M] = torch.arange(meta.regroup_M.numel(), device=y_MD.device)
            y_RD = permute(y_MD, inverse_R, 1)
            y_ND = all_to_all(y_RD, meta.send_splits, meta.recv_splits, self.group, self.traffic)
        return unpermute(y_ND, meta.choice_N, meta.weights_TK, num_tokens)
