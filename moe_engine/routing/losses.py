"""Load-balancing and stability losses of routers.

The losses live in moe_engine.kernels.aux_losses and .cv_squared, each with its Triton kernel and its torch
reference; the public functions re-exported here pick one through MOE_ENGINE_KERNELS (Triton on
CUDA, torch on CPU by default). Definitions (see ../shared/REFERENCES.md):
- Switch/GShard:  L = E * sum_i f_i * P_i, f_i = fraction of the T*K routed choices that chose
  expert i (counted before capacity drops), P_i = mean over tokens of the router probability of i.
- Sequence-level: the same per sequence, averaged over sequences (DeepSeek-V3's complementary loss).
- z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2.
- Shazeer's importance and load losses: CV^2 (biased variance / mean^2) of the per-expert sums
  of the gates, and of a load vector.
"""

from __future__ import annotations

import torch

from moe_engine.kernels.aux_losses import router_z_loss, sequence_load_balancing_loss, switch_load_balancing_loss
from moe_engine.kernels.cv_squared import importance_cv_squared, load_cv_squared


def switch_loss_from_stats(
    counts_E: torch.Tensor, prob_sums_E: torch.Tensor, num_tokens: int, top_k: int
) -> torch.Tensor:
    """E * sum_i (counts_i / (T*K)) * (prob_sums_i / T), from `topk_gating`'s statistics. () float32.

    Gradient flows through prob_sums_E only. No tokens: 0.
    """
    num_experts = counts_E.shape[0]
    scale = num_experts / (max(num_tokens, 1) ** 2 * top_k)
    return scale * torch.dot(counts_E.float(), prob_sums_E.float())


__all__ = [
    "importance_cv_squared",
    "load_cv_squared",
    "router_z_loss",
    "sequence_load_balancing_loss",
    "switch_load_balancing_loss",
    "switch_loss_from_stats",
]
