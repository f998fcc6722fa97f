"""The expert MLP on the grouped GEMM: y_ND[n] = act(x[g(n)] @ w_in[e(n)]^T) @ w_out[e(n)]^T.

Two launches of `grouped_gemm`'s kernel with epilogues: the activation fused into the
up-projection's epilogue (SwiGLU computes gate and up in the same program from two weight tiles)
and the activation's backward fused into the epilogue of the backward GEMM d_act = grad_y @ w_out[e].

Memory: the forward saves the pre-activation h (N, H) and recomputes act (N, F) in the backward's
epilogue, instead of saving both (N * 3F) as an unfused layer does. With recompute_h=True it saves
no h either: the backward recomputes it from x with one more up-projection GEMM (2 * N * D * H
FLOPs, a third more backward FLOPs for SwiGLU), so only x and the routing are kept. Followed by
the weighted combine, the layer runs it as `mlp_combine.grouped_mlp_combine`, whose backward
epilogue also takes the routing-weight gradient, so y_ND is not kept either.

- `grouped_mlp_reference`: the per-expert torch loop, the reference the kernels are tested against.
- `grouped_mlp(x, w_in, w_out, tokens_per_expert_E, activation, gather_index_N=None)`: the custom
  op `moe_engine::grouped_mlp` (Triton) or the reference, per `select_backend`.
- `mlp_forward`, `check_mlp`, `keeps_h`, `saved_or_recomputed_h`: the forward launches, the
  argument checks and the save-or-recompute choice that `mlp_combine` shares.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from moe_engine.kernels._triton import TRITON_AVAILABLE
from moe_engine.kernels.backend import select_backend
from moe_engine.kernels.grouped_gemm import _check_rows, _launch_gemm, _num_rows, grouped_gemm_reference, grouped_linear_loop

MLP_ACTIVATIONS = ("swiglu", "gelu")


# References

def activate_reference(h_NH: torch.Tensor, activation: str) -> torch.Tensor:
    """SwiGLU reads h as [gate | up] halves (gate first, as HF's fused gate_up_proj); GELU (exact erf) uses all of h."""
    if activation == "swiglu":
        gate, up = h_NH.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h_NH)


def grouped_mlp_reference(
    x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, tokens_per_expert_E: torch.Tensor, activation: str,
    gather_index_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """y_ND[n] = act(x[g(n)] @ w_in[e]^T) @ w_out[e]^T; w_in (E, H, D), w_out (E, D, F)."""
    h_NH = grouped_gemm_reference(x, w_in, tokens_per_expert_E, gather_index_N)
    return grouped_linear_loop(activate_reference(h_NH, activation), w_out, tokens_per_expert_E)


# Kernel launches, the custom ops, their fakes and autograd

def mlp_forward(x, w_in, w_out, tokens_E, gather_N, activation: str, save_h: bool,
                score_N: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The two launches of the expert MLP's forward: (y (N, D), h (N, H), or (0, H) when not save_h).

    score_N: (N,) fp32, each output row scaled by it in the down-projection's epilogue.
    """
    num_rows, hidden = _num_rows(x, gather_N), w_out.shape[2]
    act = x.new_empty(num_rows, hidden)
    h = x.new_empty(num_rows if save_h else 0, w_in.shape[1])
    _launch_gemm(x, w_in.transpose(1, 2), tokens_E, gather_N, act, hidden, activation, h=h, store_h=save_h)
    y = x.new_empty(num_rows, w_out.shape[1])
    _launch_gemm(act, w_out.transpose(1, 2), tokens_E, None, y, w_out.shape[1], score=score_N)
    return y, h


@torch.library.custom_op("moe_engine::grouped_mlp", mutates_args=())
def _grouped_mlp_op(
    x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, tokens_per_expert_E: torch.Tensor,
    gather_index_N: Optional[torch.Tensor], activation: str, save_h: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y (N, D), h (N, H) pre-activation, or (0, H) when not save_h); h is for the backward only, which
    recomputes it when it was not saved."""
    return mlp_forward(x, w_in, w_out, tokens_per_expert_E, gather_index_N, activation, save_h)


@_grouped_mlp_op.register_fake
def _(x, w_in, w_out, tokens_per_expert_E, gather_index_N, activation, save_h):
    num_rows = _num_rows(x, gather_index_N)
    return x.new_empty(num_rows, w_out.shape[1]), x.new_empty(num_rows if save_h else 0, w_in.shape[1])


@torch.library.custom_op("moe_engine::grouped_mlp_act_backward", mutates_args=())
def _grouped_mlp_act_backward_op(
    grad_y_ND: torch.Tensor, w_out: torch.Tensor, h_NH: torch.Tensor, tokens_per_expert_E: torch.Tensor, activation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh (N, H), act (N, F)): d_act = grad_y @ w_out[e] through the activation's derivative, and act recomputed."""
    num_rows, hidden = grad_y_ND.shape[0], w_out.shape[2]
    dh = grad_y_ND.new_empty(num_rows, h_NH.shape[1])
    act = grad_y_ND.new_empty(num_rows, hidden)
    _launch_gemm(grad_y_ND, w_out, tokens_per_expert_E, None, dh, hidden, activation + "_bwd", h=h_NH, act=act)
    return dh, act


@_grouped_mlp_act_backward_op.register_fake
def _(grad_y_ND, w_out, h_NH, tokens_per_expert_E, activation):
    return grad_y_ND.new_empty(grad_y_ND.shape[0], h_NH.shape[1]), grad_y_ND.new_empty(grad_y_ND.shape[0], w_out.shape[2])


def _mlp_setup_context(ctx, inputs, output):
    x, w_in, w_out, tokens_per_expert_E, gather_index_N, activation, _ = inputs
    ctx.activation = activation
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, w_in, w_out, tokens_per_expert_E, gather_index_N, output[1])


def saved_or_recomputed_h(h: torch.Tensor, x: torch.Tensor, w_in: torch.Tensor, tokens_E: torch.Tensor,
                          gather_N: torch.Tensor | None) -> torch.Tensor:
    """The pre-activation h (N, H) for a backward: as the forward saved it, or (save_h=False: the forward
    kept none) recomputed from x by the up-projection alone."""
    if h.shape[0] == _num_rows(x, gather_N):
        return h
    return torch.ops.moe_engine.grouped_gemm(x, w_in, tokens_E, gather_N)


def _mlp_backward(ctx, grad_y, _grad_h):
    x, w_in, w_out, tokens_E, gather_N, h = ctx.saved_tensors
    need_x, need_w_in, need_w_out = ctx.needs_input_grad[:3]
    h = saved_or_recomputed_h(h, x, w_in, tokens_E, gather_N)
    dh, act = torch.ops.moe_engine.grouped_mlp_act_backward(grad_y, w_out, h, tokens_E, ctx.activation)
    dx = torch.ops.moe_engine.grouped_gemm_dx(dh, w_in, tokens_E, gather_N, x.shape[0]) if need_x else None
    dw_in = torch.ops.moe_engine.grouped_gemm_dw(dh, x, tokens_E, gather_N) if need_w_in else None
    dw_out = torch.ops.moe_engine.grouped_gemm_dw(grad_y, act, tokens_E, None) if need_w_out else None
    return dx, dw_in, dw_out, None, None, None, None


_grouped_mlp_op.register_autograd(_mlp_backward, setup_context=_mlp_setup_context)


# Launchers (validate, then call the custom op) and the public op

def check_mlp(op: str, x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, tokens_E: torch.Tensor, activation: str,
              gather_N: torch.Tensor | None) -> None:
    """Refuse, naming the bad value, what the Triton expert MLP cannot run (see `grouped_mlp_triton`)."""
    if activation not in MLP_ACTIVATIONS:
        raise ValueError(f"{op}: activation = {activation!r}, allowed: {', '.join(MLP_ACTIVATIONS)}")
    _check_rows(op, x, w_in, tokens_E, gather_N)
    hidden = w_in.shape[1] // 2 if activation == "swiglu" else w_in.shape[1]
    expected = (w_in.shape[0], x.shape[1], hidden)
    if tuple(w_out.shape) != expected or (activation == "swiglu" and w_in.shape[1] % 2):
        raise ValueError(f"{op}: w_in {tuple(w_in.shape)} and w_out {tuple(w_out.shape)} do not fit: for {activation} "
                         f"expected w_out of shape {expected}" + (" and an even w_in.shape[1]" if activation == "swiglu" else ""))
    if w_out.dtype != x.dtype or w_out.device != x.device:
        raise ValueError(f"{op}: w_out is {w_out.dtype} on {w_out.device}, expected {x.dtype} on {x.device}")


def keeps_h(recompute_h: bool, *inputs: torch.Tensor) -> bool:
    """Whether a forward saves h for its backward: autograd will run, and h is not to be recomputed."""
    if not isinstance(recompute_h, bool):
        raise ValueError(f"recompute_h = {recompute_h!r}: must be True or False")
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs) and not recompute_h


def grouped_mlp_triton(
    x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, tokens_per_expert_E: torch.Tensor, activation: str,
    gather_index_N: torch.Tensor | None = None, recompute_h: bool = False,
) -> torch.Tensor:
    """The Triton expert MLP: y_ND[n] = act(x[g(n)] @ w_in[e]^T) @ w_out[e]^T.

    x: (M_x, D) (x_TD when gathering, x_ND otherwise); w_in: (E, H, D), H = 2F (SwiGLU: gate rows,
    then up rows) or F (GELU); w_out: (E, D, F); tokens_per_expert_E: (E,) int; gather_index_N:
    optional (N,) int64 rows of x. recompute_h: keep no (N, H) pre-activation for the backward, which
    recomputes it (one more up-projection GEMM). Returns y_ND (N, D) in x's dtype; differentiable in
    x, w_in, w_out.
    """
    check_mlp("grouped_mlp", x, w_in, w_out, tokens_per_expert_E, activation, gather_index_N)
    save_h = keeps_h(recompute_h, x, w_in, w_out)
    y, _ = torch.ops.moe_engine.grouped_mlp(x, w_in, w_out, tokens_per_expert_E, gather_index_N, activation, save_h)
    return y


def grouped_mlp(
    x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, tokens_per_expert_E: torch.Tensor, activation: str,
    gather_index_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """The expert MLP (see `grouped_mlp_triton`): the Triton kernels or the torch loop, per `select_backend`."""
    if select_backend("grouped_mlp", x.device, has_triton=TRITON_AVAILABLE) == "triton":
        return grouped_mlp_triton(x, w_in, w_out, tokens_per_expert_E, activation, gather_index_N)
    return grouped_mlp_reference(x, w_in, w_out, tokens_per_expert_E, activation, gather_index_N)
