"""Token dispatchers: move token rows to their experts and the expert outputs back.

A dispatcher is a strategy object handed to `MoELayer`: the layer calls
`dispatch(x_TD, routing) -> (x_ND, tokens_per_expert_E, meta)` and later
`combine(y_ND, meta) -> y_TD`, and never learns where the experts live. `LocalDispatcher`
keeps every expert on this process; an all-to-all dispatcher for expert parallelism
implements the same two methods, with `tokens_per_expert_E` counting its local experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.profiler import record_function

from moe_engine.kernels.expert_order import expert_order
from moe_engine.kernels.permute import GatheredRows, unpermute
from moe_engine.routing.types import Routing


@dataclass(frozen=True)
class LocalDispatchMeta:
    """What `LocalDispatcher.combine` needs from its `dispatch`.

    choice_N: (N,) int64, the flat choice index t*K + k of each dispatched row.
    weights_TK: (T, K) float32, the routing weights (0 for dropped choices), with autograd graph.
    """

    choice_N: torch.Tensor
    weights_TK: torch.Tensor


class TokenDispatcher(Protocol):
    num_experts: int  # E over the whole model
    num_local_experts: int  # experts this process computes

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, object]: ...

    def combine(self, y_ND: torch.Tensor, meta: object) -> torch.Tensor: ...

    # Optional: experts_and_combine(experts, x_ND, tokens_per_expert_E, meta) -> y_TD, the experts and the
    # combine in one step (MoELayer calls it where a dispatcher has it, else `experts_then_combine`).


def experts_then_combine(
    dispatcher: TokenDispatcher, experts: nn.Module, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, meta: object
) -> torch.Tensor:
    """y_TD: the experts, then the dispatcher's combine, each in its profiler range (the unfused path)."""
    with record_function("moe::experts"):
        y_ND = experts(x_ND, tokens_per_expert_E)
    with record_function("moe::combine"):
        return dispatcher.combine(y_ND, meta)


class LocalDispatcher:
    """All E experts on this process: a sort-based permute of rows by expert, and its weighted inverse.

    fuse_gather: hand the experts `GatheredRows` (x_TD and the row index) instead of the permuted
    copy x_ND, so experts that fuse the gather into their up-projection skip the copy; others
    materialise it with the same permute op. With it, `experts_and_combine` also lets experts that
    offer `forward_combined` (GroupedExperts) run the combine themselves: the Triton path then keeps
    no (N, D) expert outputs for the backward (moe_engine.kernels.mlp_combine).
    """

    def __init__(self, num_experts: int, fuse_gather: bool = False) -> None:
        self.num_experts = num_experts
        self.num_local_experts = num_experts
        self.fuse_gather = fuse_gather

    def dispatch(
        self, x_TD: torch.Tensor, routing: Routing
    ) -> tuple[torch.Tensor | GatheredRows, torch.Tensor, LocalDispatchMeta]:
        """x_TD: (T, D). Returns x_ND (N, D) grouped by expert (or its GatheredRows), tokens_per_expert_E
        (E,) int64, and the meta combine needs."""
        if routing.num_experts != self.num_experts:
            raise ValueError(f"routing over {routing.num_experts} experts given to a dispatcher of {self.num_experts}")
        # Dropless routing has exactly T*K rows, so the row count needs no device-to-host sync.
        num_rows = routing.experts_TK.numel() if routing.capacity is None else None
        choice_N, tokens_per_expert_E = expert_order(routing.experts_TK, self.num_experts, num_rows)
        rows = GatheredRows(x_TD, choice_N, routing.top_k)
        x_ND = rows if self.fuse_gather else rows.materialize()
        return x_ND, tokens_per_expert_E, LocalDispatchMeta(choice_N, routing.weights_TK)

    def combine(self, y_ND: torch.Tensor, meta: LocalDispatchMeta) -> torch.Tensor:
        """y_ND: (N, D) expert outputs in dispatch order -> y_TD: (T, D), the weighted sum over choices."""
        return unpermute(y_ND, meta.choice_N, meta.weights_TK, meta.weights_TK.shape[0])

    def experts_and_combine(
        self, experts: nn.Module, x_ND: torch.Tensor | GatheredRows, tokens_per_expert_E: torch.Tensor,
        meta: LocalDispatchMeta,
    ) -> torch.Tensor:
        """y_TD (T, D): `combine(experts(x_ND, tokens_per_expert_E), meta)`, fused where the experts can."""
        fused = getattr(experts, "forward_combined", None)
        if isinstance(x_ND, GatheredRows) and fused is not None:
            with record_function("moe::experts"):
                return fused(x_ND, tokens_per_expert_E, meta.weights_TK)
        return experts_then_combine(self, experts, x_ND, tokens_per_expert_E, meta)
