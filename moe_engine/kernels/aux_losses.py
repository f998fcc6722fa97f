"""Load-balancing and stability losses of routers: Triton kernels, launchers and torch references.

Notation: T tokens, E experts, K choices per token, S sequences. Definitions (../shared/REFERENCES.md):

- Switch/GShard:  L = E * sum_i f_i P_i, f_i = (choices of expert i) / (T*K) (dropped choices,
  id -1, are not counted but stay in the denominator), P_i = mean over tokens of probs_ti.
  Gradient flows through P only (f is a count).
- Sequence-level: the same within each sequence s (n_s tokens: f_si over n_s*K, P_si over n_s),
  averaged over the sequences that have tokens (DeepSeek-V3's complementary loss).
- z-loss (ST-MoE): mean over tokens of logsumexp(logits_t)^2.
- Shazeer's importance and load CV^2 losses: `cv_squared.py`.
- No tokens: every loss here is 0 (not the NaN of a mean over nothing).

Scalar losses and per-expert sums are accumulated with atomics across blocks: the loss values
may differ in their last bits between runs; the gradients do not depend on those sums'
rounding (they use exact integer counts, per-token lse, or are recomputed).
"""

from __future__ import annotations

import torch

from moe_engine.kernels._triton import TRITON_AVAILABLE, launch, triton
from moe_engine.kernels._triton import autotune as _autotune
from moe_engine.kernels._triton import jit as _jit
from moe_engine.kernels.backend import select_backend

if TRITON_AVAILABLE:
    import triton.language as tl



# ---------------------------------------------------------------------------------------------
# References (in fp32, or fp64 for fp64 inputs, so gradcheck can validate them)
# ---------------------------------------------------------------------------------------------


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def sequence_load_balancing_loss_reference(
    probs_TE: torch.Tensor, experts_TK: torch.Tensor, sequence_ids_T: torch.Tensor, num_sequences: int | None = None
) -> torch.Tensor:
    """The Switch loss within each sequence, averaged over the sequences that have tokens.

    probs_TE: (T, E) float; experts_TK: (T, K) int64, -1 for dropped; sequence_ids_T: (T,) int64
    in [0, S). num_sequences: S, or None to take max(sequence_ids_T) + 1 (a device-to-host sync).
    Returns () float32 (float64 for float64 probs).
    """
    probs_TE = _at_least_fp32(probs_TE)
    num_tokens, num_experts = probs_TE.shape
    top_k = experts_TK.shape[-1]
    if num_tokens == 0:
        return probs_TE.new_zeros(())
    if num_sequences is None:
        num_sequences = int(sequence_ids_T.max()) + 1  # NOTE: device-to-host sync
    tokens_S = torch.bincount(sequence_ids_T, minlength=num_sequences).to(probs_TE.dtype)
    # Per-(sequence, expert) choice counts and probability sums, via flat index s*E + e.
    seq_TK = sequence_ids_T[:, None].expand_as(experts_TK)
    valid = experts_TK >= 0
    flat = (seq_TK * num_experts + experts_TK)[valid]
    counts_SE = torch.bincount(flat, minlength=num_sequences * num_experts).view(num_sequences, num_experts)
    prob_sums_SE = probs_TE.new_zeros(num_sequences, num_experts).index_add(0, sequence_ids_T, probs_TE)
    present = tokens_S > 0
    f_SE = counts_SE[present].to(probs_TE.dtype) / (tokens_S[present, None] * top_k)
    p_SE = prob_sums_SE[present] / tokens_S[present, None]
    return num_experts * (f_SE * p_SE).sum(dim=-1).mean()


def switch_load_balancing_loss_reference(probs_TE: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
    """E * sum_i f_i P_i over the batch. probs_TE: (T, E) float; experts_TK: (T, K) int64. () float32 (or 64)."""
    probs_TE = _at_least_fp32(probs_TE)
    num_tokens, num_experts = probs_TE.shape
    if num_tokens == 0:
        return probs_TE.new_zeros(())
    valid = experts_TK >= 0
    f_E = torch.bincount(experts_TK[valid], minlength=num_experts).to(probs_TE.dtype) / experts_TK.numel()
    return num_experts * torch.dot(f_E, probs_TE.mean(dim=0))


def router_z_loss_reference(logits_TE: torch.Tensor) -> torch.Tensor:
    """mean_t logsumexp(logits_t)^2 in fp32. logits_TE: (T, E) float. () float32 (or 64)."""
    logits_TE = _at_least_fp32(logits_TE)
    if logits_TE.shape[0] == 0:
        return logits_TE.new_zeros(())
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


def _tile_configs() -> list[dict[str, int]]:
    # The candidates of every streaming (BLOCK_T, BLOCK_E)-tile kernel here (each pinned by its own
    # MOE_ENGINE_<OP>_CONFIG); the first one is the interpreter's.
    return [
        {"BLOCK_T": 16, "BLOCK_E": 32, "num_warps": 4},
        {"BLOCK_T": 32, "BLOCK_E": 64, "num_warps": 4},
        {"BLOCK_T": 32, "BLOCK_E": 128, "num_warps": 4},
        {"BLOCK_T": 64, "BLOCK_E": 128, "num_warps": 8},
        {"BLOCK_T": 16, "BLOCK_E": 256, "num_warps": 4},
        {"BLOCK_T": 128, "BLOCK_E": 64, "num_warps": 8},
    ]


# Shapes: probs (T, E) float, row stride stride_p; experts (T, K) int64 contiguous; seq (T,) int64
# (read if HAS_SEQ, else every token is in sequence 0); counts (S, E) int32, prob_sums (S, E) fp32,
# tokens (S,) int32, all zeroed beforehand. Grid: (cdiv(T, BLOCK_T), cdiv(E, BLOCK_E)).
def _prune_balance_stats_configs(configs, named_args, **kwargs):
    """With sequence ids every element of a tile may add to its own address (two pointer tiles live
    at once): tiles of 8192 elements spill 44-48 bytes on sm_90 with 8 warps (128 x 64 on triton
    3.6 and 3.9, 64 x 128 on 3.6; moe_engine.kernels.compile_check), so keep them to 4096."""
    if not kwargs.get("HAS_SEQ", named_args.get("HAS_SEQ")):
        return configs
    return [c for c in configs if c.kwargs["BLOCK_T"] * c.kwargs["BLOCK_E"] <= 4096] or configs[:1]


@_autotune("balance_stats", _tile_configs(), key=["num_experts", "HAS_SEQ"],
           reset_to_zero=["counts_ptr", "prob_sums_ptr", "tokens_ptr"], prune=_prune_balance_stats_configs)
def _balance_stats_kernel(
    probs_ptr, experts_ptr, seq_ptr, counts_ptr, prob_sums_ptr, tokens_ptr,
    num_tokens, num_experts, num_seqs, top_k, stride_p,
    HAS_SEQ: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    # counts[s, e] += #{(t, k) : seq_t = s, experts_tk = e};  prob_sums[s, e] += sum_{t: seq_t = s} probs_te;
    # tokens[s] += #{t : seq_t = s}. Tokens with an id outside [0, S) are skipped. When all of the
    # block's tokens share one sequence (always without HAS_SEQ; usual for packed sequences) the
    # block reduces first and adds once per expert; otherwise every element adds on its own.
    pid_e = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    row_ok = rows < num_tokens
    col_ok = cols < num_experts
    if HAS_SEQ:
        seq_ids = tl.load(seq_ptr + rows, mask=row_ok, other=-1)
        row_ok = row_ok & (seq_ids >= 0) & (seq_ids < num_seqs)
        # int32 from here (S * E is small): int64 offsets of a (BLOCK_T, BLOCK_E) tile made ptxas
        # spill 44 bytes at 128 x 64 (moe_engine.kernels.compile_check).
        seq = seq_ids.to(tl.int32)
    else:
        seq = tl.zeros((BLOCK_T,), tl.int32)
    tile_ok = row_ok[:, None] & col_ok[None, :]
    p = tl.load(probs_ptr + rows[:, None] * stride_p + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    hits = tl.zeros((BLOCK_T, BLOCK_E), tl.int32)
    for k in range(top_k):
        expert = tl.load(experts_ptr + rows * top_k + k, mask=row_ok, other=-1)
        hits += (expert[:, None] == cols[None, :]).to(tl.int32)
    seq_lo = tl.min(tl.where(row_ok, seq, num_seqs), axis=0)
    seq_hi = tl.max(tl.where(row_ok, seq, -1), axis=0)
    if seq_lo == seq_hi:
        base = seq_lo * num_experts
        tl.atomic_add(prob_sums_ptr + base + cols, tl.sum(p, axis=0), mask=col_ok, sem="relaxed")
        tl.atomic_add(counts_ptr + base + cols, tl.sum(hits, axis=0), mask=col_ok, sem="relaxed")
        if pid_e == 0:
            tl.atomic_add(tokens_ptr + seq_lo, tl.sum(row_ok.to(tl.int32), axis=0), sem="relaxed")
    elif seq_lo < seq_hi:
        offsets = seq[:, None] * num_experts + cols[None, :]
        tl.atomic_add(prob_sums_ptr + offsets, p, mask=tile_ok, sem="relaxed")
        tl.atomic_add(counts_ptr + offsets, hits, mask=tile_ok & (hits > 0), sem="relaxed")
        if pid_e == 0:
            tl.atomic_add(tokens_ptr + seq, tl.full((BLOCK_T,), 1, tl.int32), mask=row_ok, sem="relaxed")


# Shapes: counts (S, E) int32; prob_sums (S, E) fp32; tokens (S,) int32; coef (S,) fp32 out;
# loss () fp32 out. Grid: (1,): S*E is small (a few sequences of a batch times E).
@_jit
def _balance_finalize_kernel(
    counts_ptr, prob_sums_ptr, tokens_ptr, coef_ptr, loss_ptr, num_seqs, num_experts, top_k,
    BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr,
):
    # With n_s tokens in sequence s and S' sequences that have tokens:
    #   L = (1/S') sum_{s: n_s > 0} E/(K n_s^2) sum_e counts_se prob_sums_se
    # so dL/dprobs_te = coef_{s(t)} counts_{s(t),e} with coef_s = E / (K n_s^2 S'), stored for the backward.
    offs_s = tl.arange(0, BLOCK_S)
    present = tl.zeros((BLOCK_S,), tl.int32)
    for s0 in range(0, num_seqs, BLOCK_S):
        n = tl.load(tokens_ptr + s0 + offs_s, mask=s0 + offs_s < num_seqs, other=0)
        present += (n > 0).to(tl.int32)
    num_present = tl.maximum(tl.sum(present, axis=0), 1).to(tl.float32)
    total = tl.zeros((BLOCK_S,), tl.float32)
    for s0 in range(0, num_seqs, BLOCK_S):
        seqs = s0 + offs_s
        s_ok = seqs < num_seqs
        n = tl.load(tokens_ptr + seqs, mask=s_ok, other=0).to(tl.float32)
        dot = tl.zeros((BLOCK_S,), tl.float32)
        for e0 in range(0, num_experts, BLOCK_E):
            cols = e0 + tl.arange(0, BLOCK_E)
            ok = s_ok[:, None] & (cols < num_experts)[None, :]
            offsets = seqs[:, None].to(tl.int64) * num_experts + cols[None, :]
            c = tl.load(counts_ptr + offsets, mask=ok, other=0).to(tl.float32)
            dot += tl.sum(c * tl.load(prob_sums_ptr + offsets, mask=ok, other=0.0), axis=1)
        n_safe = tl.maximum(n, 1.0)
        scale = tl.where(n > 0, num_experts / (top_k * n_safe * n_safe), 0.0)
        total += scale * dot
        tl.store(coef_ptr + seqs, scale / num_present, mask=s_ok)
    tl.store(loss_ptr, tl.sum(total, axis=0) / num_present)


# Shapes: grad_loss () fp32; seq (T,) int64 (if HAS_SEQ); counts (S, E) int32; coef (S,) fp32;
# grad_probs (T, E) in the probs' dtype. Grid: (cdiv(T, BLOCK_T), cdiv(E, BLOCK_E)).
@_autotune("balance_backward", _tile_configs(), key=["num_experts", "HAS_SEQ"])
def _balance_backward_kernel(
    grad_loss_ptr, seq_ptr, counts_ptr, coef_ptr, grad_probs_ptr, num_tokens, num_experts, num_seqs,
    HAS_SEQ: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    # dL/dprobs_te = grad_loss * coef_{s(t)} * counts_{s(t), e}  (0 for tokens outside [0, S)).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    row_ok = rows < num_tokens
    col_ok = cols < num_experts
    if HAS_SEQ:
        seq = tl.load(seq_ptr + rows, mask=row_ok, other=-1)
        valid = row_ok & (seq >= 0) & (seq < num_seqs)
    else:
        seq = tl.zeros((BLOCK_T,), tl.int64)
        valid = row_ok
    coef = tl.load(coef_ptr + seq, mask=valid, other=0.0) * tl.load(grad_loss_ptr)
    c = tl.load(counts_ptr + seq[:, None] * num_experts + cols[None, :], mask=valid[:, None] & col_ok[None, :], other=0)
    grad = coef[:, None] * c.to(tl.float32)
    tl.store(grad_probs_ptr + rows[:, None] * num_experts + cols[None, :], grad.to(grad_probs_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# Shapes: logits (T, E) float, row stride stride_t; lse (T,) fp32 out; loss () fp32, zeroed
# beforehand. Grid: (cdiv(T, BLOCK_T),); E is looped over in BLOCK_E chunks (any E).
@_autotune("router_z_loss", _tile_configs(), key=["num_experts"], reset_to_zero=["loss_ptr"])
def _z_loss_kernel(logits_ptr, lse_ptr, loss_ptr, num_tokens, num_experts, stride_t, inv_num_tokens,
                   BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    # Online logsumexp over the chunks: m' = max(m, max_e x_e), s' = s e^(m - m') + sum_e e^(x_e - m');
    # lse = m + log s;  L = (1/T) sum_t lse_t^2.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < num_tokens
    row_max = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    exp_sum = tl.zeros((BLOCK_T,), tl.float32)
    for e0 in range(0, num_experts, BLOCK_E):
        cols = e0 + tl.arange(0, BLOCK_E)
        col_ok = cols < num_experts
        x = tl.load(logits_ptr + rows[:, None] * stride_t + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        x = tl.where(col_ok[None, :], x, float("-inf"))  # padding rows stay 0: finite, no NaN
        new_max = tl.maximum(row_max, tl.max(x, axis=1))
        exp_sum = exp_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(x - new_max[:, None]), axis=1)
        row_max = new_max
    lse = row_max + tl.log(exp_sum)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.atomic_add(loss_ptr, tl.sum(tl.where(row_ok, lse * lse, 0.0), axis=0) * inv_num_tokens, sem="relaxed")


# Shapes: grad_loss () fp32; logits (T, E), row stride stride_t; lse (T,) fp32; grad_logits (T, E)
# in the logits' dtype. Grid: (cdiv(T, BLOCK_T), cdiv(E, BLOCK_E)).
@_autotune("router_z_loss_backward", _tile_configs(), key=["num_experts"])
def _z_loss_backward_kernel(grad_loss_ptr, logits_ptr, lse_ptr, grad_logits_ptr, num_tokens, num_experts, stride_t,
                            inv_num_tokens, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    # dL/dx_te = (2 lse_t / T) dlse_t/dx_te = (2 lse_t / T) softmax(x_t)_e = (2 lse_t / T) e^(x_te - lse_t).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    tile_ok = (rows < num_tokens)[:, None] & (cols < num_experts)[None, :]
    x = tl.load(logits_ptr + rows[:, None] * stride_t + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=rows < num_tokens, other=0.0)
    coef = tl.load(grad_loss_ptr) * 2.0 * inv_num_tokens * lse
    grad = coef[:, None] * tl.exp(x - lse[:, None])
    tl.store(grad_logits_ptr + rows[:, None] * num_experts + cols[None, :], grad.to(grad_logits_ptr.dtype.element_ty),
             mask=tile_ok)


# Shapes: x (T, E) float, row stride stride_t; out (E,) fp32, zeroed beforehand.
# Grid: (cdiv(T, BLOCK_T), cdiv(E, BLOCK_E)).
# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _tile_grid(num_tokens: int, num_experts: int):
    return lambda meta: (triton.cdiv(num_tokens, meta["BLOCK_T"]), triton.cdiv(num_experts, meta["BLOCK_E"]))


def _check_matrix(name: str, x: torch.Tensor) -> torch.Tensor:
    """A 2-D floating tensor with unit column stride (what the kernels index)."""
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{name}: expected a 2-D floating tensor (T, E), got {x.dim()}-D {x.dtype}")
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_experts(experts_TK: torch.Tensor, num_tokens: int, device: torch.device) -> torch.Tensor:
    if experts_TK.dim() != 2 or experts_TK.shape[0] != num_tokens or experts_TK.dtype != torch.int64:
        raise ValueError(
            f"experts_TK: expected ({num_tokens}, K) int64, got {tuple(experts_TK.shape)} {experts_TK.dtype}"
        )
    if experts_TK.device != device:
        raise ValueError(f"experts_TK is on {experts_TK.device}, expected {device} like probs_TE")
    return experts_TK.contiguous()


def balance_loss_triton(
    probs_TE: torch.Tensor, experts_TK: torch.Tensor, sequence_ids_T: torch.Tensor | None, num_sequences: int,
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Switch loss (sequence_ids_T None, num_sequences 1) or sequence-level loss; no autograd.

    Returns (loss () fp32, counts_SE (S, E) int32, coef_S (S,) fp32), the last two for the backward.
    """
    probs_TE = _check_matrix("probs_TE", probs_TE)
    (num_tokens, num_experts), device = probs_TE.shape, probs_TE.device
    experts_TK = _check_experts(experts_TK, num_tokens, device)
    if num_sequences < 1:
        raise ValueError(f"num_sequences = {num_sequences}: expected >= 1")
    if sequence_ids_T is not None:
        ids = sequence_ids_T
        if ids.shape != (num_tokens,) or ids.dtype != torch.int64 or ids.device != device:
            raise ValueError(f"sequence_ids_T: expected ({num_tokens},) int64 on {device}, got "
                             f"{tuple(ids.shape)} {ids.dtype} on {ids.device}")
        sequence_ids_T = sequence_ids_T.contiguous()
    counts_SE = torch.zeros(num_sequences, num_experts, dtype=torch.int32, device=device)
    prob_sums_SE = torch.zeros(num_sequences, num_experts, dtype=torch.float32, device=device)
    tokens_S = torch.zeros(num_sequences, dtype=torch.int32, device=device)
    coef_S = torch.empty(num_sequences, dtype=torch.float32, device=device)
    loss = torch.empty((), dtype=torch.float32, device=device)
    if num_tokens and num_experts:
        seq = experts_TK if sequence_ids_T is None else sequence_ids_T  # any pointer when absent (never read)
        launch(_balance_stats_kernel, _tile_grid(num_tokens, num_experts), config, probs_TE, experts_TK, seq,
               counts_SE, prob_sums_SE, tokens_S, num_tokens, num_experts, num_sequences, experts_TK.shape[1],
               probs_TE.stride(0), HAS_SEQ=sequence_ids_T is not None)
    _balance_finalize_kernel[(1,)](counts_SE, prob_sums_SE, tokens_S, coef_S, loss, num_sequences, num_experts,
                                   max(experts_TK.shape[1], 1), BLOCK_S=16, BLOCK_E=64)
    return loss, counts_SE, coef_S


def balance_loss_backward_triton(
    grad_loss: torch.Tensor, sequence_ids_T: torch.Tensor | None, counts_SE: torch.Tensor, coef_S: torch.Tensor,
    num_tokens: int, dtype: torch.dtype, config: dict[str, int] | None = None,
) -> torch.Tensor:
    """grad_probs_TE (T, E) in `dtype` from the scalar gradient and the forward's counts_SE, coef_S."""
    num_sequences, num_experts = counts_SE.shape
    grad_probs_TE = torch.empty(num_tokens, num_experts, dtype=dtype, device=counts_SE.device)
    if num_tokens and num_experts:
        seq = coef_S if sequence_ids_T is None else sequence_ids_T.contiguous()
        launch(_balance_backward_kernel, _tile_grid(num_tokens, num_experts), config, grad_loss.float().contiguous(),
               seq, counts_SE, coef_S, grad_probs_TE, num_tokens, num_experts, num_sequences,
               HAS_SEQ=sequence_ids_T is not None)
    return grad_probs_TE


def switch_load_balancing_loss_triton(probs_TE: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
    """The Triton Switch loss, forward only (`switch_load_balancing_loss` adds autograd)."""
    return balance_loss_triton(probs_TE, experts_TK, None, 1)[0]


def sequence_load_balancing_loss_triton(
    probs_TE: torch.Tensor, experts_TK: torch.Tensor, sequence_ids_T: torch.Tensor, num_sequences: int
) -> torch.Tensor:
    """The Triton sequence-level loss, forward only. Tokens with ids outside [0, num_sequences) are skipped."""
    return balance_loss_triton(probs_TE, experts_TK, sequence_ids_T, num_sequences)[0]


def router_z_loss_triton(
    logits_TE: torch.Tensor, config: dict[str, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss () fp32, lse_T (T,) fp32), forward only."""
    logits_TE = _check_matrix("logits_TE", logits_TE)
    (num_tokens, num_experts), device = logits_TE.shape, logits_TE.device
    loss = torch.zeros((), dtype=torch.float32, device=device)
    lse_T = torch.empty(num_tokens, dtype=torch.float32, device=device)
    if num_tokens:
        if num_experts == 0:
            raise ValueError("logits_TE has E = 0 experts: expected >= 1")
        grid = lambda meta: (triton.cdiv(num_tokens, meta["BLOCK_T"]),)  # noqa: E731
        launch(_z_loss_kernel, grid, config, logits_TE, lse_T, loss, num_tokens, num_experts, logits_TE.stride(0),
               1.0 / num_tokens)
    return loss, lse_T


def router_z_loss_backward_triton(
    grad_loss: torch.Tensor, logits_TE: torch.Tensor, lse_T: torch.Tensor, config: dict[str, int] | None = None
) -> torch.Tensor:
    """grad_logits_TE (T, E) in logits_TE's dtype."""
    logits_TE = _check_matrix("logits_TE", logits_TE)
    num_tokens, num_experts = logits_TE.shape
    grad_TE = torch.empty(num_tokens, num_experts, dtype=logits_TE.dtype, device=logits_TE.device)
    if num_tokens and num_experts:
        launch(_z_loss_backward_kernel, _tile_grid(num_tokens, num_experts), config, grad_loss.float().contiguous(),
               logits_TE, lse_T.contiguous(), grad_TE, num_tokens, num_experts, logits_TE.stride(0), 1.0 / num_tokens)
    return grad_TE


# ---------------------------------------------------------------------------------------------
# Custom ops (what the Triton path runs, so torch.compile traces through it)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("moe_engine::balance_loss", mutates_args=())
def _balance_loss_op(probs_TE: torch.Tensor, experts_TK: torch.Tensor, sequence_ids_T: torch.Tensor | None,
                     num_sequences: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return balance_loss_triton(probs_TE, experts_TK, sequence_ids_T, num_sequences)


@_balance_loss_op.register_fake
def _(probs_TE, experts_TK, sequence_ids_T, num_sequences):
    return (probs_TE.new_empty((), dtype=torch.float32),
            probs_TE.new_empty(num_sequences, probs_TE.shape[1], dtype=torch.int32),
            probs_TE.new_empty(num_sequences, dtype=torch.float32))


@torch.library.custom_op("moe_engine::balance_loss_backward", mutates_args=())
def _balance_loss_backward_op(grad_loss: torch.Tensor, sequence_ids_T: torch.Tensor | None, counts_SE: torch.Tensor,
                              coef_S: torch.Tensor, num_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    return balance_loss_backward_triton(grad_loss, sequence_ids_T, counts_SE, coef_S, num_tokens, dtype)


@_balance_loss_backward_op.register_fake
def _(grad_loss, sequence_ids_T, counts_SE, coef_S, num_tokens, dtype):
    return counts_SE.new_empty(num_tokens, counts_SE.shape[1], dtype=dtype)


def _balance_setup_context(ctx, inputs, output) -> None:
    probs_TE, _, sequence_ids_T, _ = inputs
    ctx.save_for_backward(sequence_ids_T, output[1], output[2])
    ctx.num_tokens, ctx.dtype = probs_TE.shape[0], probs_TE.dtype


def _balance_autograd(ctx, grad_loss, grad_counts, grad_coef):
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    sequence_ids_T, counts_SE, coef_S = ctx.saved_tensors
    grad_probs_TE = torch.ops.moe_engine.balance_loss_backward(grad_loss, sequence_ids_T, counts_SE, coef_S,
                                                               ctx.num_tokens, ctx.dtype)
    return grad_probs_TE, None, None, None


_balance_loss_op.register_autograd(_balance_autograd, setup_context=_balance_setup_context)


@torch.library.custom_op("moe_engine::router_z_loss", mutates_args=())
def _z_loss_op(logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return router_z_loss_triton(logits_TE)


@_z_loss_op.register_fake
def _(logits_TE):
    return logits_TE.new_empty((), dtype=torch.float32), logits_TE.new_empty(logits_TE.shape[0], dtype=torch.float32)


@torch.library.custom_op("moe_engine::router_z_loss_backward", mutates_args=())
def _z_loss_backward_op(grad_loss: torch.Tensor, logits_TE: torch.Tensor, lse_T: torch.Tensor) -> torch.Tensor:
    return router_z_loss_backward_triton(grad_loss, logits_TE, lse_T)


@_z_loss_backward_op.register_fake
def _(grad_loss, logits_TE, lse_T):
    return torch.empty_like(logits_TE, memory_format=torch.contiguous_format)


def _z_loss_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0], output[1])


def _z_loss_autograd(ctx, grad_loss, grad_lse_T):
    if not ctx.needs_input_grad[0]:
        return None
    logits_TE, lse_T = ctx.saved_tensors
    grad_logits_TE = torch.ops.moe_engine.router_z_loss_backward(grad_loss, logits_TE, lse_T)
    if grad_lse_T is not None:  # lse is an output too: dlse/dx = softmax(x)
        grad_logits_TE = grad_logits_TE + (grad_lse_T[:, None] * torch.exp(logits_TE.float() - lse_T[:, None])).to(
            grad_logits_TE.dtype)
    return grad_logits_TE


_z_loss_op.register_autograd(_z_loss_autograd, setup_context=_z_loss_setup_context)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _use_triton(op: str, x: torch.Tensor) -> bool:
    return select_backend(op, x.device, has_triton=TRITON_AVAILABLE) == "triton"


def switch_load_balancing_loss(probs_TE: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
    """E * sum_i f_i P_i over the whole batch; gradient flows to probs_TE only.

    probs_TE: (T, E) float, rows summing to 1. experts_TK: (T, K) int64, -1 for dropped choices.
    Returns () float32. A uniform router gives 1.0; everything on one expert gives E.
    """
    if _use_triton("switch_load_balancing_loss", probs_TE):
        return torch.ops.moe_engine.balance_loss(probs_TE, experts_TK, None, 1)[0]
    return switch_load_balancing_loss_reference(probs_TE, experts_TK)


def sequence_load_balancing_loss(
    probs_TE: torch.Tensor, experts_TK: torch.Tensor, sequence_ids_T: torch.Tensor, num_sequences: int | None = None
) -> torch.Tensor:
    """The Switch loss within each sequence, averaged over the sequences that have tokens.

    probs_TE: (T, E) float; experts_TK: (T, K) int64; sequence_ids_T: (T,) int64 in [0, S).
    num_sequences: S, or None to take max(sequence_ids_T) + 1 (a device-to-host sync).
    Returns () float32.
    """
    if _use_triton("sequence_load_balancing_loss", probs_TE):
        if num_sequences is None:
            num_sequences = int(sequence_ids_T.max()) + 1 if sequence_ids_T.numel() else 1  # NOTE: device-to-host sync
        return torch.ops.moe_engine.balance_loss(probs_TE, experts_TK, sequence_ids_T, num_sequences)[0]
    return sequence_load_balancing_loss_reference(probs_TE, experts_TK, sequence_ids_T, num_sequences)


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """mean_t logsumexp(logits_t)^2 in fp32, which keeps router logits small (ST-MoE). () float32."""
    if _use_triton("router_z_loss", logits_TE):
        return torch.ops.moe_engine.router_z_loss(logits_TE)[0]
    return router_z_loss_reference(logits_TE)
