"""The expert MLP fused with the weighted combine, with the routing-weight gradient taken from the backward.

    y_TD[t] = sum over the rows n of token t of s_n * mlp_e(n)(x_TD[t]),   s_n = weights_TK.flat[choice_N[n]]

is `unpermute(grouped_mlp(x_TD, ..., gather=choice_N // K), choice_N, weights_TK)`, the local
(no expert parallelism) MoE layer's experts and combine. Composed from the two ops, autograd keeps
the expert outputs y_ND (N, D) alive until the backward, only so that the combine's weight gradient
dS_n = <dY_t, y_n> can be taken. SonicMoE (arXiv 2512.14080) takes it from values the backward
computes anyway:

    dS_n = <g_n, act_n @ w_out[e]^T> = <g_n @ w_out[e], act_n>,      g_n = dY_{token(n)} (unweighted)

and g_n @ w_out[e] is the accumulator of the backward's first GEMM, whose epilogue recomputes
act_n from the saved pre-activation h anyway. So here:

- forward: the two grouped-MLP launches, then the combine; y_ND is freed at once. Saved: x_TD
  (the layer's input, alive anyway), h (N, H), the weights and the routing. N * D fewer saved
  elements than the composed ops (at SonicMoE's shape, T = 32768, K = 4, D = 4096, bf16: 1 GiB less
  per layer, against h's 512 MiB). With recompute_h=True h is not saved either; the backward
  recomputes it from x_TD through the token index (one more up-projection GEMM).
- backward: one GEMM reads g_n through the token index (no (N, D) weighted copy of dY is written),
  its epilogue takes the row dot <acc, act> per 64 columns (fp32 partial sums, summed in a fixed
  order: deterministic), then d_act = s_n * acc through the activation's derivative into dh, and
  stores s_n * act for dW_out = g^T (s * act), whose kernel reads g through the token index too.
  dW_in is the grouped MLP's own; dX is the per-row dX GEMM, then each token sums its K rows in
  fp32 through the inverse of choice_N (permute's backward: no sort of the row index).

`grouped_mlp_combine_reference` is the composition of the two torch references, which the tests
hold the Triton op to (forward and the gradients of x, w_in, w_out and the routing weights).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.profiler import record_function

from moe_engine.kernels._triton import TRITON_AVAILABLE, pinned_config
from moe_engine.kernels.backend import select_backend
from moe_engine.kernels.grouped_gemm import _check_score_block, _launch_gemm, _num_rows, score_slots
from moe_engine.kernels.grouped_mlp import check_mlp, grouped_mlp_reference, keeps_h, mlp_forward, saved_or_recomputed_h
from moe_engine.kernels.permute import unpermute_reference, unpermute_triton


def grouped_mlp_combine_reference(
    x_TD: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, tokens_per_expert_E: torch.Tensor, activation: str,
    choice_N: torch.Tensor, weights_TK: torch.Tensor,
) -> torch.Tensor:
    """The torch loop: `unpermute_reference(grouped_mlp_reference(x_TD rows choice_N // K), choice_N, weights_TK)`."""
    y_ND = grouped_mlp_reference(x_TD, w_in, w_out, tokens_per_expert_E, activation, choice_N // weights_TK.shape[1])
    return unpermute_reference(y_ND, choice_N, weights_TK, x_TD.shape[0])


# Custom ops (Triton), their fakes and autograd

@torch.library.custom_op("moe_engine::grouped_mlp_combine", mutates_args=())
def _grouped_mlp_combine_op(
    x_TD: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, tokens_per_expert_E: torch.Tensor,
    choice_N: torch.Tensor, weights_TK: torch.Tensor, activation: str, save_h: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_TD (T, D), h (N, H) pre-activation or (0, H) when not save_h); h is for the backward only."""
    y_ND, h = mlp_forward(x_TD, w_in, w_out, tokens_per_expert_E, choice_N // weights_TK.shape[1], activation, save_h)
    with record_function("moe::combine"):
        return unpermute_triton(y_ND, choice_N, weights_TK, x_TD.shape[0]), h


@_grouped_mlp_combine_op.register_fake
def _(x_TD, w_in, w_out, tokens_per_expert_E, choice_N, weights_TK, activation, save_h):
    return x_TD.new_empty(x_TD.shape[0], w_out.shape[1]), x_TD.new_empty(choice_N.shape[0] if save_h else 0, w_in.shape[1])


@torch.library.custom_op("moe_engine::grouped_mlp_scored_act_backward", mutates_args=())
def _scored_act_backward_op(
    grad_y: torch.Tensor, token_N: Optional[torch.Tensor], w_out: torch.Tensor, h_NH: torch.Tensor,
    tokens_per_expert_E: torch.Tensor, score_N: torch.Tensor, activation: str, need_score_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh (N, H), s * act (N, F), partial score dots (N, slots) fp32 or (0, slots) when not need_score_grad).

    acc = grad_y[token_N[n]] @ w_out[e] (grad_y (T, D) read through token_N, or grad_y (N, D) row by
    row when token_N is None); dh = act'(h) * (score_N[n] * acc); the partial dots sum over their
    columns to <acc_n, act_n>, the gradient of the routing weight of row n.
    """
    num_rows, hidden = _num_rows(grad_y, token_N), w_out.shape[2]
    dh = grad_y.new_empty(num_rows, h_NH.shape[1])
    act = grad_y.new_empty(num_rows, hidden)
    dscore = torch.empty(num_rows if need_score_grad else 0, score_slots(hidden), dtype=torch.float32,
                         device=grad_y.device)
    _launch_gemm(grad_y, w_out, tokens_per_expert_E, token_N, dh, hidden, activation + "_bwd", h=h_NH, act=act,
                 score=score_N, dscore=dscore if need_score_grad else None)
    return dh, act, dscore


@_scored_act_backward_op.register_fake
def _(grad_y, token_N, w_out, h_NH, tokens_per_expert_E, score_N, activation, need_score_grad):
    num_rows, hidden = _num_rows(grad_y, token_N), w_out.shape[2]
    return (grad_y.new_empty(num_rows, h_NH.shape[1]), grad_y.new_empty(num_rows, hidden),
            grad_y.new_empty(num_rows if need_score_grad else 0, score_slots(hidden), dtype=torch.float32))


def _setup_context(ctx, inputs, output) -> None:
    """Both ops take (x, w_in, w_out, tokens_E, row index, weights, activation, save_h): keep the tensors and h."""
    ctx.activation = inputs[6]
    ctx.mark_non_differentiable(output[1])
    # No expert outputs among them: the weight gradient comes from the backward's own GEMM.
    ctx.save_for_backward(*inputs[:6], output[1])


def _scored_mlp_backward(ctx, grad_y, dy_gather_N, x, w_in, w_out, tokens_E, gather_N, score_N, h, need_score,
                         choice_N=None, top_k=1):
    """(dx, dw_in, dw_out, partial score dots) of score_N[n] * mlp(x[g(n)]) for grad_y (read through dy_gather_N).

    choice_N, top_k: the gather is the routing's, g(n) = choice_N[n] // top_k; dx then sums each token's
    K rows through the inverse map (permute's backward) instead of sorting the index.
    """
    h = saved_or_recomputed_h(h, x, w_in, tokens_E, gather_N)
    ops = torch.ops.moe_engine
    need_x, need_w_in, need_w_out = ctx.needs_input_grad[:3]
    dh, act, dscore = ops.grouped_mlp_scored_act_backward(
        grad_y, dy_gather_N, w_out, h, tokens_E, score_N, ctx.activation, need_score
    )
    dx = None
    if need_x and choice_N is not None:
        dx = ops.permute_backward(ops.grouped_gemm_dx(dh, w_in, tokens_E, None, dh.shape[0]), choice_N, x.shape[0], top_k)
    elif need_x:
        dx = ops.grouped_gemm_dx(dh, w_in, tokens_E, gather_N, x.shape[0])
    dw_in = ops.grouped_gemm_dw(dh, x, tokens_E, gather_N) if need_w_in else None
    dw_out = ops.grouped_gemm_dw(grad_y, act, tokens_E, None, dy_gather_N) if need_w_out else None
    return dx, dw_in, dw_out, dscore


def _backward(ctx, grad_y_TD, _grad_h):
    x_TD, w_in, w_out, tokens_E, choice_N, weights_TK, h = ctx.saved_tensors
    need_weights = ctx.needs_input_grad[5]
    token_N = choice_N // weights_TK.shape[1]
    score_N = weights_TK.reshape(-1).index_select(0, choice_N).float()
    dx, dw_in, dw_out, dscore = _scored_mlp_backward(
        ctx, grad_y_TD, token_N, x_TD, w_in, w_out, tokens_E, token_N, score_N, h, need_weights,
        choice_N=choice_N, top_k=weights_TK.shape[1],
    )
    dweights = None
    if need_weights:
        with record_function("moe::combine"):
            # Dropped choices have no row: their gradient stays 0, as the combine's.
            dweights = weights_TK.new_zeros(weights_TK.numel()).index_copy_(
                0, choice_N, dscore.sum(1).to(weights_TK.dtype)
            ).view_as(weights_TK)
    return dx, dw_in, dw_out, None, None, dweights, None, None


_grouped_mlp_combine_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("moe_engine::grouped_mlp_scored", mutates_args=())
def _grouped_mlp_scored_op(
    x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, tokens_per_expert_E: torch.Tensor,
    gather_index_N: Optional[torch.Tensor], score_N: torch.Tensor, activation: str, save_h: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_ND (N, D) = score_N[n] * mlp(x[g(n)]), h (N, H) or (0, H) when not save_h); h is for the backward only."""
    return mlp_forward(x, w_in, w_out, tokens_per_expert_E, gather_index_N, activation, save_h,
                       score_N.float().contiguous())


@_grouped_mlp_scored_op.register_fake
def _(x, w_in, w_out, tokens_per_expert_E, gather_index_N, score_N, activation, save_h):
    num_rows = _num_rows(x, gather_index_N)
    return x.new_empty(num_rows, w_out.shape[1]), x.new_empty(num_rows if save_h else 0, w_in.shape[1])


def _scored_backward(ctx, grad_y_ND, _grad_h):
    x, w_in, w_out, tokens_E, gather_N, score_N, h = ctx.saved_tensors
    need_score = ctx.needs_input_grad[5]
    dx, dw_in, dw_out, dscore = _scored_mlp_backward(
        ctx, grad_y_ND, None, x, w_in, w_out, tokens_E, gather_N, score_N.float(), h, need_score
    )
    dscore_N = dscore.sum(1).to(score_N.dtype) if need_score else None
    return dx, dw_in, dw_out, None, None, dscore_N, None, None


_grouped_mlp_scored_op.register_autograd(_scored_backward, setup_context=_setup_context)


# Launchers and the public op

def _check_routing(x_TD: torch.Tensor, choice_N: torch.Tensor, weights_TK: torch.Tensor) -> None:
    if weights_TK.dim() != 2 or not weights_TK.is_floating_point() or weights_TK.device != x_TD.device:
        raise ValueError(f"grouped_mlp_combine: weights_TK is a {weights_TK.dim()}-D {weights_TK.dtype} tensor on "
                         f"{weights_TK.device}, expected a 2-D floating (T, K) tensor on {x_TD.device}")
    if weights_TK.shape[0] != x_TD.shape[0] or weights_TK.shape[1] < 1:
        raise ValueError(f"grouped_mlp_combine: weights_TK has shape {tuple(weights_TK.shape)}, expected "
                         f"({x_TD.shape[0]}, K >= 1): one row per token of x_TD")
    if choice_N.shape[0] > weights_TK.numel():
        raise ValueError(f"grouped_mlp_combine: choice_N has {choice_N.shape[0]} rows, more than the "
                         f"{weights_TK.numel()} choices of weights_TK {tuple(weights_TK.shape)}")


def grouped_mlp_combine_triton(
    x_TD: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, tokens_per_expert_E: torch.Tensor, activation: str,
    choice_N: torch.Tensor, weights_TK: torch.Tensor, recompute_h: bool = False,
) -> torch.Tensor:
    """The Triton expert MLP and weighted combine: y_TD (T, D) in x_TD's dtype (see the module docstring).

    x_TD: (T, D) tokens; w_in: (E, H, D), H = 2F (SwiGLU, [gate; up] rows) or F (GELU); w_out:
    (E, D, F); tokens_per_expert_E: (E,) int, summing to N; choice_N: (N,) int64 distinct flat
    choices t * K + k grouped by expert (`expert_order`); weights_TK: (T, K) floating, any dtype.
    recompute_h: keep no (N, H) pre-activation; the backward recomputes it (`grouped_mlp_triton`).
    Differentiable in x_TD, w_in, w_out and weights_TK.
    """
    check_mlp("grouped_mlp_combine", x_TD, w_in, w_out, tokens_per_expert_E, activation, choice_N)
    _check_routing(x_TD, choice_N, weights_TK)
    save_h = keeps_h(recompute_h, x_TD, w_in, w_out, weights_TK)
    if torch.is_grad_enabled() and weights_TK.requires_grad:
        _check_score_block(pinned_config("grouped_gemm"))  # now, not when the backward would fail
    y_TD, _ = torch.ops.moe_engine.grouped_mlp_combine(
        x_TD, w_in, w_out, tokens_per_expert_E, choice_N, weights_TK, activation, save_h
    )
    return y_TD


def grouped_mlp_scored_reference(
    x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, tokens_per_expert_E: torch.Tensor, activation: str,
    score_N: torch.Tensor, gather_index_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """The torch loop: score_N[:, None] * grouped_mlp_reference(...), the product in at least fp32, in x's dtype."""
    return scale_rows(grouped_mlp_reference(x, w_in, w_out, tokens_per_expert_E, activation, gather_index_N), score_N)


def scale_rows(y_ND: torch.Tensor, score_N: torch.Tensor) -> torch.Tensor:
    """score_N[:, None] * y_ND, the product in at least fp32 (as the kernel's epilogue), in y_ND's dtype."""
    acc = torch.promote_types(y_ND.dtype, torch.float32)
    return (y_ND.to(acc) * score_N.to(acc)[:, None]).to(y_ND.dtype)


def grouped_mlp_scored_triton(
    x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, tokens_per_expert_E: torch.Tensor, activation: str,
    score_N: torch.Tensor, gather_index_N: torch.Tensor | None = None, recompute_h: bool = False,
) -> torch.Tensor:
    """The Triton expert MLP with each output row scaled by its routing weight: y_ND (N, D) in x's dtype.

    y_ND[n] = score_N[n] * mlp_e(n)(x[g(n)]) (see `grouped_mlp_triton` for x, w_in, w_out, the counts and
    the gather); score_N: (N,) floating, any dtype. The score's gradient <dy_n, mlp(x_n)> comes from the
    backward GEMM's epilogue, so the unscaled outputs are not kept: what expert parallelism runs when the
    routing weights travel with the rows (the combine on return is then an unweighted sum).
    recompute_h: keep no (N, H) pre-activation; the backward recomputes it (`grouped_mlp_triton`).
    Differentiable in x, w_in, w_out and score_N.
    """
    check_mlp("grouped_mlp_scored", x, w_in, w_out, tokens_per_expert_E, activation, gather_index_N)
    num_rows = _num_rows(x, gather_index_N)
    if score_N.dim() != 1 or score_N.shape[0] != num_rows or not score_N.is_floating_point() or score_N.device != x.device:
        raise ValueError(f"grouped_mlp_scored: score_N is a {tuple(score_N.shape)} {score_N.dtype} tensor on "
                         f"{score_N.device}, expected ({num_rows},) floating on {x.device}: one weight per row")
    save_h = keeps_h(recompute_h, x, w_in, w_out, score_N)
    if torch.is_grad_enabled() and score_N.requires_grad:
        _check_score_block(pinned_config("grouped_gemm"))
    y, _ = torch.ops.moe_engine.grouped_mlp_scored(
        x, w_in, w_out, tokens_per_expert_E, gather_index_N, score_N, activation, save_h
    )
    return y


def grouped_mlp_combine(
    x_TD: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, tokens_per_expert_E: torch.Tensor, activation: str,
    choice_N: torch.Tensor, weights_TK: torch.Tensor,
) -> torch.Tensor:
    """y_TD = the experts' outputs combined with the routing weights: Triton or the torch loop, per `select_backend`."""
    if select_backend("grouped_mlp_combine", x_TD.device, has_triton=TRITON_AVAILABLE) == "triton":
        return grouped_mlp_combine_triton(x_TD, w_in, w_out, tokens_per_expert_E, activation, choice_N, weights_TK)
    return grouped_mlp_combine_reference(x_TD, w_in, w_out, tokens_per_expert_E, activation, choice_N, weights_TK)
