"""Expert capacity: how many of the routed choices each expert keeps, and which ones.

With a capacity factor c, expert e keeps at most C = ceil(c * T * K / E) choices; the rest are
dropped (expert id -1, weight 0) and those tokens pass through the layer's residual only.
Two policies pick the survivors inside an over-full expert:
- "position": GShard's order, all first choices before any second choice, earlier tokens first.
- "score":    the highest routing weights first (Megatron-Core's "probs", DeepSpeed's default).
"""

from __future__ import annotations

import math

import torch

DROP_POLICIES = ("position", "score")


def check_routing_args(num_experts: int, top_k: int, capacity_factor: float | None = None, drop_policy: str = "position") -> None:
    """The checks every token-choice router makes of its constructor arguments (ValueError naming the value)."""
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k = {top_k}: must be in [1, num_experts = {num_experts}]")
    if capacity_factor is not None and not (math.isfinite(capacity_factor) and capacity_factor > 0):
        raise ValueError(f"capacity_factor = {capacity_factor}: must be > 0, or None for dropless")
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy = {drop_policy!r}: allowed: {', '.join(DROP_POLICIES)}")


def apply_capacity(
    experts_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int, capacity_factor: float | None, policy: str
) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """Drop the choices over capacity ceil(capacity_factor * T * K / E): (experts_TK, weights_TK, capacity).
    capacity_factor None: dropless, the inputs unchanged and capacity None."""
    if capacity_factor is None:
        return experts_TK, weights_TK, None
    num_tokens, top_k = experts_TK.shape
    capacity = expert_capacity(num_tokens, top_k, num_experts, capacity_factor)
    experts_TK, weights_TK = drop_over_capacity(experts_TK, weights_TK, num_experts, capacity, policy)
    return experts_TK, weights_TK, capacity


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """C = ceil(capacity_factor * T * K / E), at least 1 so that no expert is shut out entirely."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def drop_over_capacity(
    experts_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int, capacity: int, policy: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mark the choices beyond each expert's capacity as dropped.

    experts_TK: (T, K) int64 in [0, E), or -1 for a choice already dropped (it stays dropped and
    takes no slot). weights_TK: (T, K) float. Returns new tensors of the same shapes with dropped
    choices set to expert -1 and weight 0 (the weights keep their autograd graph).
    """
    if policy not in DROP_POLICIES:
        raise ValueError(f"drop policy {policy!r}: allowed: {', '.join(DROP_POLICIES)}")
    num_tokens, top_k = experts_TK.shape
    # Choices dropped before (-1) go to a bucket E past the real experts, which keeps nothing.
    dropped_before_TK = experts_TK < 0
    experts_TK = experts_TK.masked_fill(dropped_before_TK, num_experts)
    # Visit order inside each expert: choice-major (k, t) for "position", weight-descending for "score".
    if policy == "position":
        order = torch.arange(num_tokens * top_k, device=experts_TK.device).view(num_tokens, top_k).t().reshape(-1)
    else:
        order = torch.argsort(weights_TK.detach().reshape(-1), descending=True, stable=True)
    # A stable sort by expert keeps that visit order within each expert's run.
    by_expert = order[torch.argsort(experts_TK.reshape(-1)[order], stable=True)]
    counts_E = torch.bincount(experts_TK.reshape(-1), minlength=num_experts + 1)
    starts_E = torch.cumsum(counts_E, dim=0) - counts_E
    slot = torch.arange(by_expert.numel(), device=experts_TK.device) - starts_E[experts_TK.reshape(-1)[by_expert]]
    keep = torch.empty_like(slot, dtype=torch.bool)
    keep[by_expert] = slot < capacity
    keep_TK = keep.view(num_tokens, top_k) & ~dropped_before_TK
    return experts_TK.masked_fill(~keep_TK, -1), weights_TK.masked_fill(~keep_TK, 0.0)
