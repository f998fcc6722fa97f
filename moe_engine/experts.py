"""Expert MLPs: `GroupedExperts` over rows grouped by expert, and the dense `MLP` (shared experts, dense blocks).

Both support SwiGLU (silu(x W_gate^T) * (x W_up^T)) W_down^T and GELU (gelu(x W_up^T) W_down^T).
`GroupedExperts` runs one of three implementations: a loop of matmuls, torch._grouped_mm, or the
Triton grouped GEMM with fused activation (moe_engine.kernels.grouped_mlp.grouped_mlp_triton).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function
from torch.utils.checkpoint import checkpoint

from moe_engine.kernels._triton import TRITON_AVAILABLE
from moe_engine.kernels.backend import ENV_VAR, requested_backend, select_backend
from moe_engine.kernels.grouped_gemm import grouped_linear_loop, triton_unsupported_reason
from moe_engine.kernels.grouped_mlp import grouped_mlp_triton
from moe_engine.kernels.mlp_combine import grouped_mlp_combine_triton, grouped_mlp_scored_triton, scale_rows
from moe_engine.kernels.permute import GatheredRows, unpermute
from moe_engine.kernels.torch_grouped_mm import grouped_linear_grouped_mm, grouped_mm_unsupported_reason

ACTIVATIONS = ("swiglu", "gelu")
EXPERT_IMPLS = ("auto", "loop", "grouped_mm", "triton")


def _activate(h_NH: torch.Tensor, activation: str) -> torch.Tensor:
    """SwiGLU reads h as [gate | up] halves (gate first, as HF's fused gate_up_proj); GELU uses all of h."""
    if activation == "swiglu":
        gate, up = h_NH.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h_NH)


def resolve_experts_impl(impl: str, device: torch.device, dtype: torch.dtype, dims: tuple[int, ...]) -> str:
    """'loop', 'grouped_mm' or 'triton': what runs expert GEMMs of inner widths `dims` on `device` in `dtype`.

    impl: one of EXPERT_IMPLS. 'auto' takes Triton where `select_backend` picks it (CUDA, or
    MOE_ENGINE_KERNELS=triton) and it can run this dtype, else torch._grouped_mm where supported,
    else the loop. Naming an implementation that cannot run here is an error, as is
    MOE_ENGINE_KERNELS=triton where the Triton grouped GEMM cannot run (never a silent fallback:
    a benchmark must not time the loop believing it timed the kernel).
    """
    if impl not in EXPERT_IMPLS:
        raise ValueError(f"experts impl = {impl!r}: allowed: {', '.join(EXPERT_IMPLS)}")
    triton_reason = triton_unsupported_reason(device, dtype)
    if impl == "triton" and triton_reason is not None:
        raise ValueError(f"moe.experts_impl = 'triton' cannot run here: {triton_reason}; use 'loop' or 'auto'")
    if impl == "auto" and select_backend("grouped_mlp", device, has_triton=TRITON_AVAILABLE) == "triton":
        if triton_reason is None:
            return "triton"
        if requested_backend() == "triton":
            raise RuntimeError(f"{ENV_VAR}=triton, but the Triton grouped GEMM cannot run here: {triton_reason}")
    grouped_mm_reason = grouped_mm_unsupported_reason(device, dtype, dims)
    if impl == "grouped_mm" and grouped_mm_reason is not None:
        raise ValueError(f"moe.experts_impl = 'grouped_mm' cannot run here: {grouped_mm_reason}; use 'loop' or 'auto'")
    if impl == "auto":
        return "grouped_mm" if grouped_mm_reason is None else "loop"
    return impl


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # torch._grouped_mm is not on autocast's op lists: cast by hand to what autocast would pick.
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class GroupedExperts(nn.Module):
    """E independent MLPs applied to rows grouped by expert.

    Parameters (nn.Linear's (out, in) layout per expert):
        w_in:  (E, H, D), H = 2F for SwiGLU (gate rows, then up rows) or F for GELU.
        w_out: (E, D, F).

    forward(x_ND, tokens_per_expert_E) -> y_ND: x_ND (N, D) rows sorted by expert, or the
    `GatheredRows` a dispatcher hands over instead of the copy; tokens_per_expert_E (E,) int64
    sums to N (experts with 0 rows are fine).
    forward_gathered(x_TD, gather_index_N, tokens_per_expert_E) -> y_ND: the same on rows
    x_TD[gather_index_N]; the Triton path reads them through the index, without the copy.

    impl: "loop", "grouped_mm", "triton", or "auto": Triton where `select_backend` picks it
    (CUDA by default, or MOE_ENGINE_KERNELS=triton) and it supports the dtype; otherwise
    torch._grouped_mm where it can run, else the loop.

    recompute: keep fewer activations for the backward and recompute them. Triton keeps no
    up-projection output h (N, H) (one more up-projection GEMM in the backward; the activation is
    recomputed from h there anyway); the torch paths run their MLP under activation checkpointing
    (the whole MLP forward again in the backward), keeping only their input rows.
    """

    def __init__(
        self, num_experts: int, d_model: int, ffn_hidden: int, activation: str = "swiglu", impl: str = "auto",
        recompute: bool = False,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation = {activation!r}: allowed: {', '.join(ACTIVATIONS)}")
        if impl not in EXPERT_IMPLS:
            raise ValueError(f"impl = {impl!r}: allowed: {', '.join(EXPERT_IMPLS)}")
        if not isinstance(recompute, bool):
            raise ValueError(f"recompute = {recompute!r}: must be True or False")
        self.num_experts, self.d_model, self.ffn_hidden = num_experts, d_model, ffn_hidden
        self.activation = activation
        self.impl = impl
        self.recompute = recompute
        width_in = 2 * ffn_hidden if activation == "swiglu" else ffn_hidden
        self.w_in = nn.Parameter(torch.empty(num_experts, width_in, d_model))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_model, ffn_hidden))
        # nn.Linear's default init per expert, so a dense MLP and an expert start alike.
        nn.init.uniform_(self.w_in, -1 / math.sqrt(d_model), 1 / math.sqrt(d_model))
        nn.init.uniform_(self.w_out, -1 / math.sqrt(ffn_hidden), 1 / math.sqrt(ffn_hidden))

    def resolve_impl(self, device: torch.device, dtype: torch.dtype) -> str:
        """'loop', 'grouped_mm' or 'triton' for inputs on `device` in `dtype`."""
        return resolve_experts_impl(self.impl, device, dtype, (self.d_model, self.ffn_hidden, self.w_in.shape[1]))

    def forward(self, x_ND: torch.Tensor | GatheredRows, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        if isinstance(x_ND, GatheredRows):
            # The Triton path reads the rows through the index; the torch paths need the copy.
            if self.resolve_impl(x_ND.x_TD.device, _compute_dtype(x_ND.x_TD)) == "triton":
                return self.forward_gathered(x_ND.x_TD, x_ND.index_N, tokens_per_expert_E)
            with record_function("moe::permute"):  # the dispatcher's gather, run here (see moe-engine profile)
                x_ND = x_ND.materialize()
        dtype = _compute_dtype(x_ND)
        impl = self.resolve_impl(x_ND.device, dtype)
        x_ND = x_ND.to(dtype)
        w_in, w_out = self.w_in.to(dtype), self.w_out.to(dtype)
        if impl == "triton":
            return grouped_mlp_triton(x_ND, w_in, w_out, tokens_per_expert_E, self.activation, recompute_h=self.recompute)
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(self._torch_mlp, impl, x_ND, w_in, w_out, tokens_per_expert_E, use_reentrant=False)
        return self._torch_mlp(impl, x_ND, w_in, w_out, tokens_per_expert_E)

    def _torch_mlp(self, impl: str, x_ND: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor,
                   tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        linear = grouped_linear_grouped_mm if impl == "grouped_mm" else grouped_linear_loop
        h_NH = linear(x_ND, w_in, tokens_per_expert_E)
        return linear(_activate(h_NH, self.activation), w_out, tokens_per_expert_E)

    def forward_gathered(
        self, x_TD: torch.Tensor, gather_index_N: torch.Tensor, tokens_per_expert_E: torch.Tensor
    ) -> torch.Tensor:
        """y_ND for rows x_TD[gather_index_N] (N,) int64, grouped by expert; the gradient of x_TD sums
        over the rows that read each token. The Triton path fuses the gather into the up-projection."""
        dtype = _compute_dtype(x_TD)
        if self.resolve_impl(x_TD.device, dtype) != "triton":
            return self.forward(x_TD.index_select(0, gather_index_N), tokens_per_expert_E)
        w_in, w_out = self.w_in.to(dtype), self.w_out.to(dtype)
        return grouped_mlp_triton(x_TD.to(dtype), w_in, w_out, tokens_per_expert_E, self.activation, gather_index_N,
                                  recompute_h=self.recompute)

    def forward_scored(
        self, x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, score_N: torch.Tensor
    ) -> torch.Tensor:
        """y_ND (N, D) = score_N[:, None] * forward(x_ND, tokens_per_expert_E): the experts applying each
        row's routing weight themselves (what expert parallelism runs when the weights travel with the
        rows). score_N: (N,) floating, differentiable. The Triton path scales in the down-projection's
        epilogue and takes the score's gradient from its backward GEMM, keeping no unscaled outputs.
        """
        dtype = _compute_dtype(x_ND)
        if self.resolve_impl(x_ND.device, dtype) == "triton":
            w_in, w_out = self.w_in.to(dtype), self.w_out.to(dtype)
            return grouped_mlp_scored_triton(
                x_ND.to(dtype), w_in, w_out, tokens_per_expert_E, self.activation, score_N, recompute_h=self.recompute
            )
        return scale_rows(self.forward(x_ND, tokens_per_expert_E), score_N)

    def forward_combined(
        self, rows: GatheredRows, tokens_per_expert_E: torch.Tensor, weights_TK: torch.Tensor
    ) -> torch.Tensor:
        """y_TD (T, D) = sum over the K rows of each token of weights_TK * its expert's output: the experts
        and the dispatcher's weighted combine (`unpermute`) in one step.

        rows: the gathered rows (x_TD, choice_N grouped by expert, K); weights_TK: (T, K) floating.
        The Triton path is one op (moe_engine.kernels.mlp_combine) that saves no (N, D) expert outputs
        for the backward; the torch paths run `forward` and `unpermute`.
        """
        x_TD = rows.x_TD
        dtype = _compute_dtype(x_TD)
        if self.resolve_impl(x_TD.device, dtype) == "triton":
            w_in, w_out = self.w_in.to(dtype), self.w_out.to(dtype)
            return grouped_mlp_combine_triton(
                x_TD.to(dtype), w_in, w_out, tokens_per_expert_E, self.activation, rows.choice_N, weights_TK,
                recompute_h=self.recompute,
            )
        y_ND = self.forward(rows, tokens_per_expert_E)
        with record_function("moe::combine"):
            return unpermute(y_ND, rows.choice_N, weights_TK, x_TD.shape[0])

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, ffn_hidden={self.ffn_hidden}, "
            f"activation={self.activation}, impl={self.impl}" + (", recompute=True" if self.recompute else "")
        )


class MLP(nn.Module):
    """A dense MLP (one expert's shape): the shared experts of an MoE layer and the dense FFN blocks."""

    def __init__(self, d_model: int, ffn_hidden: int, activation: str = "swiglu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation = {activation!r}: allowed: {', '.join(ACTIVATIONS)}")
        self.activation = activation
        self.w_in = nn.Linear(d_model, 2 * ffn_hidden if activation == "swiglu" else ffn_hidden, bias=False)
        self.w_out = nn.Linear(ffn_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., D) any float dtype -> (..., D) in x's dtype (the weights are cast to it, as the
        routed experts' are, so a layer with shared experts takes bf16 tokens with fp32 parameters)."""
        h = F.linear(x, self.w_in.weight.to(x.dtype))
        return F.linear(_activate(h, self.activation), self.w_out.weight.to(x.dtype))


def check_experts_can_run(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Resolve now what the first forward would: MOE_ENGINE_KERNELS's value and every GroupedExperts'
    implementation for `device` and compute `dtype`, so that a choice that cannot run here is a
    ValueError naming it before any training, not a traceback at the first step."""
    try:
        select_backend("topk_gating", device, has_triton=True)
        for module in model.modules():
            if isinstance(module, GroupedExperts):
                module.resolve_impl(device, dtype)
    except RuntimeError as err:  # MOE_ENGINE_KERNELS=triton where Triton cannot run
        raise ValueError(str(err)) from None
