"""Load-balancing and stability losses of routers (pure torch; Triton versions live in kernels/).

Definitions (see ../shared/REFERENCES.md):
- Switch/GShard:  L = E * sum_i f_i * P_i, f_i = fraction of the T*K routed choices that chose
  expert i (counted before capacity drops), P_i = mean over tokens of the router probability of i.
- Sequence-level: the same per sequence, averaged over sequences (DeepSeek-V3's complementary loss).
- z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2.
"""

from __future__ import annotations

import torch


def expert_choice_fractions(experts_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) float32: the fraction of routed choices per expert; choices of -1 are not counted.

    The denominator is T*K so that the fractions of a dropless routing sum to 1.
    """
    valid = experts_TK >= 0
    counts_E = torch.bincount(experts_TK[valid], minlength=num_experts)
    return counts_E.float() / max(experts_TK.numel(), 1)


def switch_load_balancing_loss(probs_TE: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
    """E * sum_i f_i * P_i over the whole batch. Gradient flows through P only (f is a count).

    probs_TE: (T, E) float32, rows sum to 1. experts_TK: (T, K) int64. Returns () float32.
    A perfectly uniform router gives 1.0; everything on one expert gives E.
    """
    num_experts = probs_TE.shape[-1]
    f_E = expert_choice_fractions(experts_TK, num_experts)
    p_E = probs_TE.float().mean(dim=0)
    return num_experts * torch.dot(f_E, p_E)


def sequence_load_balancing_loss(
    probs_TE: torch.Tensor, experts_TK: torch.Tensor, sequence_ids_T: torch.Tensor
) -> torch.Tensor:
    """The Switch loss computed within each sequence, then averaged over sequences.

    probs_TE: (T, E) float32; experts_TK: (T, K) int64; sequence_ids_T: (T,) int64 in [0, S).
    Sequences with no tokens do not count in the average. Returns () float32.
    """
    num_tokens, num_experts = probs_TE.shape
    top_k = experts_TK.shape[-1]
    num_seqs = int(sequence_ids_T.max()) + 1 if num_tokens else 0  # NOTE: device-to-host sync
    tokens_S = torch.bincount(sequence_ids_T, minlength=num_seqs).float()
    # Per-(sequence, expert) choice counts and probability sums, via flat index s*E + e.
    seq_TK = sequence_ids_T[:, None].expand_as(experts_TK)
    valid = experts_TK >= 0
    flat = (seq_TK * num_experts + experts_TK)[valid]
    counts_SE = torch.bincount(flat, minlength=num_seqs * num_experts).view(num_seqs, num_experts).float()
    prob_sums_SE = torch.zeros(num_seqs, num_experts, dtype=torch.float32, device=probs_TE.device)
    prob_sums_SE = prob_sums_SE.index_add(0, sequence_ids_T, probs_TE.float())
    present = tokens_S > 0
    f_SE = counts_SE[present] / (tokens_S[present, None] * top_k)
    p_SE = prob_sums_SE[present] / tokens_S[present, None]
    return num_experts * (f_SE * p_SE).sum(dim=-1).mean()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """mean_t logsumexp(logits_t)^2, which keeps router logits small (ST-MoE). Returns () float32."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()
