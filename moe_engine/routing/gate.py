"""The router's gate GEMM in fp32 without an fp32 copy of the tokens kept for the backward.

Routers compute their logits in fp32 whatever the tokens' dtype: top-k near ties and the z-loss's
logsumexp are where bf16 changes which experts run. Written as `x_TD.float() @ w.float().t()`,
autograd keeps the fp32 copy of x_TD for the weight gradient: T·D·4 bytes per layer (512 MiB at
T = 32768, D = 4096), twice the bf16 tokens the layer keeps anyway. `gate_logits` keeps x_TD as it
came (and the weight) and casts again in the backward, as Megatron-Core's router gating linear does.
"""

from __future__ import annotations

import torch


class _Fp32GateLinear(torch.autograd.Function):
    """logits_TE = x_TD.float() @ weight_ED.float().t(), saving the inputs in their own dtypes."""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, weight_ED: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_TD, weight_ED)
        return x_TD.float() @ weight_ED.float().t()

    @staticmethod
    def backward(ctx, grad_TE: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x_TD, weight_ED = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_TE @ weight_ED.float()).to(x_TD.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (grad_TE.t() @ x_TD.float()).to(weight_ED.dtype)
        return grad_x, grad_w


def gate_logits(x_TD: torch.Tensor, weight_ED: torch.Tensor) -> torch.Tensor:
    """logits_TE (T, E) float32 = x_TD (T, D) @ weight_ED (E, D)^T computed in fp32, any input dtypes.

    Call it with autocast disabled (the routers do). Differentiable in both inputs; their gradients
    come back in their own dtypes. fp32 inputs take the plain matmul (there is no copy to avoid).
    """
    if x_TD.dtype == torch.float32 and weight_ED.dtype == torch.float32:
        return x_TD @ weight_ED.t()
    return _Fp32GateLinear.apply(x_TD, weight_ED)
