"""Permute token rows into expert-grouped order and back (the dispatch/combine data movement).

Notation: T tokens, K choices per token, E experts, N rows after dispatch (T*K when dropless,
fewer when capacity dropped choices). A "choice" is the flat index t*K + k into `experts_TK`.

- `expert_order`: the choices sorted by expert (stable, so token order holds inside an expert),
  with dropped choices (-1) cut off, and `tokens_per_expert_E`.
- `permute`:   x_ND[n] = x_TD[choice_N[n] // K]                          (a gather)
- `unpermute`: y_TD[t] = sum over rows n of token t of weight[choice_N[n]] * y_ND[n]
               (a weighted scatter-add, accumulated in fp32)

The functions here are the pure-torch references; Triton kernels of the same ops plug in
through `moe_engine.kernels.backend.select_backend` (no kernel yet: the reference runs).
"""

from __future__ import annotations

import torch

from moe_engine.kernels.backend import select_backend

# No Triton kernel of these ops exists yet; select_backend refuses MOE_ENGINE_KERNELS=triton.
_HAS_TRITON = False


def expert_order_reference(
    experts_TK: torch.Tensor, num_experts: int, num_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the choices by expert.

    experts_TK: (T, K) int64, -1 for dropped choices. num_rows: N if the caller knows it
    (T*K when no choice is dropped); None counts the kept choices, a device-to-host sync.
    Returns choice_N: (N,) int64 flat choice indices grouped by expert, and
    tokens_per_expert_E: (E,) int64.
    """
    flat_C = experts_TK.reshape(-1)
    kept = flat_C >= 0
    tokens_per_expert_E = torch.bincount(flat_C[kept], minlength=num_experts)
    if num_rows is None:
        num_rows = int(kept.sum())  # NOTE: device-to-host sync
    # Dropped choices sort after every expert (key E) and fall off the end.
    keys_C = torch.where(kept, flat_C, num_experts)
    choice_N = torch.argsort(keys_C, stable=True)[:num_rows]
    return choice_N, tokens_per_expert_E


def permute_reference(x_TD: torch.Tensor, choice_N: torch.Tensor, top_k: int) -> torch.Tensor:
    """x_TD: (T, D) -> x_ND: (N, D), the token row of each choice in expert-grouped order."""
    return x_TD.index_select(0, choice_N // top_k)


def unpermute_reference(
    y_ND: torch.Tensor, choice_N: torch.Tensor, weights_TK: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    """y_ND: (N, D), weights_TK: (T, K) -> y_TD: (T, D) in y_ND's dtype; tokens with no row get 0.

    The sum over a token's K rows is accumulated in at least fp32 so bf16 outputs do not lose the
    smaller contributions; the result is cast back once.
    """
    top_k = weights_TK.shape[-1]
    acc_dtype = torch.promote_types(y_ND.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    weights_N = weights_TK.reshape(-1).index_select(0, choice_N)
    weighted_ND = y_ND.to(acc_dtype) * weights_N.to(acc_dtype)[:, None]
    y_TD = torch.zeros(num_tokens, y_ND.shape[-1], dtype=acc_dtype, device=y_ND.device)
    return y_TD.index_add(0, choice_N // top_k, weighted_ND).to(y_ND.dtype)


def expert_order(
    experts_TK: torch.Tensor, num_experts: int, num_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    select_backend("expert_order", experts_TK.device, _HAS_TRITON)
    return expert_order_reference(experts_TK, num_experts, num_rows)


def permute(x_TD: torch.Tensor, choice_N: torch.Tensor, top_k: int) -> torch.Tensor:
    select_backend("permute", x_TD.device, _HAS_TRITON)
    return permute_reference(x_TD, choice_N, top_k)


def unpermute(y_ND: torch.Tensor, choice_N: torch.Tensor, weights_TK: torch.Tensor, num_tokens: int) -> torch.Tensor:
    select_backend("unpermute", y_ND.device, _HAS_TRITON)
    return unpermute_reference(y_ND, choice_N, weights_TK, num_tokens)
