"""Fused top-k gating: router logits -> scores, top-k weights and experts, and the aux-loss statistics.

Notation: T tokens, E experts, K choices per token. The logits GEMM (x_TD @ W_ED^T) stays in
cuBLAS; this op starts from logits_TE and, in one pass per block of tokens, computes

- scores_TE   (fp32): softmax(logits) or sigmoid(logits).
- experts_TK  (int64): the K experts of highest *selection* score, in descending order, ties to
  the lowest expert index. The selection score is scores + expert_bias_E (DeepSeek-V3's
  aux-loss-free balancing: the bias moves the choice, never the weights), optionally limited to
  the best `topk_groups` of `n_groups` equal groups of experts (DeepSeek-V3's group-limited
  routing; a group's score is the sum of its two best selection scores, its one score when a
  group holds a single expert). Experts outside the kept groups cannot be chosen (score -inf;
  Hugging Face's DeepSeek-V3 port fills them with 0 instead, which lets them win when every
  kept score is negative, possible with a negative bias).
- weights_TK  (fp32): the chosen experts' scores (not biased), divided by their sum when
  `renormalize` (the sum clamped to >= 1e-20), then times `scaling_factor`.
- counts_E    (int64): how many of the T*K choices went to each expert (for f_i of the Switch loss).
- prob_sums_E (fp32): sum over tokens of the balance probabilities: the softmax scores, or for
  sigmoid the scores normalised per token (DeepSeek-V3; the sum clamped to >= 1e-20, so a token whose
  scores all underflow adds 0, not NaN), for P_i of the Switch loss.
- lse_T       (fp32): logsumexp of each token's logits, for the z-loss mean(lse^2).

Ties: `torch.topk` on CPU does not break ties by index (zeros of width 16 come back as 12, 9,
10, ...; checked with torch 2.13), so the reference sorts stably instead and both paths pick the
lowest index among equal scores. NaN logits are not supported (a token's NaN makes its scores
NaN; the kernel stays in bounds, but which experts it then picks is unspecified).

Performance shape: one program holds BLOCK_T tokens x all E (padded to a power of two) in
registers and does the K choices as K passes of two int32 row reductions (see `_ordered_key`);
the expert choice needs no sort and no second pass over memory: logits are read once, scores
written once.

counts_E and prob_sums_E are accumulated with atomics across blocks: counts are exact; the
float sums may differ in the last bits between runs (summation order). Their gradient does not
depend on their value, so gradients are deterministic.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moe_engine.kernels._triton import TRITON_AVAILABLE, autotune, triton
from moe_engine.kernels._triton import jit as _jit
from moe_engine.kernels.backend import select_backend

if TRITON_AVAILABLE:
    import triton.language as tl

    # Keys of chosen experts, and of padding / experts outside the kept groups (see `_ordered_key`).
    _KEY_TAKEN = tl.constexpr(-(2**31))
    _KEY_MASKED = tl.constexpr(-(2**31) + 1)

SCORE_FUNCTIONS = ("softmax", "sigmoid")
# A token's E scores live in registers; past this the kernel would spill everything.
MAX_EXPERTS = 4096
_RENORM_EPS = 1e-20


class TopKGating(NamedTuple):
    """What `topk_gating` returns; see the module docstring for each field."""

    scores_TE: torch.Tensor
    weights_TK: torch.Tensor
    experts_TK: torch.Tensor
    counts_E: torch.Tensor
    prob_sums_E: torch.Tensor
    lse_T: torch.Tensor


def check_gating_args(
    logits_TE: torch.Tensor, top_k: int, score_function: str, expert_bias_E: torch.Tensor | None,
    n_groups: int, topk_groups: int,
) -> None:
    """ValueError naming the bad value, for both backends."""
    if logits_TE.dim() != 2 or not logits_TE.is_floating_point():
        raise ValueError(f"logits_TE: expected a 2-D floating tensor (T, E), got {logits_TE.dim()}-D {logits_TE.dtype}")
    num_experts = logits_TE.shape[1]
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"logits_TE has E = {num_experts} experts: expected 1 <= E <= {MAX_EXPERTS}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k = {top_k}: expected 1 <= top_k <= E = {num_experts}")
    if score_function not in SCORE_FUNCTIONS:
        raise ValueError(f"score_function = {score_function!r}: allowed: {', '.join(SCORE_FUNCTIONS)}")
    if expert_bias_E is not None:
        if expert_bias_E.shape != (num_experts,) or not expert_bias_E.is_floating_point():
            raise ValueError(
                f"expert_bias_E: expected a floating tensor of shape ({num_experts},), got "
                f"{tuple(expert_bias_E.shape)} {expert_bias_E.dtype}"
            )
        if expert_bias_E.device != logits_TE.device:
            raise ValueError(f"expert_bias_E is on {expert_bias_E.device}, expected {logits_TE.device} like logits_TE")
    if n_groups < 1 or num_experts % n_groups:
        raise ValueError(f"n_groups = {n_groups}: expected a divisor of E = {num_experts}")
    if not 1 <= topk_groups <= n_groups:
        raise ValueError(f"topk_groups = {topk_groups}: expected 1 <= topk_groups <= n_groups = {n_groups}")
    if top_k > topk_groups * (num_experts // n_groups):
        raise ValueError(
            f"top_k = {top_k}: the {topk_groups} kept groups of {num_experts // n_groups} experts offer only "
            f"{topk_groups * (num_experts // n_groups)}"
        )


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def stable_topk_indices(values_TE: torch.Tensor, k: int) -> torch.Tensor:
    """(T, k) int64: indices of the k largest values per row, descending, ties to the lowest index."""
    return torch.sort(values_TE, dim=-1, descending=True, stable=True).indices[:, :k]


def limit_to_top_groups(select_TE: torch.Tensor, n_groups: int, topk_groups: int) -> torch.Tensor:
    """select_TE with -inf outside each token's best `topk_groups` groups (group score: sum of its top 2)."""
    num_tokens, num_experts = select_TE.shape
    group_size = num_experts // n_groups
    grouped_TGS = select_TE.view(num_tokens, n_groups, group_size)
    group_scores_TG = grouped_TGS.topk(min(2, group_size), dim=-1).values.sum(dim=-1)
    top_groups_TG = stable_topk_indices(group_scores_TG, topk_groups)
    keep_TG = torch.zeros(num_tokens, n_groups, dtype=torch.bool, device=select_TE.device)
    keep_TG.scatter_(1, top_groups_TG, True)
    return select_TE.masked_fill(~keep_TG.repeat_interleave(group_size, dim=1), float("-inf"))


def topk_gating_reference(
    logits_TE: torch.Tensor, top_k: int, *, score_function: str = "softmax", renormalize: bool = True,
    scaling_factor: float = 1.0, expert_bias_E: torch.Tensor | None = None, n_groups: int = 1, topk_groups: int = 1,
) -> TopKGating:
    """`topk_gating` from torch ops; differentiable through torch autograd."""
    check_gating_args(logits_TE, top_k, score_function, expert_bias_E, n_groups, topk_groups)
    logits_TE = logits_TE.float()
    num_experts = logits_TE.shape[1]
    scores_TE = logits_TE.softmax(dim=-1) if score_function == "softmax" else logits_TE.sigmoid()
    select_TE = scores_TE.detach()
    if expert_bias_E is not None:
        select_TE = select_TE + expert_bias_E.float()
    if 1 < n_groups and topk_groups < n_groups:
        select_TE = limit_to_top_groups(select_TE, n_groups, topk_groups)
    experts_TK = stable_topk_indices(select_TE, top_k)
    weights_TK = scores_TE.gather(1, experts_TK)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(_RENORM_EPS)
    weights_TK = weights_TK * scaling_factor
    if score_function == "softmax":
        probs_TE = scores_TE
    else:
        probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp_min(_RENORM_EPS)
    counts_E = torch.bincount(experts_TK.reshape(-1), minlength=num_experts)
    return TopKGating(scores_TE, weights_TK, experts_TK, counts_E, probs_TE.sum(dim=0), torch.logsumexp(logits_TE, -1))


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


def _topk_gating_configs() -> list[dict[str, int]]:
    # One program holds BLOCK_T x E_PAD tiles in registers; `_autotune` drops the candidates whose
    # tiles are too large (or too small) for the E at hand. The first one is the interpreter's.
    return [
        {"BLOCK_T": 16, "num_warps": 4},
        {"BLOCK_T": 1, "num_warps": 4},
        {"BLOCK_T": 2, "num_warps": 4},
        {"BLOCK_T": 4, "num_warps": 4},
        {"BLOCK_T": 8, "num_warps": 4},
        {"BLOCK_T": 32, "num_warps": 4},
        {"BLOCK_T": 64, "num_warps": 4},
        {"BLOCK_T": 16, "num_warps": 8},
        {"BLOCK_T": 32, "num_warps": 8},
        {"BLOCK_T": 64, "num_warps": 8},
        {"BLOCK_T": 128, "num_warps": 8},
        {"BLOCK_T": 128, "num_warps": 4},  # small E (Mixtral's 8): many tokens per program
        {"BLOCK_T": 256, "num_warps": 8},
    ]


def _topk_gating_backward_configs() -> list[dict[str, int]]:
    return _topk_gating_configs()


def _autotune(op: str, candidates: list[dict[str, int]], key: list[str], max_elements_per_thread: int,
              reset_to_zero: list[str] | None = None):
    """Autotune over the candidates whose (BLOCK_T, E_PAD) tiles fit in registers and fill the threads.

    Budgets from ptxas for sm_90 (triton 3.9, E = 128, K = 8): the forward at 32 elements per
    thread and tile takes ~130 registers, 16 take ~80, 64 spill; the backward, with more tiles
    alive, spills above 16.
    """

    def prune(configs, named_args, **kwargs):
        def per_thread(c):
            return c.kwargs["BLOCK_T"] * kwargs["E_PAD"] / (32 * c.num_warps)

        kept = [c for c in configs if 4 <= per_thread(c) <= max_elements_per_thread]
        return kept or [min(configs, key=lambda c: abs(per_thread(c) - max_elements_per_thread))]

    return autotune(op, candidates, key, reset_to_zero=reset_to_zero, prune=prune)


@_jit
def _score(x, row_max, inv_sum, SIGMOID: tl.constexpr):
    # The score of logits x (any shape) of tokens whose row max and 1 / sum_e exp(x_e - max) are
    # given: exp(x - m) * inv_sum (softmax), or the sigmoid as r = 1/(1+e^-|x|), x >= 0: r, else
    # e^-|x| r (one exp that never overflows). Padding logits (-inf) score 0 either way. The tile
    # and the single-expert recomputations go through this one function: they agree bit for bit.
    if SIGMOID:
        z = tl.exp(-tl.abs(x))
        r = 1.0 / (1.0 + z)
        return tl.where(x >= 0, r, z * r)
    else:
        return tl.exp(x - row_max) * inv_sum


# Selection runs on int32 keys that order like the fp32 values (for negative floats the magnitude
# bits are flipped): a warp's int32 max/min is one instruction (redux.sync), a float one five
# shuffle rounds. NaN keys sort above +inf, as in torch's descending sort. The map is its own
# inverse. TAKEN marks chosen experts, MASKED padding and experts of groups not kept: both sort
# below every real value, -inf included.
@_jit
def _ordered_key(x):
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@_jit
def _key_value(key):
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


# Shapes: logits (T, E) any float dtype, row stride stride_t; bias (E,) fp32 (read if HAS_BIAS);
# scores (T, E) fp32; weights (T, K) fp32; experts (T, K) int64; counts (E,) int64 and
# prob_sums (E,) fp32, both zeroed beforehand; lse (T,) fp32. E_PAD = next_pow2(E),
# K_PAD = next_pow2(K), GROUP_SIZE = E // N_GROUPS. Grid: (cdiv(T, BLOCK_T),).
@_jit
def _load_logit_tile(logits_ptr, rows, cols, num_tokens, num_experts, stride_t):
    # The (BLOCK_T, E_PAD) fp32 logit tile of the forward and backward kernels, with its masks.
    # Padding rows load 0 (finite, so no NaN reaches the column sums); padding experts are -inf.
    row_ok = rows < num_tokens
    col_ok = cols < num_experts
    tile_ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(logits_ptr + rows[:, None] * stride_t + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    return tl.where(col_ok[None, :], x, float("-inf")), row_ok, col_ok, tile_ok


@_autotune("topk_gating", _topk_gating_configs(), key=["E_PAD", "TOP_K", "N_GROUPS", "TOPK_GROUPS", "SIGMOID"],
           reset_to_zero=["counts_ptr", "prob_sums_ptr"], max_elements_per_thread=32)
def _topk_gating_kernel(
    logits_ptr, bias_ptr, scores_ptr, weights_ptr, experts_ptr, counts_ptr, prob_sums_ptr, lse_ptr,
    num_tokens, num_experts, stride_t, scaling_factor,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, GROUP_SIZE: tl.constexpr,
    N_GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr, SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # Per token t (a row of the tile; padded experts are -inf logits and never chosen):
    #   lse_t = m_t + log(sum_e exp(x_te - m_t)),  m_t = max_e x_te
    #   s_te  = exp(x_te - m_t) / sum_e exp(x_te - m_t)  (softmax)   or  1 / (1 + exp(-x_te))  (sigmoid)
    #   q_te  = s_te (softmax)  or  s_te / sum_e s_te (sigmoid): the balance probabilities
    #   top-k on c_te = s_te + b_e by K passes of (row max, lowest index attaining it, mark it
    #   taken): two int32 row reductions per choice, all in registers
    #   w_tk  = scaling * s_{t,e_k} / max(sum_j s_{t,e_j}, 1e-20)  (the division only if RENORMALIZE)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    x, row_ok, col_ok, tile_ok = _load_logit_tile(logits_ptr, rows, cols, num_tokens, num_experts, stride_t)
    row_max = tl.max(x, axis=1)
    exp_sum = tl.sum(tl.exp(x - row_max[:, None]), axis=1)
    inv_sum = 1.0 / exp_sum
    tl.store(lse_ptr + rows, row_max + tl.log(exp_sum), mask=row_ok)
    scores = _score(x, row_max[:, None], inv_sum[:, None], SIGMOID)
    tl.store(scores_ptr + rows[:, None] * num_experts + cols[None, :], scores, mask=tile_ok)
    if SIGMOID:
        balance = scores * (1.0 / tl.maximum(tl.sum(scores, axis=1), 1e-20))[:, None]
    else:
        balance = scores
    prob_sums = tl.sum(tl.where(tile_ok, balance, 0.0), axis=0)
    tl.atomic_add(prob_sums_ptr + cols, prob_sums, mask=col_ok, sem="relaxed")

    if HAS_BIAS:
        select = scores + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    else:
        select = scores
    key = tl.where(col_ok[None, :], _ordered_key(select), _KEY_MASKED)
    if N_GROUPS > 1 and TOPK_GROUPS < N_GROUPS:
        # Group score (sum of the group's two best selection scores) spread over the group's columns.
        group_of_col = cols // GROUP_SIZE  # padding columns fall in no group < N_GROUPS
        group_keys = tl.full((BLOCK_T, E_PAD), _KEY_MASKED, tl.int32)
        for g in range(N_GROUPS):
            in_group = (group_of_col == g)[None, :]
            member = tl.where(in_group, key, _KEY_MASKED)
            best = tl.max(member, axis=1)
            group_score = _key_value(best)
            if GROUP_SIZE > 1:
                first = tl.min(tl.where(member == best[:, None], cols[None, :], E_PAD), axis=1)
                second = tl.max(tl.where(cols[None, :] == first[:, None], _KEY_MASKED, member), axis=1)
                group_score = group_score + _key_value(second)
            group_keys = tl.where(in_group, _ordered_key(group_score)[:, None], group_keys)
        keep = tl.zeros((BLOCK_T, E_PAD), tl.int1)
        for _ in range(TOPK_GROUPS):
            top = tl.max(group_keys, axis=1)
            first = tl.min(tl.where(group_keys == top[:, None], cols[None, :], E_PAD), axis=1)
            chosen_group = group_of_col[None, :] == (first // GROUP_SIZE)[:, None]
            keep = keep | chosen_group
            group_keys = tl.where(chosen_group, _KEY_TAKEN, group_keys)
        key = tl.where(keep, key, _KEY_MASKED)

    k_cols = tl.arange(0, K_PAD)
    weights = tl.zeros((BLOCK_T, K_PAD), tl.float32)
    experts = tl.zeros((BLOCK_T, K_PAD), tl.int64)
    for k in tl.static_range(TOP_K):
        top = tl.max(key, axis=1)
        expert = tl.min(tl.where(key == top[:, None], cols[None, :], E_PAD), axis=1)
        key = tl.where(cols[None, :] == expert[:, None], _KEY_TAKEN, key)
        if HAS_BIAS:
            # The weight is the unbiased score: recomputed from the expert's logit (a cached load).
            logit = tl.load(logits_ptr + rows * stride_t + expert, mask=row_ok, other=0.0).to(tl.float32)
            weight = _score(logit, row_max, inv_sum, SIGMOID)
        else:
            weight = _key_value(top)  # without a bias the selection score is the score
        weights = tl.where(k_cols[None, :] == k, weight[:, None], weights)
        experts = tl.where(k_cols[None, :] == k, expert[:, None].to(tl.int64), experts)
    if RENORMALIZE:
        weights = weights * (scaling_factor / tl.maximum(tl.sum(weights, axis=1), 1e-20))[:, None]
    else:
        weights = weights * scaling_factor
    out_ok = row_ok[:, None] & (k_cols < TOP_K)[None, :]
    tl.store(weights_ptr + rows[:, None] * TOP_K + k_cols[None, :], weights, mask=out_ok)
    tl.store(experts_ptr + rows[:, None] * TOP_K + k_cols[None, :], experts, mask=out_ok)
    chosen = (key == _KEY_TAKEN) & row_ok[:, None]
    tl.atomic_add(counts_ptr + cols, tl.sum(chosen.to(tl.int32), axis=0).to(tl.int64), mask=col_ok, sem="relaxed")


# Shapes: logits (T, E), row stride stride_t; experts (T, K) int64; grad_weights (T, K) fp32;
# grad_scores (T, E) fp32; grad_prob_sums (E,) fp32; grad_lse (T,) fp32 (each read only if its
# HAS_ flag is set); grad_logits (T, E) in the logits' dtype. Grid: (cdiv(T, BLOCK_T),).
@_autotune("topk_gating_backward", _topk_gating_backward_configs(), key=["E_PAD", "TOP_K", "SIGMOID"],
           max_elements_per_thread=16)
def _topk_gating_backward_kernel(
    logits_ptr, experts_ptr, grad_weights_ptr, grad_scores_ptr, grad_prob_sums_ptr, grad_lse_ptr, grad_logits_ptr,
    num_tokens, num_experts, stride_t, scaling_factor,
    TOP_K: tl.constexpr, E_PAD: tl.constexpr, SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr,
    HAS_GRAD_WEIGHTS: tl.constexpr, HAS_GRAD_SCORES: tl.constexpr, HAS_GRAD_PROB_SUMS: tl.constexpr,
    HAS_GRAD_LSE: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # Scores are recomputed from the logits (cheaper than storing them for the backward). With
    # g = dL/dw, gs = dL/ds, gq = dL/dprob_sums, gl = dL/dlse, c = scaling, r_k = s_{e_k}:
    #   weights:  w_k = c r_k / R, R = sum_j r_j  =>  dL/dr_k = (c / R) (g_k - sum_j g_j r_j / R);
    #             without renormalisation dL/dr_k = c g_k. (R < 1e-20: R is clamped, its
    #             gradient is 0, so dL/dr_k = c g_k / 1e-20.) The bias only moved the choice.
    #   balance:  softmax: dL/ds_e += gq_e;  sigmoid, q_e = s_e / S, S = sum_j s_j:
    #             dL/ds_e += (gq_e - sum_j gq_j q_j) / S   (S < 1e-20: clamped as in the forward,
    #             dL/ds_e += gq_e / 1e-20; every s_e underflowed then, so dL/dx is 0, not 0/0).
    #   scores:   softmax Jacobian ds_j/dx_e = s_j (delta_je - s_e)  =>  dL/dx = s * (G - sum_j G_j s_j);
    #             sigmoid ds/dx = s (1 - s)  =>  dL/dx = G s (1 - s)   (G = total dL/ds).
    #   lse:      dlse/dx = softmax(x)  =>  dL/dx += gl * softmax(x).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, E_PAD)
    x, row_ok, col_ok, tile_ok = _load_logit_tile(logits_ptr, rows, cols, num_tokens, num_experts, stride_t)
    row_max = tl.max(x, axis=1)
    inv_sum = 1.0 / tl.sum(tl.exp(x - row_max[:, None]), axis=1)
    probs = _score(x, row_max[:, None], inv_sum[:, None], False)
    scores = _score(x, row_max[:, None], inv_sum[:, None], SIGMOID)
    grad_s = tl.zeros((BLOCK_T, E_PAD), tl.float32)
    if HAS_GRAD_WEIGHTS:
        scale = tl.full((BLOCK_T,), scaling_factor, tl.float32)
        inner = tl.zeros((BLOCK_T,), tl.float32)
        if RENORMALIZE:
            # r_k recomputed from the chosen expert's logit (a cached load), not gathered by a reduction.
            total = tl.zeros((BLOCK_T,), tl.float32)
            g_dot_r = tl.zeros((BLOCK_T,), tl.float32)
            for k in tl.static_range(TOP_K):
                expert = tl.load(experts_ptr + rows * TOP_K + k, mask=row_ok, other=0)
                g = tl.load(grad_weights_ptr + rows * TOP_K + k, mask=row_ok, other=0.0)
                logit = tl.load(logits_ptr + rows * stride_t + expert, mask=row_ok, other=0.0).to(tl.float32)
                r = _score(logit, row_max, inv_sum, SIGMOID)
                total += r
                g_dot_r += g * r
            denom = tl.maximum(total, 1e-20)
            scale = scaling_factor / denom
            inner = tl.where(total >= 1e-20, g_dot_r / denom, 0.0)
        for k in tl.static_range(TOP_K):
            expert = tl.load(experts_ptr + rows * TOP_K + k, mask=row_ok, other=0)
            g = tl.load(grad_weights_ptr + rows * TOP_K + k, mask=row_ok, other=0.0)
            grad_r = scale * (g - inner)
            grad_s += tl.where(cols[None, :] == expert[:, None], grad_r[:, None], 0.0)
    if HAS_GRAD_SCORES:
        grad_s += tl.load(grad_scores_ptr + rows[:, None] * num_experts + cols[None, :], mask=tile_ok, other=0.0)
    if HAS_GRAD_PROB_SUMS:
        gq = tl.load(grad_prob_sums_ptr + cols, mask=col_ok, other=0.0)[None, :]
        if SIGMOID:
            score_sum = tl.sum(scores, axis=1)[:, None]
            denom = tl.maximum(score_sum, 1e-20)
            through_sum = tl.where(score_sum >= 1e-20, tl.sum(gq * scores, axis=1)[:, None] / denom, 0.0)
            grad_s += (gq - through_sum) / denom
        else:
            grad_s += gq
    if SIGMOID:
        grad_x = grad_s * scores * (1.0 - scores)
    else:
        grad_x = probs * (grad_s - tl.sum(grad_s * probs, axis=1)[:, None])
    if HAS_GRAD_LSE:
        grad_x += tl.load(grad_lse_ptr + rows, mask=row_ok, other=0.0)[:, None] * probs
    tl.store(grad_logits_ptr + rows[:, None] * num_experts + cols[None, :],
             grad_x.to(grad_logits_ptr.dtype.element_ty), mask=tile_ok)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _launch(kernel, grid, config: dict[str, int] | None, *args, **constexprs) -> None:
    """Autotuned launch, or one forced `config` (tests, benchmarks) on the kernel under the autotuner."""
    if config is None:
        kernel[grid](*args, **constexprs)
    else:
        kernel.fn[grid](*args, **constexprs, **config)


def _rows(logits_TE: torch.Tensor) -> torch.Tensor:
    return logits_TE if logits_TE.stride(-1) == 1 else logits_TE.contiguous()


def topk_gating_triton(
    logits_TE: torch.Tensor, top_k: int, *, score_function: str = "softmax", renormalize: bool = True,
    scaling_factor: float = 1.0, expert_bias_E: torch.Tensor | None = None, n_groups: int = 1, topk_groups: int = 1,
    config: dict[str, int] | None = None,
) -> TopKGating:
    """The Triton kernel, no autograd (the custom op adds it). `config` forces one launch config."""
    check_gating_args(logits_TE, top_k, score_function, expert_bias_E, n_groups, topk_groups)
    logits_TE = _rows(logits_TE)
    (num_tokens, num_experts), device = logits_TE.shape, logits_TE.device
    scores_TE = torch.empty(num_tokens, num_experts, dtype=torch.float32, device=device)
    weights_TK = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
    experts_TK = torch.empty(num_tokens, top_k, dtype=torch.int64, device=device)
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=device)
    prob_sums_E = torch.zeros(num_experts, dtype=torch.float32, device=device)
    lse_T = torch.empty(num_tokens, dtype=torch.float32, device=device)
    if num_tokens:
        bias_E = None if expert_bias_E is None else expert_bias_E.float().contiguous()
        grid = lambda meta: (triton.cdiv(num_tokens, meta["BLOCK_T"]),)  # noqa: E731
        _launch(
            _topk_gating_kernel, grid, config, logits_TE, scores_TE if bias_E is None else bias_E, scores_TE,
            weights_TK, experts_TK, counts_E, prob_sums_E, lse_T, num_tokens, num_experts, logits_TE.stride(0),
            float(scaling_factor), TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k),
            E_PAD=triton.next_power_of_2(num_experts), GROUP_SIZE=num_experts // n_groups, N_GROUPS=n_groups,
            TOPK_GROUPS=topk_groups, SIGMOID=score_function == "sigmoid", RENORMALIZE=renormalize,
            HAS_BIAS=bias_E is not None,
        )
    return TopKGating(scores_TE, weights_TK, experts_TK, counts_E, prob_sums_E, lse_T)


def _check_grad(name: str, grad: torch.Tensor | None, shape: tuple[int, ...], device: torch.device):
    if grad is None:
        return None
    if tuple(grad.shape) != shape or not grad.is_floating_point() or grad.device != device:
        raise ValueError(f"{name}: expected a floating tensor of shape {shape} on {device}, "
                         f"got {tuple(grad.shape)} {grad.dtype} on {grad.device}")
    return grad.float().contiguous()


def topk_gating_backward_triton(
    logits_TE: torch.Tensor, experts_TK: torch.Tensor, grad_weights_TK: torch.Tensor | None,
    grad_scores_TE: torch.Tensor | None, grad_prob_sums_E: torch.Tensor | None, grad_lse_T: torch.Tensor | None,
    *, score_function: str = "softmax", renormalize: bool = True, scaling_factor: float = 1.0,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """grad_logits_TE (T, E) in logits_TE's dtype from the gradients of the outputs (None: zero)."""
    if logits_TE.dim() != 2 or not logits_TE.is_floating_point():
        raise ValueError(f"logits_TE: expected a 2-D floating tensor (T, E), got {logits_TE.dim()}-D {logits_TE.dtype}")
    if score_function not in SCORE_FUNCTIONS:
        raise ValueError(f"score_function = {score_function!r}: allowed: {', '.join(SCORE_FUNCTIONS)}")
    logits_TE = _rows(logits_TE)
    (num_tokens, num_experts), device = logits_TE.shape, logits_TE.device
    if experts_TK.dim() != 2 or experts_TK.shape[0] != num_tokens or experts_TK.dtype != torch.int64:
        raise ValueError(
            f"experts_TK: expected ({num_tokens}, K) int64, got {tuple(experts_TK.shape)} {experts_TK.dtype}"
        )
    top_k = experts_TK.shape[1]
    grad_weights_TK = _check_grad("grad_weights_TK", grad_weights_TK, (num_tokens, top_k), device)
    grad_scores_TE = _check_grad("grad_scores_TE", grad_scores_TE, (num_tokens, num_experts), device)
    grad_prob_sums_E = _check_grad("grad_prob_sums_E", grad_prob_sums_E, (num_experts,), device)
    grad_lse_T = _check_grad("grad_lse_T", grad_lse_T, (num_tokens,), device)
    grad_logits_TE = torch.empty(num_tokens, num_experts, dtype=logits_TE.dtype, device=device)
    if num_tokens:
        grid = lambda meta: (triton.cdiv(num_tokens, meta["BLOCK_T"]),)  # noqa: E731
        grads = (grad_weights_TK, grad_scores_TE, grad_prob_sums_E, grad_lse_T)
        _launch(
            _topk_gating_backward_kernel, grid, config, logits_TE, experts_TK.contiguous(),
            # an absent gradient passes any pointer: its HAS_ flag keeps the kernel from reading it
            *(grad_logits_TE if grad is None else grad for grad in grads),
            grad_logits_TE, num_tokens, num_experts, logits_TE.stride(0), float(scaling_factor),
            TOP_K=top_k, E_PAD=triton.next_power_of_2(num_experts), SIGMOID=score_function == "sigmoid",
            RENORMALIZE=renormalize, HAS_GRAD_WEIGHTS=grad_weights_TK is not None,
            HAS_GRAD_SCORES=grad_scores_TE is not None, HAS_GRAD_PROB_SUMS=grad_prob_sums_E is not None,
            HAS_GRAD_LSE=grad_lse_T is not None,
        )
    return grad_logits_TE


# ---------------------------------------------------------------------------------------------
# Custom ops (what the Triton path runs, so torch.compile traces through it)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("moe_engine::topk_gating", mutates_args=())
def _topk_gating_op(
    logits_TE: torch.Tensor, expert_bias_E: torch.Tensor | None, top_k: int, score_function: str, renormalize: bool,
    scaling_factor: float, n_groups: int, topk_groups: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(topk_gating_triton(
        logits_TE, top_k, score_function=score_function, renormalize=renormalize, scaling_factor=scaling_factor,
        expert_bias_E=expert_bias_E, n_groups=n_groups, topk_groups=topk_groups,
    ))


@_topk_gating_op.register_fake
def _(logits_TE, expert_bias_E, top_k, score_function, renormalize, scaling_factor, n_groups, topk_groups):
    num_tokens, num_experts = logits_TE.shape
    f32, i64 = torch.float32, torch.int64
    return (logits_TE.new_empty(num_tokens, num_experts, dtype=f32), logits_TE.new_empty(num_tokens, top_k, dtype=f32),
            logits_TE.new_empty(num_tokens, top_k, dtype=i64), logits_TE.new_empty(num_experts, dtype=i64),
            logits_TE.new_empty(num_experts, dtype=f32), logits_TE.new_empty(num_tokens, dtype=f32))


@torch.library.custom_op("moe_engine::topk_gating_backward", mutates_args=())
def _topk_gating_backward_op(
    logits_TE: torch.Tensor, experts_TK: torch.Tensor, grad_weights_TK: torch.Tensor | None,
    grad_scores_TE: torch.Tensor | None, grad_prob_sums_E: torch.Tensor | None, grad_lse_T: torch.Tensor | None,
    score_function: str, renormalize: bool, scaling_factor: float,
) -> torch.Tensor:
    return topk_gating_backward_triton(
        logits_TE, experts_TK, grad_weights_TK, grad_scores_TE, grad_prob_sums_E, grad_lse_T,
        score_function=score_function, renormalize=renormalize, scaling_factor=scaling_factor,
    )


@_topk_gating_backward_op.register_fake
def _(logits_TE, experts_TK, grad_weights_TK, grad_scores_TE, grad_prob_sums_E, grad_lse_T, score_function,
      renormalize, scaling_factor):
    return torch.empty_like(logits_TE, memory_format=torch.contiguous_format)


def _topk_gating_setup_context(ctx, inputs, output) -> None:
    logits_TE, _, _, score_function, renormalize, scaling_factor, _, _ = inputs
    ctx.save_for_backward(logits_TE, output[2])
    ctx.score_function, ctx.renormalize, ctx.scaling_factor = score_function, renormalize, scaling_factor


def _topk_gating_autograd(ctx, grad_scores_TE, grad_weights_TK, _grad_experts, _grad_counts, grad_prob_sums_E,
                          grad_lse_T):
    if not ctx.needs_input_grad[0]:
        return (None,) * 8
    logits_TE, experts_TK = ctx.saved_tensors
    grad_logits_TE = torch.ops.moe_engine.topk_gating_backward(
        logits_TE, experts_TK, grad_weights_TK, grad_scores_TE, grad_prob_sums_E, grad_lse_T,
        ctx.score_function, ctx.renormalize, ctx.scaling_factor,
    )
    return (grad_logits_TE,) + (None,) * 7


_topk_gating_op.register_autograd(_topk_gating_autograd, setup_context=_topk_gating_setup_context)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def topk_gating(
    logits_TE: torch.Tensor, top_k: int, *, score_function: str = "softmax", renormalize: bool = True,
    scaling_factor: float = 1.0, expert_bias_E: torch.Tensor | None = None, n_groups: int = 1, topk_groups: int = 1,
) -> TopKGating:
    """Scores, top-k weights/experts and aux-loss statistics of router logits, in one pass.

    logits_TE: (T, E) float (computed in fp32; fp32 is what routers should pass). top_k: K.
    score_function: "softmax" or "sigmoid". renormalize: divide the K weights by their sum.
    scaling_factor: multiplies the weights. expert_bias_E: (E,) float or None, added to the
    scores for selection only. n_groups, topk_groups: choose among the experts of the best
    `topk_groups` of `n_groups` equal groups (1, 1: no group limit).
    Returns TopKGating(scores_TE (T, E) fp32, weights_TK (T, K) fp32, experts_TK (T, K) int64,
    counts_E (E,) int64, prob_sums_E (E,) fp32, lse_T (T,) fp32). Gradients flow to logits_TE
    from scores_TE, weights_TK, prob_sums_E and lse_T.
    """
    if select_backend("topk_gating", logits_TE.device, has_triton=TRITON_AVAILABLE) == "triton":
        check_gating_args(logits_TE, top_k, score_function, expert_bias_E, n_groups, topk_groups)
        bias_E = None if expert_bias_E is None else expert_bias_E.detach()
        return TopKGating(*torch.ops.moe_engine.topk_gating(
            logits_TE, bias_E, top_k, score_function, renormalize, float(scaling_factor), n_groups, topk_groups
        ))
    return topk_gating_reference(
        logits_TE, top_k, score_function=score_function, renormalize=renormalize, scaling_factor=scaling_factor,
        expert_bias_E=expert_bias_E, n_groups=n_groups, topk_groups=topk_groups,
    )
