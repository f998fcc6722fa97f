"""Permute token rows into expert-grouped order and back (the dispatch/combine data movement).

Notation: T tokens, K choices per token, E experts, N rows after dispatch (T*K when dropless,
fewer when capacity dropped choices), C = T*K choices. A "choice" is the flat index t*K + k into
`experts_TK`; `row_of_choice_C` is the inverse of `choice_N` (row_of_choice_C[choice_N[n]] = n,
-1 for choices that got no row).

The choices sorted by expert come from `expert_order.py` (choice_N, tokens_per_expert_E).

- `permute`:   x_ND[n] = x_TD[choice_N[n] // K]                          (a gather)
- `unpermute`: y_TD[t] = sum over rows n of token t of weight[choice_N[n]] * y_ND[n]
               (a weighted sum, accumulated in fp32, fp64 for fp64 inputs)
- `gather_backward`: grad_x_MD[m] = sum over rows n with index_N[n] = m of grad_ND[n], for any
               gather index (the input gradient of a grouped GEMM that read x rows through one)

Each op has its pure-torch reference (`*_reference`), a Triton launcher (`*_triton`) and a public
function that picks one through `select_backend`. The Triton path runs as `moe_engine::*`
custom ops with fake kernels and autograd formulas, so `torch.compile` traces through it.

The combines are token-centric (one program gathers a token's K rows through `row_of_choice_C`,
or a source row's rows through a stable sort of the index): deterministic, no atomics. They need
`choice_N` to hold distinct choices, as `expert_order` makes it; the references also accept
repeated choices. Autotuned tiles can be pinned with
MOE_ENGINE_{PERMUTE,UNPERMUTE,UNPERMUTE_BACKWARD,GATHER_BACKWARD}_CONFIG (UNPERMUTE's kernel also
runs permute's backward); the launchers take `config=` to force one tile (tests, benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_engine.kernels._triton import TRITON_AVAILABLE, check_index, interpreting, launch, triton
from moe_engine.kernels._triton import autotune as _autotune
from moe_engine.kernels._triton import jit as _jit
from moe_engine.kernels.backend import select_backend

if TRITON_AVAILABLE:
    import triton.language as tl


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------


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


def gather_backward_reference(grad_ND: torch.Tensor, index_N: torch.Tensor, num_rows: int) -> torch.Tensor:
    """grad_ND: (N, D), index_N: (N,) int in [0, num_rows) -> grad_x (num_rows, D) in grad_ND's dtype,
    grad_x[m] = sum of grad_ND[n] over n with index_N[n] = m, accumulated in at least fp32."""
    acc_dtype = torch.promote_types(grad_ND.dtype, torch.float32)
    out = torch.zeros(num_rows, grad_ND.shape[-1], dtype=acc_dtype, device=grad_ND.device)
    return out.index_add_(0, index_N, grad_ND.to(acc_dtype)).to(grad_ND.dtype)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@_jit
def _round_to(x, dtype: tl.constexpr, EMULATE_RNE: tl.constexpr):
    # Cast the fp32/fp64 accumulator x to the output dtype, rounding to nearest even. Triton 3.9's
    # interpreter truncates fp32 -> bf16 instead (so a bf16 sum of 1 + 3 * 2^-9 comes out 1.0, not
    # 1.0078125); under it (EMULATE_RNE) round in the bits first: add 0x7FFF plus the lowest kept
    # bit, clear the 16 dropped bits, so the value is exact in bf16 and any cast keeps it. NaNs pass.
    if EMULATE_RNE and dtype == tl.bfloat16:
        x32 = x.to(tl.float32)
        bits = x32.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x32 != x32, x32, bits.to(tl.float32, bitcast=True))
    return x.to(dtype)


# Shapes: choice_N (N,) int; row_of_choice_C (C,) int32, filled with -1 beforehand. Grid: cdiv(N, BLOCK_N).
@_jit
def _invert_choice_kernel(choice_N_ptr, row_of_choice_C_ptr, N, C, BLOCK_N: tl.constexpr):
    # row_of_choice[choice_N[n]] = n; choices outside [0, C) are skipped rather than written out of bounds.
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    c_n = tl.load(choice_N_ptr + offs_n, mask=mask_n, other=-1)
    tl.store(row_of_choice_C_ptr + c_n, offs_n.to(tl.int32), mask=mask_n & (c_n >= 0) & (c_n < C))


def _permute_configs() -> list[dict[str, int]]:
    # A pure gather: one 16-byte vector per thread and row per tile is the goal (bf16: 8 elements,
    # so BLOCK_D = 8 * 32 * num_warps). The first (small) one is what the interpreter runs.
    return [
        {"BLOCK_R": 4, "BLOCK_D": 64, "num_warps": 4},
        {"BLOCK_R": 1, "BLOCK_D": 1024, "num_warps": 4},
        {"BLOCK_R": 1, "BLOCK_D": 2048, "num_warps": 8},
        {"BLOCK_R": 2, "BLOCK_D": 1024, "num_warps": 8},
        {"BLOCK_R": 4, "BLOCK_D": 512, "num_warps": 8},
        {"BLOCK_R": 8, "BLOCK_D": 256, "num_warps": 8},
        {"BLOCK_R": 4, "BLOCK_D": 1024, "num_warps": 8},
        {"BLOCK_R": 8, "BLOCK_D": 1024, "num_warps": 8},
        {"BLOCK_R": 1, "BLOCK_D": 512, "num_warps": 2},
    ]


# Shapes: x_TD (T, D), row stride stride_x; choice_N (N,) int; x_ND (N, D), row stride stride_out.
# Grid: (cdiv(N, BLOCK_R), cdiv(D, BLOCK_D)).
@_autotune("permute", _permute_configs(), key=["D"])
def _permute_kernel(x_TD_ptr, choice_N_ptr, x_ND_ptr, N, T, D, top_k, stride_x, stride_out,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # x_ND[n, d] = x_TD[choice_N[n] // K, d]. Its derivative, grad_x_TD[t] = sum over the rows n of
    # token t of grad_x_ND[n], is the unweighted `_combine_kernel`.
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_r = offs_r < N
    mask_d = offs_d < D
    token_r = tl.load(choice_N_ptr + offs_r, mask=mask_r, other=0) // top_k
    in_range = mask_r & (token_r >= 0) & (token_r < T)
    x = tl.load(x_TD_ptr + token_r.to(tl.int64)[:, None] * stride_x + offs_d[None, :],
                mask=in_range[:, None] & mask_d[None, :], other=0)
    tl.store(x_ND_ptr + offs_r[:, None] * stride_out + offs_d[None, :], x, mask=mask_r[:, None] & mask_d[None, :])


def _combine_configs() -> list[dict[str, int]]:
    # Each program reads K rows of BLOCK_T x BLOCK_D (bf16, K = 8: 8-32 KB) and writes one.
    return [
        {"BLOCK_T": 4, "BLOCK_D": 64, "num_warps": 4},
        {"BLOCK_T": 1, "BLOCK_D": 256, "num_warps": 4},
        {"BLOCK_T": 1, "BLOCK_D": 512, "num_warps": 4},
        {"BLOCK_T": 1, "BLOCK_D": 1024, "num_warps": 8},
        {"BLOCK_T": 2, "BLOCK_D": 512, "num_warps": 8},
        {"BLOCK_T": 2, "BLOCK_D": 1024, "num_warps": 8},
        {"BLOCK_T": 4, "BLOCK_D": 256, "num_warps": 8},
    ]


# Shapes: src_ND (N, D), row stride stride_src; row_of_choice_C (C,) int32, C = T*K; weights_C (C,)
# (the flat weights_TK; unused without HAS_WEIGHTS); out_TD (T, D), row stride stride_out.
# Grid: (cdiv(T, BLOCK_T), cdiv(D, BLOCK_D)).
@_autotune("unpermute", _combine_configs(), key=["D", "TOP_K"])
def _combine_kernel(src_ND_ptr, row_of_choice_C_ptr, weights_C_ptr, out_TD_ptr, T, D, stride_src, stride_out,
                    TOP_K: tl.constexpr, HAS_WEIGHTS: tl.constexpr, ACC_FP64: tl.constexpr, EMULATE_RNE: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # out[t, d] = sum_k [row(t,k) >= 0] w[t,k] * src[row(t,k), d], summed in fp32 (fp64 for fp64).
    # With weights it is unpermute's forward; without, permute's backward (w = 1):
    #   grad_x_TD[t] = sum_k grad_x_ND[row(t,k)], since d x_ND[n] / d x_TD[t] = [choice_N[n] // K = t].
    # The K rows are unrolled into one register accumulator, so no reduction crosses threads.
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_t = offs_t < T
    mask_d = offs_d < D
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float64 if ACC_FP64 else tl.float32)
    for k in tl.static_range(TOP_K):
        row_t = tl.load(row_of_choice_C_ptr + offs_t * TOP_K + k, mask=mask_t, other=-1)
        has_row = row_t >= 0
        src = tl.load(src_ND_ptr + row_t.to(tl.int64)[:, None] * stride_src + offs_d[None, :],
                      mask=has_row[:, None] & mask_d[None, :], other=0)
        src = src.to(tl.float64) if ACC_FP64 else src.to(tl.float32)
        if HAS_WEIGHTS:
            w_t = tl.load(weights_C_ptr + offs_t * TOP_K + k, mask=has_row, other=0)
            w_t = w_t.to(tl.float64) if ACC_FP64 else w_t.to(tl.float32)
            src = src * w_t[:, None]
        acc += src
    out = _round_to(acc, out_TD_ptr.dtype.element_ty, EMULATE_RNE)
    tl.store(out_TD_ptr + offs_t[:, None] * stride_out + offs_d[None, :], out, mask=mask_t[:, None] & mask_d[None, :])


def _unpermute_backward_configs() -> list[dict[str, int]]:
    # One program loops over all of D (the weight gradient is a full-row dot product).
    return [
        {"BLOCK_T": 4, "BLOCK_D": 64, "num_warps": 4},
        {"BLOCK_T": 1, "BLOCK_D": 256, "num_warps": 4},
        {"BLOCK_T": 1, "BLOCK_D": 512, "num_warps": 4},
        {"BLOCK_T": 1, "BLOCK_D": 1024, "num_warps": 8},
        {"BLOCK_T": 2, "BLOCK_D": 512, "num_warps": 8},
    ]


# fp32 elements per thread of the weight gradient's BLOCK_T x BLOCK_K x BLOCK_D accumulator (a y tile of
# the same size is live beside it): at 32 the K = 8 candidates all fit; at K = 64 (expert choice, K = E
# columns) every candidate is 4-16 times larger and the smallest spills 240 bytes on sm_90.
_UNPERMUTE_BACKWARD_ELEMENTS_PER_THREAD = 32


def _prune_unpermute_backward_configs(configs, named_args, **kwargs):
    """The candidates whose accumulator fits; where none does (large K), each candidate with BLOCK_T, then
    BLOCK_D (not below 32), halved until it fits."""
    block_k = kwargs["BLOCK_K"]

    def per_thread(block_t: int, block_d: int, num_warps: int) -> float:
        return block_t * block_k * block_d / (32 * num_warps)

    budget = _UNPERMUTE_BACKWARD_ELEMENTS_PER_THREAD
    kept = [c for c in configs if per_thread(c.kwargs["BLOCK_T"], c.kwargs["BLOCK_D"], c.num_warps) <= budget]
    if kept:
        return kept
    shrunk = {}
    for c in configs:
        block_t, block_d = c.kwargs["BLOCK_T"], c.kwargs["BLOCK_D"]
        while per_thread(block_t, block_d, c.num_warps) > budget and (block_t > 1 or block_d > 32):
            if block_t > 1:
                block_t //= 2
            else:
                block_d //= 2
        shrunk.setdefault((block_t, block_d, c.num_warps), triton.Config(
            {**c.kwargs, "BLOCK_T": block_t, "BLOCK_D": block_d}, num_warps=c.num_warps, num_stages=c.num_stages,
            pre_hook=c.pre_hook,
        ))
    return list(shrunk.values())


# Shapes: grad_y_TD (T, D), row stride stride_g; y_ND (N, D), row stride stride_y; row_of_choice_C
# (C,) int32; weights_C (C,); grad_y_ND (N, D), row stride stride_gy; grad_weights_C (C,).
# Grid: (cdiv(T, BLOCK_T),). BLOCK_K = next_pow2(K).
@_autotune("unpermute_backward", _unpermute_backward_configs(), key=["D", "top_k"],
           prune=_prune_unpermute_backward_configs)
def _unpermute_backward_kernel(grad_y_TD_ptr, y_ND_ptr, row_of_choice_C_ptr, weights_C_ptr, grad_y_ND_ptr,
                               grad_weights_C_ptr, T, D, top_k, stride_g, stride_y, stride_gy,
                               NEED_GRAD_Y: tl.constexpr, NEED_GRAD_W: tl.constexpr, ACC_FP64: tl.constexpr,
                               EMULATE_RNE: tl.constexpr,
                               BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    # From y_TD[t] = sum_k w[t,k] y_ND[row(t,k)] and g = dL/dy_TD:
    #   dL/dy_ND[row(t,k)] = w[t,k] * g[t]                (every row belongs to exactly one (t, k))
    #   dL/dw[t,k]         = sum_d y_ND[row(t,k), d] * g[t, d]   (0 where (t, k) has no row)
    offs_t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    mask_t = offs_t < T
    mask_tk = mask_t[:, None] & (offs_k[None, :] < top_k)
    choice_TK = offs_t[:, None] * top_k + offs_k[None, :]
    row_TK = tl.load(row_of_choice_C_ptr + choice_TK, mask=mask_tk, other=-1)
    has_row = row_TK >= 0
    row_TK = row_TK.to(tl.int64)
    w_TK = tl.load(weights_C_ptr + choice_TK, mask=has_row, other=0)
    w_TK = w_TK.to(tl.float64) if ACC_FP64 else w_TK.to(tl.float32)
    # The dot products accumulate elementwise and are reduced over D once, after the loop.
    acc_TKD = tl.zeros([BLOCK_T, BLOCK_K, BLOCK_D], dtype=tl.float64 if ACC_FP64 else tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        g_TD = tl.load(grad_y_TD_ptr + offs_t[:, None] * stride_g + offs_d[None, :],
                       mask=mask_t[:, None] & mask_d[None, :], other=0)
        g_TD = g_TD.to(tl.float64) if ACC_FP64 else g_TD.to(tl.float32)
        mask_rows = has_row[:, :, None] & mask_d[None, None, :]
        if NEED_GRAD_Y:
            grad_rows = w_TK[:, :, None] * g_TD[:, None, :]
            tl.store(grad_y_ND_ptr + row_TK[:, :, None] * stride_gy + offs_d[None, None, :],
                     _round_to(grad_rows, grad_y_ND_ptr.dtype.element_ty, EMULATE_RNE), mask=mask_rows)
        if NEED_GRAD_W:
            y = tl.load(y_ND_ptr + row_TK[:, :, None] * stride_y + offs_d[None, None, :], mask=mask_rows, other=0)
            y = y.to(tl.float64) if ACC_FP64 else y.to(tl.float32)
            acc_TKD += y * g_TD[:, None, :]
    if NEED_GRAD_W:
        grad_w_TK = _round_to(tl.sum(acc_TKD, axis=2), grad_weights_C_ptr.dtype.element_ty, EMULATE_RNE)
        tl.store(grad_weights_C_ptr + choice_TK, grad_w_TK, mask=mask_tk)


def _gather_backward_configs() -> list[dict[str, int]]:
    # Like the combine: BLOCK_M source rows, each summing its rows (K of them after a routing gather).
    return [
        {"BLOCK_M": 4, "BLOCK_D": 64, "num_warps": 4},
        {"BLOCK_M": 1, "BLOCK_D": 512, "num_warps": 4},
        {"BLOCK_M": 1, "BLOCK_D": 1024, "num_warps": 8},
        {"BLOCK_M": 2, "BLOCK_D": 1024, "num_warps": 8},
        {"BLOCK_M": 4, "BLOCK_D": 256, "num_warps": 8},
    ]


# Shapes: src_ND (N, D), row stride stride_src; order_N (N,) int64, the rows sorted by index
# (stable); starts_M1 (M + 1,) int64, source row m's rows are order_N[starts[m]:starts[m + 1]];
# out_MD (M, D), row stride stride_out. Grid: (cdiv(M, BLOCK_M), cdiv(D, BLOCK_D)).
@_autotune("gather_backward", _gather_backward_configs(), key=["D"])
def _gather_backward_kernel(src_ND_ptr, order_N_ptr, starts_M1_ptr, out_MD_ptr, M, D, stride_src, stride_out,
                            ACC_FP64: tl.constexpr, EMULATE_RNE: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # out[m, d] = sum_j src[order[starts[m] + j], d], j < count[m], in increasing row order: the
    # same sum in the same order on every run and GPU (index_add_ on CUDA adds atomically instead).
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_m = offs_m < M
    mask_d = offs_d < D
    start = tl.load(starts_M1_ptr + offs_m, mask=mask_m, other=0)
    count = tl.load(starts_M1_ptr + offs_m + 1, mask=mask_m, other=0) - start
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float64 if ACC_FP64 else tl.float32)
    for j in range(0, tl.max(count, axis=0)):
        has = count > j
        row = tl.load(order_N_ptr + start + j, mask=has, other=0)
        src = tl.load(src_ND_ptr + row[:, None] * stride_src + offs_d[None, :], mask=has[:, None] & mask_d[None, :], other=0)
        acc += src.to(tl.float64) if ACC_FP64 else src.to(tl.float32)
    out = _round_to(acc, out_MD_ptr.dtype.element_ty, EMULATE_RNE)
    tl.store(out_MD_ptr + offs_m[:, None] * stride_out + offs_d[None, :], out, mask=mask_m[:, None] & mask_d[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _check_rows(name: str, x: torch.Tensor) -> torch.Tensor:
    """A 2-D floating tensor with unit column stride (what the kernels index)."""
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{name}: expected a 2-D floating tensor, got {x.dim()}-D {x.dtype}")
    return x if x.stride(-1) == 1 else x.contiguous()


def invert_choice_triton(choice_N: torch.Tensor, num_choices: int) -> torch.Tensor:
    """The inverse map of choice_N: (C,) int32 with row_of_choice_C[choice_N[n]] = n, -1 elsewhere."""
    check_index("choice_N", choice_N, 1, choice_N.device)
    choice_N = choice_N.contiguous()
    row_of_choice_C = torch.full((num_choices,), -1, dtype=torch.int32, device=choice_N.device)
    if choice_N.numel():
        block = 1024
        _invert_choice_kernel[(triton.cdiv(choice_N.numel(), block),)](
            choice_N, row_of_choice_C, choice_N.numel(), num_choices, BLOCK_N=block
        )
    return row_of_choice_C


def permute_triton(
    x_TD: torch.Tensor, choice_N: torch.Tensor, top_k: int, config: dict[str, int] | None = None
) -> torch.Tensor:
    """Triton `permute`: x_TD (T, D) -> x_ND (N, D), no autograd (the custom op adds it)."""
    x_TD = _check_rows("x_TD", x_TD)
    check_index("choice_N", choice_N, 1, x_TD.device)
    if top_k < 1:
        raise ValueError(f"top_k = {top_k}: expected >= 1")
    (num_tokens, width), num_rows = x_TD.shape, choice_N.numel()
    x_ND = torch.empty(num_rows, width, dtype=x_TD.dtype, device=x_TD.device)
    if num_rows and width:
        grid = lambda meta: (triton.cdiv(num_rows, meta["BLOCK_R"]), triton.cdiv(width, meta["BLOCK_D"]))  # noqa: E731
        launch(_permute_kernel, grid, config, x_TD, choice_N.contiguous(), x_ND, num_rows, num_tokens, width, top_k,
               x_TD.stride(0), x_ND.stride(0))
    return x_ND


def _combine(src_ND, row_of_choice_C, weights_C, num_tokens, top_k, out_dtype, config) -> torch.Tensor:
    width = src_ND.shape[1]
    out_TD = torch.empty(num_tokens, width, dtype=out_dtype, device=src_ND.device)
    if num_tokens and width:
        def grid(meta):
            return triton.cdiv(num_tokens, meta["BLOCK_T"]), triton.cdiv(width, meta["BLOCK_D"])

        weights_or_unused = row_of_choice_C if weights_C is None else weights_C
        launch(_combine_kernel, grid, config, src_ND, row_of_choice_C, weights_or_unused,
               out_TD, num_tokens, width, src_ND.stride(0), out_TD.stride(0), TOP_K=top_k,
               HAS_WEIGHTS=weights_C is not None, ACC_FP64=src_ND.dtype == torch.float64, EMULATE_RNE=interpreting())
    return out_TD


def permute_backward_triton(
    grad_x_ND: torch.Tensor, choice_N: torch.Tensor, num_tokens: int, top_k: int, config: dict[str, int] | None = None
) -> torch.Tensor:
    """grad_x_TD[t] = sum over the rows n of token t of grad_x_ND[n], summed in fp32: (T, D) in grad_x_ND's dtype."""
    grad_x_ND = _check_rows("grad_x_ND", grad_x_ND)
    check_index("choice_N", choice_N, 1, grad_x_ND.device)
    if choice_N.numel() != grad_x_ND.shape[0]:
        raise ValueError(f"choice_N has {choice_N.numel()} rows, grad_x_ND {grad_x_ND.shape[0]}: expected equal")
    row_of_choice_C = invert_choice_triton(choice_N, num_tokens * top_k)
    return _combine(grad_x_ND, row_of_choice_C, None, num_tokens, top_k, grad_x_ND.dtype, config)


def gather_backward_triton(
    grad_ND: torch.Tensor, index_N: torch.Tensor, num_rows: int, config: dict[str, int] | None = None
) -> torch.Tensor:
    """Triton `gather_backward`: grad_x (num_rows, D) in grad_ND's dtype, each row the fp32 sum of the
    rows that gathered it, in row order (deterministic). No autograd; no device-to-host sync."""
    grad_ND = _check_rows("grad_ND", grad_ND)
    check_index("index_N", index_N, 1, grad_ND.device)
    if index_N.numel() != grad_ND.shape[0]:
        raise ValueError(f"index_N has {index_N.numel()} rows, grad_ND {grad_ND.shape[0]}: expected equal")
    if num_rows < 0:
        raise ValueError(f"num_rows = {num_rows}: expected >= 0")
    width = grad_ND.shape[1]
    out_MD = torch.empty(num_rows, width, dtype=grad_ND.dtype, device=grad_ND.device)
    if num_rows == 0 or width == 0:
        return out_MD
    sorted_N, order_N = torch.sort(index_N, stable=True)
    # starts[m] = number of rows with index < m; indices outside [0, num_rows) fall outside every segment.
    starts_M1 = torch.searchsorted(sorted_N, torch.arange(num_rows + 1, device=grad_ND.device, dtype=sorted_N.dtype))

    def grid(meta):
        return triton.cdiv(num_rows, meta["BLOCK_M"]), triton.cdiv(width, meta["BLOCK_D"])

    launch(_gather_backward_kernel, grid, config, grad_ND, order_N, starts_M1, out_MD, num_rows, width,
           grad_ND.stride(0), out_MD.stride(0), ACC_FP64=grad_ND.dtype == torch.float64, EMULATE_RNE=interpreting())
    return out_MD


def _check_choices_and_weights(choice_N: torch.Tensor, num_rows: int, weights_TK: torch.Tensor, num_tokens: int,
                               device: torch.device) -> None:
    check_index("choice_N", choice_N, 1, device)
    if choice_N.numel() != num_rows:
        raise ValueError(f"choice_N has {choice_N.numel()} rows, the data {num_rows}: expected equal")
    if weights_TK.dim() != 2 or not weights_TK.is_floating_point() or weights_TK.device != device:
        raise ValueError(f"weights_TK: expected a 2-D floating tensor on {device}, got {weights_TK.dim()}-D "
                         f"{weights_TK.dtype} on {weights_TK.device}")
    if weights_TK.shape[0] != num_tokens or weights_TK.shape[1] < 1:
        raise ValueError(f"weights_TK has shape {tuple(weights_TK.shape)}: expected ({num_tokens}, K >= 1) "
                         f"for num_tokens = {num_tokens}")


def unpermute_triton(
    y_ND: torch.Tensor, choice_N: torch.Tensor, weights_TK: torch.Tensor, num_tokens: int,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Triton `unpermute`: y_TD[t] = sum_k w[t,k] y_ND[row(t,k)] in fp32 (fp64), (T, D) in y_ND's dtype."""
    y_ND = _check_rows("y_ND", y_ND)
    _check_choices_and_weights(choice_N, y_ND.shape[0], weights_TK, num_tokens, y_ND.device)
    top_k = weights_TK.shape[1]
    row_of_choice_C = invert_choice_triton(choice_N, num_tokens * top_k)
    return _combine(y_ND, row_of_choice_C, weights_TK.contiguous(), num_tokens, top_k, y_ND.dtype, config)


def unpermute_backward_triton(
    grad_y_TD: torch.Tensor, y_ND: torch.Tensor, choice_N: torch.Tensor, weights_TK: torch.Tensor,
    need_grad_y: bool = True, need_grad_weights: bool = True, config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of `unpermute` for grad_y_TD (T, D).

    Returns grad_y_ND (N, D) in grad_y_TD's dtype and grad_weights_TK (T, K) in weights_TK's
    dtype; a gradient not asked for comes back as a (0,) tensor. y_ND (N, D) is only read for the
    weight gradient: without it, pass any 2-D tensor of width D (e.g. (0, D)).
    """
    grad_y_TD, y_ND = _check_rows("grad_y_TD", grad_y_TD), _check_rows("y_ND", y_ND)
    num_tokens, width = grad_y_TD.shape
    num_rows = y_ND.shape[0] if need_grad_weights else choice_N.numel()
    _check_choices_and_weights(choice_N, num_rows, weights_TK, num_tokens, grad_y_TD.device)
    if y_ND.shape[1] != width:
        raise ValueError(f"y_ND has width {y_ND.shape[1]}, grad_y_TD {width}: expected equal")
    top_k = weights_TK.shape[1]
    grad_y_ND = torch.empty((num_rows, width) if need_grad_y else (0,), dtype=grad_y_TD.dtype, device=grad_y_TD.device)
    grad_weights_TK = torch.zeros(weights_TK.shape if need_grad_weights else (0,), dtype=weights_TK.dtype,
                                  device=grad_y_TD.device)
    if num_tokens and width and (need_grad_y or need_grad_weights):
        row_of_choice_C = invert_choice_triton(choice_N, num_tokens * top_k)
        grid = lambda meta: (triton.cdiv(num_tokens, meta["BLOCK_T"]),)  # noqa: E731
        launch(_unpermute_backward_kernel, grid, config, grad_y_TD, y_ND, row_of_choice_C, weights_TK.contiguous(),
               grad_y_ND, grad_weights_TK, num_tokens, width, top_k, grad_y_TD.stride(0), y_ND.stride(0), width,
               NEED_GRAD_Y=need_grad_y, NEED_GRAD_W=need_grad_weights,
               ACC_FP64=grad_y_TD.dtype == torch.float64, EMULATE_RNE=interpreting(),
               BLOCK_K=triton.next_power_of_2(top_k))
    return grad_y_ND, grad_weights_TK


# ---------------------------------------------------------------------------------------------
# Custom ops (what the Triton path runs, so torch.compile traces through it)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("moe_engine::permute", mutates_args=())
def _permute_op(x_TD: torch.Tensor, choice_N: torch.Tensor, top_k: int) -> torch.Tensor:
    return permute_triton(x_TD, choice_N, top_k)


@_permute_op.register_fake
def _(x_TD, choice_N, top_k):
    return x_TD.new_empty(choice_N.shape[0], x_TD.shape[1])


@torch.library.custom_op("moe_engine::permute_backward", mutates_args=())
def _permute_backward_op(grad_x_ND: torch.Tensor, choice_N: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    return permute_backward_triton(grad_x_ND, choice_N, num_tokens, top_k)


@_permute_backward_op.register_fake
def _(grad_x_ND, choice_N, num_tokens, top_k):
    return grad_x_ND.new_empty(num_tokens, grad_x_ND.shape[1])


def _permute_setup_context(ctx, inputs, output) -> None:
    x_TD, choice_N, top_k = inputs
    ctx.save_for_backward(choice_N)
    ctx.num_tokens, ctx.top_k = x_TD.shape[0], top_k


def _permute_autograd(ctx, grad_x_ND):
    if not ctx.needs_input_grad[0]:
        return None, None, None
    (choice_N,) = ctx.saved_tensors
    return torch.ops.moe_engine.permute_backward(grad_x_ND, choice_N, ctx.num_tokens, ctx.top_k), None, None


_permute_op.register_autograd(_permute_autograd, setup_context=_permute_setup_context)


@torch.library.custom_op("moe_engine::unpermute", mutates_args=())
def _unpermute_op(
    y_ND: torch.Tensor, choice_N: torch.Tensor, weights_TK: torch.Tensor, num_tokens: int
) -> torch.Tensor:
    return unpermute_triton(y_ND, choice_N, weights_TK, num_tokens)


@_unpermute_op.register_fake
def _(y_ND, choice_N, weights_TK, num_tokens):
    return y_ND.new_empty(num_tokens, y_ND.shape[1])


@torch.library.custom_op("moe_engine::unpermute_backward", mutates_args=())
def _unpermute_backward_op(
    grad_y_TD: torch.Tensor, y_ND: torch.Tensor, choice_N: torch.Tensor, weights_TK: torch.Tensor,
    need_grad_y: bool, need_grad_weights: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return unpermute_backward_triton(grad_y_TD, y_ND, choice_N, weights_TK, need_grad_y, need_grad_weights)


@_unpermute_backward_op.register_fake
def _(grad_y_TD, y_ND, choice_N, weights_TK, need_grad_y, need_grad_weights):
    return (grad_y_TD.new_empty((choice_N.shape[0], grad_y_TD.shape[1]) if need_grad_y else (0,)),
            weights_TK.new_empty(weights_TK.shape if need_grad_weights else (0,)))


def _unpermute_setup_context(ctx, inputs, output) -> None:
    y_ND, choice_N, weights_TK, _ = inputs
    need_w = ctx.needs_input_grad[2]
    # y_ND is only read for the weight gradient: keep it alive only then.
    ctx.save_for_backward(y_ND if need_w else None, choice_N, weights_TK)


def _unpermute_autograd(ctx, grad_y_TD):
    need_y, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    if not (need_y or need_w):
        return None, None, None, None
    y_ND, choice_N, weights_TK = ctx.saved_tensors
    if y_ND is None:  # not read without the weight gradient
        y_ND = grad_y_TD.new_empty(0, grad_y_TD.shape[1])
    grad_y_ND, grad_weights_TK = torch.ops.moe_engine.unpermute_backward(
        grad_y_TD, y_ND, choice_N, weights_TK, need_y, need_w
    )
    return grad_y_ND if need_y else None, None, grad_weights_TK if need_w else None, None


_unpermute_op.register_autograd(_unpermute_autograd, setup_context=_unpermute_setup_context)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def permute(x_TD: torch.Tensor, choice_N: torch.Tensor, top_k: int) -> torch.Tensor:
    """x_TD: (T, D) -> x_ND: (N, D); see `permute_reference`."""
    if select_backend("permute", x_TD.device, has_triton=TRITON_AVAILABLE) == "triton":
        return torch.ops.moe_engine.permute(x_TD, choice_N, top_k)
    return permute_reference(x_TD, choice_N, top_k)


def unpermute(y_ND: torch.Tensor, choice_N: torch.Tensor, weights_TK: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """y_ND: (N, D) -> y_TD: (T, D) in y_ND's dtype; see `unpermute_reference`."""
    if select_backend("unpermute", y_ND.device, has_triton=TRITON_AVAILABLE) == "triton":
        return torch.ops.moe_engine.unpermute(y_ND, choice_N, weights_TK, num_tokens)
    return unpermute_reference(y_ND, choice_N, weights_TK, num_tokens)


@dataclass(frozen=True)
class GatheredRows:
    """The rows x_TD[choice_N // top_k] of a permute not performed yet.

    A dispatcher hands this to experts that can fuse the gather into their first GEMM (the
    Triton grouped MLP reads x_TD through the index, so the (N, D) permuted copy never exists);
    any other consumer calls `materialize()`, which is exactly `permute`.
    """

    x_TD: torch.Tensor
    choice_N: torch.Tensor
    top_k: int

    @property
    def index_N(self) -> torch.Tensor:
        """(N,) int64: the token row each dispatched row reads."""
        return self.choice_N // self.top_k

    def materialize(self) -> torch.Tensor:
        return permute(self.x_TD, self.choice_N, self.top_k)
