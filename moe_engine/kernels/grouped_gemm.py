"""Grouped GEMM over rows grouped by expert: y_NO[n] = x_NI[n] @ w_EOI[e(n)]^T.

Rows arrive sorted by expert, `tokens_per_expert_E[e]` of them for expert e (0 allowed); expert e
owns rows [offset_e, offset_e + tokens_e), offset = exclusive cumsum. Weights use nn.Linear's
(out, in) layout per expert, as Hugging Face MoE checkpoints do.

Torch implementations:
- `grouped_linear_loop`: one matmul per expert; the readable reference every other path is
  tested against. Needs the group sizes on the host (one device-to-host sync).
- `torch_grouped_mm.grouped_linear_grouped_mm`: `torch._grouped_mm` (CUTLASS on CUDA), one call,
  no host sync, where this torch supports it.
- `grouped_gemm_reference`: the loop, with the optional gather.

Triton implementation (custom op `moe_engine::grouped_gemm`, so torch.compile traces through):
- `grouped_gemm(x, w, tokens_per_expert_E, gather_index_N=None)`: y[n] = x[g(n)] @ w[e(n)]^T,
  g(n) = gather_index_N[n] (or n): the A operand is read through the index, so the permuted
  copy of x never exists (the layer's up-projection reads x_TD rows through choice_N // K).
- The kernel's epilogues serve the expert MLP built on it (`grouped_mlp.py`: the activation in
  the up-projection, its backward in the backward GEMM) and the MLP fused with the weighted
  combine (`mlp_combine.py`: the routing score in the down-projection, its gradient, HAS_SCORE
  below, in the backward GEMM); `_launch_gemm` is the launcher those files share.
- Weight tiles: pointer loads (cp.async-pipelined on Hopper), or with MOE_ENGINE_GEMM_TMA=1 also
  candidates that read them through a host TMA descriptor of the 3-D weight (K-major for the
  forward's transposed view, N-major for dX), each box one expert's (E = 1) slice so the reduction
  edge reads zeros. Opt-in until a GPU run shows the autotuner picking them and the GPU tests pass.
- Backward: dX reuses the forward kernel on the weight's transposed view; dW[e] = dy_e^T @ x_e
  is its own kernel tiled over (O-tile, I-tile, expert) looping over the expert's rows (experts
  with no rows get zeros). With a gather, dX is computed per row and each source row sums its
  rows in fp32, in row order (`permute.gather_backward_triton`: deterministic, no atomics).
"""

from __future__ import annotations

from typing import Optional

import torch

from moe_engine.kernels._triton import (
    TRITON_AVAILABLE, autotune, env_switch, interpreting, pinned_config, triton, upcast_dot_operands,
)
from moe_engine.kernels.backend import select_backend
from moe_engine.kernels.permute import gather_backward_triton

if TRITON_AVAILABLE:
    import triton.language as tl

try:  # host-side TMA descriptors (triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton or none: the pointer-load candidates only
    TensorDescriptor = None

# Output columns per partial sum of the backward's score dot (the smallest BLOCK_N of any candidate).
SCORE_SLOT = 64
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def grouped_linear_loop(x_NI: torch.Tensor, w_EOI: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
    """x_NI: (N, I), w_EOI: (E, O, I), tokens_per_expert_E: (E,) int, summing to N. Returns (N, O)."""
    sizes = tokens_per_expert_E.tolist()  # NOTE: device-to-host sync
    outputs = [x @ w_EOI[e].t() for e, x in enumerate(torch.split(x_NI, sizes, dim=0))]
    if not outputs:
        return x_NI.new_empty(0, w_EOI.shape[1])
    return torch.cat(outputs, dim=0)


def triton_unsupported_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the Triton grouped GEMM cannot run on `device` in `dtype`, or None if it can."""
    if not TRITON_AVAILABLE:
        return "triton is not installed"
    if device.type != "cuda" and not interpreting():
        return f"Triton kernels run on CUDA, or on CPU under TRITON_INTERPRET=1; got {device.type}"
    if dtype not in TRITON_DTYPES:
        return f"the Triton grouped GEMM takes {', '.join(map(str, TRITON_DTYPES))}, got {dtype}"
    return None


# References

def grouped_gemm_reference(
    x: torch.Tensor, w_EOI: torch.Tensor, tokens_per_expert_E: torch.Tensor, gather_index_N: torch.Tensor | None = None
) -> torch.Tensor:
    """y_NO[n] = x[g(n)] @ w_EOI[e(n)]^T with g = gather_index_N, or the identity when None."""
    x_NI = x if gather_index_N is None else x.index_select(0, gather_index_N)
    return grouped_linear_loop(x_NI, w_EOI, tokens_per_expert_E)


# Kernels

def _grouped_gemm_configs() -> list[dict[str, int]]:
    """Candidates of `_grouped_gemm_kernel`; the first (small) one is what the interpreter runs.

    B_TMA=1: the weight tiles come through a TMA tensor descriptor instead of pointer loads
    (Hopper and newer; opt-in with MOE_ENGINE_GEMM_TMA=1 until measured on a GPU, see `_prune_gemm_configs`).
    """
    small = [dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, B_TMA=0, num_warps=4, num_stages=3)]
    tiles = [
        (64, 128, 64, 4, 4), (64, 128, 64, 8, 4), (128, 64, 64, 8, 4), (128, 128, 32, 4, 4), (128, 128, 64, 4, 3),
        (128, 128, 64, 8, 3), (64, 256, 64, 8, 3), (128, 256, 64, 8, 3), (128, 256, 32, 8, 4),
    ]
    return small + [
        dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, B_TMA=tma, num_warps=w, num_stages=s)
        for tma in (0, 1) for bm, bn, bk, w, s in tiles
    ]


GEMM_TMA_ENV_VAR = "MOE_ENGINE_GEMM_TMA"


def gemm_tma_enabled() -> bool:
    """MOE_ENGINE_GEMM_TMA=1 adds the TMA weight-load candidates to the grouped GEMM's autotuning."""
    return env_switch(GEMM_TMA_ENV_VAR, False, "pointer loads only", "also TMA candidates")


def _set_weight_block(nargs) -> None:
    """Config pre-hook: give the weight descriptor the config's tile (a [1, rows, cols] box of the 3-D weight)."""
    desc = nargs["w_desc"]
    if nargs.get("B_TMA") and isinstance(desc, TensorDescriptor):
        rows, cols = (nargs["BLOCK_N"], nargs["BLOCK_K"]) if nargs["B_KMAJOR"] else (nargs["BLOCK_K"], nargs["BLOCK_N"])
        desc.block_shape = [1, rows, cols]


def _grouped_gemm_dw_configs() -> list[dict[str, int]]:
    """Candidates of `_grouped_gemm_dw_kernel` (BLOCK_K runs over rows of one expert)."""
    small = [dict(BLOCK_O=64, BLOCK_I=64, BLOCK_K=32, GROUP_O=8, num_warps=4, num_stages=3)]
    return small + [
        dict(BLOCK_O=bo, BLOCK_I=bi, BLOCK_K=bk, GROUP_O=8, num_warps=w, num_stages=s)
        for bo, bi, bk, w, s in [
            (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 32, 4, 4), (128, 128, 64, 8, 3),
            (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
        ]
    ]


def _prune_gemm_configs(configs, named_args, **kwargs):
    """Drop configs that spill registers (seen in ptxas output for sm_90) or are far wider than O.

    Accumulator elements per thread, BLOCK_M * BLOCK_N / (32 * num_warps): at most 128 for one
    accumulator, 64 for SwiGLU's two and for GELU (erf and the stored h tile), 32 for the backward
    epilogues (acc, h tiles and their derivatives live at once). `python -m
    moe_engine.kernels.compile_check` shows the spills: GELU at 128 spilled 72-216 bytes on sm_90
    with triton 3.6 and 3.9.
    """
    args = {**named_args, **kwargs}
    per_thread = {"swiglu": 64, "gelu": 64, "swiglu_bwd": 32, "gelu_bwd": 32}.get(args.get("EPILOGUE"), 128)
    max_n = max(64, triton.next_power_of_2(int(args.get("O", 256))))
    # TMA candidates only where asked for and where the weight has a descriptor (see `_weight_descriptor`).
    tma = gemm_tma_enabled() and isinstance(args.get("w_desc"), TensorDescriptor)
    kept = [
        c for c in configs
        if c.kwargs["BLOCK_N"] <= max_n and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= per_thread * 32 * c.num_warps
        and (tma or not c.kwargs.get("B_TMA"))
    ]
    return kept or [c for c in configs if not c.kwargs.get("B_TMA")][:1]


if TRITON_AVAILABLE:
    # A global a kernel may read (compiled Triton takes module globals only as constexpr objects).
    _SCORE_SLOT_C = tl.constexpr(SCORE_SLOT)

    @triton.jit
    def _dot(a, b, acc, UPCAST_DOT: tl.constexpr, IEEE_DOT: tl.constexpr):
        # UPCAST_DOT: the interpreter's bf16 tl.dot is wrong (DESIGN.md). IEEE_DOT: fp32 inputs get
        # a true fp32 product, as torch's matmul gives by default, not tf32.
        if UPCAST_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE_DOT:
            return tl.dot(a, b, acc, input_precision="ieee")
        return tl.dot(a, b, acc)

    @triton.jit
    def _expert_rows(tokens_ptr, e, E, BLOCK_E: tl.constexpr):
        """[start, end) of expert e's rows: the exclusive / inclusive cumsum of the counts at e."""
        offs_e = tl.arange(0, BLOCK_E)
        counts = tl.load(tokens_ptr + offs_e, mask=offs_e < E, other=0).to(tl.int32)
        ends = tl.cumsum(counts, 0)
        here = offs_e == e
        return tl.sum(tl.where(here, ends - counts, 0), 0), tl.sum(tl.where(here, ends, 0), 0)

    @triton.jit
    def _store_row_partial(ptr, rows64, row_ok, pid_n, part, stride, num_slots, SLOTS: tl.constexpr):
        """ptr[row, pid_n * SLOTS] = part[row], zeros in the tile's SLOTS - 1 other slots (those < num_slots)."""
        offs = tl.arange(0, SLOTS)
        slot = pid_n * SLOTS + offs
        vals = tl.where(offs[None, :] == 0, part[:, None], 0.0)
        tl.store(ptr + rows64[:, None] * stride + slot[None, :], vals, mask=row_ok[:, None] & (slot < num_slots)[None, :])

    # Grouped GEMM with a fused epilogue. Shapes (N rows, E experts, K_DIM reduction width, O output columns):
    #   x_ptr       (M_x, K_DIM) A operand; row n reads x[gather[n]] if HAS_GATHER else x[n]
    #   gather_ptr  (N,) int64 source rows (HAS_GATHER only)
    #   w_ptr       B_e[k, o] = w[e * stride_we + k * stride_wk + o * stride_wo]: a strided (E, K_DIM, O)
    #               view, so y = x @ w[e]^T (forward) and dX = dy @ w[e] (backward) are the same kernel.
    #               "swiglu": the up half's columns lie O further on (B_e[k, O + o]).
    #   tokens_ptr  (E,) int rows per expert, summing to N
    #   y_ptr       (N, O) output: y, act, or for "*_bwd" dh (N, H) (H = 2O for swiglu, O for gelu)
    #   h_ptr       (N, H) pre-activation: written by "swiglu"/"gelu" when STORE_H, read by "*_bwd"
    #   act_ptr     (N, O) "*_bwd" only: the activation recomputed from h, for the caller's dW_out
    #   score_ptr   (N,) fp32 "*_bwd" with HAS_SCORE only: the routing weight s_n of each row
    #   dscore_ptr  (N, NUM_SLOTS) fp32 with STORE_DSCORE only: partial sums of the row dot
    #               <acc_n, act_n> (acc unweighted), one per SCORE_SLOT output columns; a program
    #               writes its tile's sum in its first slot and zeros in the others, so every
    #               config fills every slot and the caller's row sum is the whole dot
    # Work items: M-tiles of each expert (cdiv(tokens_e, BLOCK_M), counted in-kernel from tokens_ptr,
    # no host sync) times N-tiles; the grid is an upper bound, cdiv(N, BLOCK_M) + E M-tiles, and
    # spare programs return. Group-M order keeps one expert's weight tile in L2 across M-tiles.
    # Epilogues, with acc = A @ B_e (fp32):
    #   "none":   y = acc
    #   "swiglu": g = acc, u = acc_up; h = [g | u]; y = silu(g) * u, silu(g) = g * sigmoid(g)
    #   "gelu":   h = acc; y = gelu(acc) = acc * Phi(acc), Phi(a) = (1 + erf(a / sqrt 2)) / 2
    #   "swiglu_bwd": acc = d_act; dg = d_act * u * silu'(g), silu'(g) = s * (1 + g * (1 - s)), s = sigmoid(g);
    #                 du = d_act * silu(g); dh = [dg | du]; act = silu(g) * u
    #   "gelu_bwd":   dh = d_act * gelu'(a), gelu'(a) = Phi(a) + a * exp(-a^2 / 2) / sqrt(2 pi); act = gelu(a)
    #   "none" with HAS_SCORE: y = s_n * acc (the scored MLP's down-projection, see mlp_combine.py)
    #   HAS_SCORE (the backward of the MLP fused with the weighted combine, see mlp_combine.py): acc is the
    #   unweighted g_n @ w_out[e]; the score gradient's partial dot <acc, act> is taken first, then
    #   d_act = s_n * acc and the stored act is s_n * act (what dW_out = g^T (s * act) reads).
    # The forward epilogue applies the activation to h rounded to the output dtype, so the backward
    # (which reads the stored h) differentiates exactly the function the forward computed.
    @autotune("grouped_gemm", _grouped_gemm_configs(), key=["K_DIM", "O", "EPILOGUE", "HAS_GATHER", "HAS_SCORE"],
              prune=_prune_gemm_configs, pre_hook=_set_weight_block)
    def _grouped_gemm_kernel(
        x_ptr, gather_ptr, w_ptr, w_desc, tokens_ptr, y_ptr, h_ptr, act_ptr, score_ptr, dscore_ptr,
        N, K_DIM, O, E, NUM_SLOTS,
        stride_xm, stride_xk, stride_we, stride_wk, stride_wo, stride_ym, stride_hm, stride_am, stride_dsm,
        EPILOGUE: tl.constexpr, HAS_GATHER: tl.constexpr, STORE_H: tl.constexpr, B_KMAJOR: tl.constexpr,
        HAS_SCORE: tl.constexpr, STORE_DSCORE: tl.constexpr,
        UPCAST_DOT: tl.constexpr, IEEE_DOT: tl.constexpr, BLOCK_E: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        B_TMA: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs_e = tl.arange(0, BLOCK_E)
        counts = tl.load(tokens_ptr + offs_e, mask=offs_e < E, other=0).to(tl.int32)
        tiles = (counts + BLOCK_M - 1) // BLOCK_M
        tile_ends = tl.cumsum(tiles, 0)
        num_m = tl.sum(tiles, 0)
        num_n = tl.cdiv(O, BLOCK_N)
        if pid >= num_m * num_n:
            return
        group = GROUP_M * num_n
        first_m = (pid // group) * GROUP_M
        group_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % group_m
        pid_n = (pid % group) // group_m
        # The expert of M-tile pid_m: how many experts' tiles end at or before it.
        e = tl.sum((tile_ends <= pid_m).to(tl.int32), 0)
        row_start, row_end = _expert_rows(tokens_ptr, e, E, BLOCK_E)
        first_tile = tl.sum(tl.where(offs_e == e, tile_ends - tiles, 0), 0)
        rows = row_start + (pid_m - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = (rows < row_end) & (rows < N)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < O
        if HAS_GATHER:
            src = tl.load(gather_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        else:
            src = rows.to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        # Offsets in int64: a weight whose expert slice spans 2^31 elements or more (E not outermost:
        # w[:, o, k] = storage[o, e, k], say) would wrap in int32. 1-D vectors, so next to nothing.
        offs_k64 = offs_k.to(tl.int64)
        a_ptrs = x_ptr + src[:, None] * stride_xm + offs_k64[None, :] * stride_xk
        b_ptrs = w_ptr + e.to(tl.int64) * stride_we + offs_k64[:, None] * stride_wk + cols.to(tl.int64)[None, :] * stride_wo
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K_DIM, BLOCK_K):
            k_ok = offs_k < K_DIM - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if B_TMA:
                # The descriptor's box: rows of w[e] (O-tile, K-tile) then transposed, or (K-tile, O-tile).
                # Past the weight's edge the box reads zeros; columns past O read the next rows of
                # w[e] (or, for SwiGLU's gate, its up half) and land in output columns never stored.
                if B_KMAJOR:
                    b = w_desc.load([e, pid_n * BLOCK_N, k0]).reshape(BLOCK_N, BLOCK_K).T
                else:
                    b = w_desc.load([e, k0, pid_n * BLOCK_N]).reshape(BLOCK_K, BLOCK_N)
            else:
                b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _dot(a, b, acc, UPCAST_DOT, IEEE_DOT)
            if EPILOGUE == "swiglu":
                if B_TMA:  # the up half: O columns further, in the descriptor's own layout
                    if B_KMAJOR:
                        b_up = w_desc.load([e, O + pid_n * BLOCK_N, k0]).reshape(BLOCK_N, BLOCK_K).T
                    else:
                        b_up = w_desc.load([e, k0, O + pid_n * BLOCK_N]).reshape(BLOCK_K, BLOCK_N)
                else:
                    b_up = tl.load(b_ptrs + tl.cast(O, tl.int64) * stride_wo, mask=k_ok[:, None] & col_ok[None, :],
                                   other=0.0)
                acc_up = _dot(a, b_up, acc_up, UPCAST_DOT, IEEE_DOT)
            a_ptrs += BLOCK_K * stride_xk
            b_ptrs += BLOCK_K * stride_wk

        out_ty = y_ptr.dtype.element_ty
        ok = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        y_ptrs = y_ptr + rows64[:, None] * stride_ym + cols[None, :]
        h_ptrs = h_ptr + rows64[:, None] * stride_hm + cols[None, :]
        if EPILOGUE == "none":
            if HAS_SCORE:  # the down-projection of the scored MLP: y = s_n * acc
                acc = acc * tl.load(score_ptr + rows64, mask=row_ok, other=0.0).to(tl.float32)[:, None]
            tl.store(y_ptrs, acc.to(out_ty), mask=ok)
        elif EPILOGUE == "swiglu":
            gate = acc.to(out_ty)
            up = acc_up.to(out_ty)
            if STORE_H:
                tl.store(h_ptrs, gate, mask=ok)
                tl.store(h_ptrs + O, up, mask=ok)
            g = gate.to(tl.float32)
            tl.store(y_ptrs, (g * tl.sigmoid(g) * up.to(tl.float32)).to(out_ty), mask=ok)
        elif EPILOGUE == "gelu":
            pre = acc.to(out_ty)
            if STORE_H:
                tl.store(h_ptrs, pre, mask=ok)
            a = pre.to(tl.float32)
            tl.store(y_ptrs, (0.5 * a * (1.0 + tl.erf(a * 0.7071067811865476))).to(out_ty), mask=ok)
        else:
            act_ptrs = act_ptr + rows64[:, None] * stride_am + cols[None, :]
            # Masked rows and columns read h = 0, so their act is 0 and they add nothing to the dot.
            g = tl.load(h_ptrs, mask=ok, other=0.0).to(tl.float32)
            if EPILOGUE == "swiglu_bwd":
                sig = tl.sigmoid(g)
                silu = g * sig
                up = tl.load(h_ptrs + O, mask=ok, other=0.0).to(tl.float32)
                act = silu * up
            else:
                cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
                act = g * cdf
            if STORE_DSCORE:
                _store_row_partial(dscore_ptr, rows64, row_ok, pid_n, tl.sum(acc * act, 1), stride_dsm, NUM_SLOTS,
                                   BLOCK_N // _SCORE_SLOT_C)
            if HAS_SCORE:
                score = tl.load(score_ptr + rows64, mask=row_ok, other=0.0).to(tl.float32)
                acc = acc * score[:, None]
                act = act * score[:, None]
            tl.store(act_ptrs, act.to(out_ty), mask=ok)
            if EPILOGUE == "swiglu_bwd":
                tl.store(y_ptrs + O, (acc * silu).to(out_ty), mask=ok)
                tl.store(y_ptrs, (acc * up * (sig + silu * (1.0 - sig))).to(out_ty), mask=ok)
            else:
                pdf = tl.exp(-0.5 * g * g) * 0.3989422804014327
                tl.store(y_ptrs, (acc * (cdf + g * pdf)).to(out_ty), mask=ok)

    # Weight gradient per expert: dw[e] = dy_e^T @ x_e, i.e. dw[e, o, i] = sum over rows n of expert e
    # of dy[n, o] * x[g(n), i]. Shapes:
    #   dy_ptr      (N, O) rows grouped by expert (any strides; `.sum()` gives zero strides); row n reads
    #               dy[dy_gather[n]] if HAS_DY_GATHER (dW_out of the MLP fused with the combine reads the
    #               token gradients through the token index)
    #   x_ptr       (M_x, I) row n reads x[gather[n]] if HAS_GATHER else x[n]
    #   gather_ptr  (N,) int64 (HAS_GATHER only)
    #   tokens_ptr  (E,) int rows per expert
    #   dw_ptr      (E, O, I) output, written in full: experts with no rows get zeros
    # Grid: (O-tiles * I-tiles, E); each program loops over its expert's rows BLOCK_K at a time.
    @autotune("grouped_gemm_dw", _grouped_gemm_dw_configs(), key=["O", "I", "HAS_GATHER", "HAS_DY_GATHER"])
    def _grouped_gemm_dw_kernel(
        dy_ptr, x_ptr, gather_ptr, dy_gather_ptr, tokens_ptr, dw_ptr,
        N, O, I, E,
        stride_dym, stride_dyo, stride_xm, stride_xi, stride_we, stride_wo, stride_wi,
        HAS_GATHER: tl.constexpr, HAS_DY_GATHER: tl.constexpr, UPCAST_DOT: tl.constexpr, IEEE_DOT: tl.constexpr,
        BLOCK_E: tl.constexpr,
        BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_O: tl.constexpr,
    ):
        pid = tl.program_id(0)
        e = tl.program_id(1)
        num_o = tl.cdiv(O, BLOCK_O)
        num_i = tl.cdiv(I, BLOCK_I)
        group = GROUP_O * num_i
        first_o = (pid // group) * GROUP_O
        group_o = tl.minimum(num_o - first_o, GROUP_O)
        pid_o = first_o + (pid % group) % group_o
        pid_i = (pid % group) // group_o
        row_start, row_end = _expert_rows(tokens_ptr, e, E, BLOCK_E)
        row_end = tl.minimum(row_end, N)
        offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
        o_ok = offs_o < O
        i_ok = offs_i < I
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        for r0 in range(row_start, row_end, BLOCK_K):
            rows = r0 + offs_k
            r_ok = rows < row_end
            if HAS_GATHER:
                src = tl.load(gather_ptr + rows, mask=r_ok, other=0).to(tl.int64)
            else:
                src = rows.to(tl.int64)
            if HAS_DY_GATHER:
                dy_src = tl.load(dy_gather_ptr + rows, mask=r_ok, other=0).to(tl.int64)
            else:
                dy_src = rows.to(tl.int64)
            # Column offsets in int64: a column-major dy or x of N rows wraps int32 at N * width >= 2^31.
            dy_ptrs = dy_ptr + dy_src[:, None] * stride_dym + offs_o.to(tl.int64)[None, :] * stride_dyo
            dy = tl.load(dy_ptrs, mask=r_ok[:, None] & o_ok[None, :], other=0.0)
            x = tl.load(x_ptr + src[:, None] * stride_xm + offs_i.to(tl.int64)[None, :] * stride_xi,
                        mask=r_ok[:, None] & i_ok[None, :], other=0.0)
            acc = _dot(tl.trans(dy), x, acc, UPCAST_DOT, IEEE_DOT)
        dw_ptrs = dw_ptr + e.to(tl.int64) * stride_we + offs_o[:, None] * stride_wo + offs_i[None, :] * stride_wi
        tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=o_ok[:, None] & i_ok[None, :])


def _k_major(b_EKO: torch.Tensor) -> bool:
    """Whether the (E, K, O) weight view is a transposed (E, O, K) weight (the forward's w.transpose(1, 2))."""
    return b_EKO.stride(1) == 1 and b_EKO.stride(2) != 1


def _weight_descriptor(b_EKO: torch.Tensor) -> tuple[object, bool]:
    """(descriptor or None, K-major) for the weight behind the (E, K, O) view b_EKO.

    The descriptor covers the 3-D weight as stored, last dimension contiguous: (E, O, K) behind a
    transposed view (K-major: the forward's w.transpose(1, 2)), (E, K, O) itself otherwise (the dX
    path's w). None where TMA cannot read it (a 16-byte aligned base and row strides are required)
    or Triton has no host descriptors; its block shape is set per config by `_set_weight_block`.
    """
    k_major = _k_major(b_EKO)
    weight = b_EKO.transpose(1, 2) if k_major else b_EKO
    if TensorDescriptor is None or weight.stride(2) != 1 or weight.numel() == 0:
        return None, k_major
    elem = weight.element_size()
    if weight.data_ptr() % 16 or any((stride * elem) % 16 for stride in weight.stride()[:2]):
        return None, k_major
    return TensorDescriptor(weight, list(weight.shape), list(weight.stride()), [1, 16, 16]), k_major


def _launch_gemm(x, b_EKO, tokens_E, gather_N, y, out_width, epilogue="none", h=None, act=None, store_h=False,
                 score=None, dscore=None, config: dict[str, int] | None = None) -> None:
    """Fill y (and h / act, per the epilogue) from x rows and the strided (E, K, O) weight view b_EKO.

    score: (N,) fp32 routing weights a "*_bwd" epilogue scales d_act and act by; dscore:
    (N, score_slots(out_width)) fp32, filled with the row dot's partial sums (see the kernel).
    config: one forced candidate of `_grouped_gemm_configs()` (tests), bypassing the autotuner.
    """
    num_rows, num_experts, k_dim = y.shape[0], b_EKO.shape[0], b_EKO.shape[1]
    if num_rows == 0 or out_width == 0:
        return
    # The kernel reads these as flat arrays (E or N elements: the copy of a strided view is cheap).
    tokens_E, gather_N, score = (t.contiguous() if t is not None else None for t in (tokens_E, gather_N, score))
    h_ = h if h is not None else y
    act_ = act if act is not None else y
    if dscore is not None and (score is None or tuple(dscore.shape) != (num_rows, score_slots(out_width))):
        raise ValueError(f"dscore of shape {tuple(dscore.shape)} needs a score and shape ({num_rows}, "
                         f"{score_slots(out_width)})")
    if dscore is not None:
        _check_score_block(config if config is not None else pinned_config("grouped_gemm"))
    score_ = score if score is not None else tokens_E
    dscore_ = dscore if dscore is not None else y
    # A descriptor only when a TMA candidate can run: with TMA off (the default) every launch passes
    # the plain weight pointer, and the pruner keeps the pointer-load candidates.
    wants_tma = bool(config.get("B_TMA")) if config is not None else gemm_tma_enabled()
    w_desc, k_major = _weight_descriptor(b_EKO) if wants_tma else (None, _k_major(b_EKO))

    def grid(meta):
        return ((triton.cdiv(num_rows, meta["BLOCK_M"]) + num_experts) * triton.cdiv(out_width, meta["BLOCK_N"]),)

    args = (
        x, gather_N if gather_N is not None else tokens_E, b_EKO, w_desc if w_desc is not None else b_EKO, tokens_E,
        y, h_, act_, score_, dscore_, num_rows, k_dim, out_width, num_experts, score_slots(out_width),
        x.stride(0), x.stride(1), b_EKO.stride(0), b_EKO.stride(1), b_EKO.stride(2),
        y.stride(0), h_.stride(0), act_.stride(0), dscore_.stride(0),
    )
    constexprs = dict(
        EPILOGUE=epilogue, HAS_GATHER=gather_N is not None, STORE_H=store_h, B_KMAJOR=k_major,
        HAS_SCORE=score is not None, STORE_DSCORE=dscore is not None,
        UPCAST_DOT=upcast_dot_operands(x.dtype), IEEE_DOT=x.dtype == torch.float32 or upcast_dot_operands(x.dtype),
        BLOCK_E=max(16, triton.next_power_of_2(num_experts)),
    )
    if config is None:
        _grouped_gemm_kernel[grid](*args, **constexprs)
        return
    if config.get("B_TMA") and w_desc is None:
        raise ValueError(f"config {config} asks for TMA weight loads, but this weight has no TMA descriptor")
    meta = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
    _set_weight_block({"w_desc": w_desc, "B_KMAJOR": k_major, **meta})
    _grouped_gemm_kernel.fn[grid](*args, **constexprs, **config)


def _launch_dw(dy: torch.Tensor, x: torch.Tensor, tokens_E: torch.Tensor, gather_N: torch.Tensor | None,
               dy_gather_N: torch.Tensor | None = None) -> torch.Tensor:
    """dw (E, O, I) in x's dtype: dw[e] = dy_e^T @ x_e, dy rows read through dy_gather_N if given."""
    num_experts, out_width, in_width = tokens_E.shape[0], dy.shape[1], x.shape[1]
    num_rows = dy.shape[0] if dy_gather_N is None else dy_gather_N.shape[0]
    # The kernel reads these as flat arrays (E or N elements: the copy of a strided view is cheap).
    tokens_E, gather_N, dy_gather_N = (t.contiguous() if t is not None else None for t in (tokens_E, gather_N, dy_gather_N))
    dw = torch.empty(num_experts, out_width, in_width, dtype=x.dtype, device=x.device)
    if num_rows == 0 or dw.numel() == 0:
        return dw.zero_()

    def grid(meta):
        return (triton.cdiv(out_width, meta["BLOCK_O"]) * triton.cdiv(in_width, meta["BLOCK_I"]), num_experts)

    _grouped_gemm_dw_kernel[grid](
        dy, x, gather_N if gather_N is not None else tokens_E, dy_gather_N if dy_gather_N is not None else tokens_E,
        tokens_E, dw, num_rows, out_width, in_width, num_experts,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
        HAS_GATHER=gather_N is not None, HAS_DY_GATHER=dy_gather_N is not None, UPCAST_DOT=upcast_dot_operands(x.dtype),
        IEEE_DOT=x.dtype == torch.float32 or upcast_dot_operands(x.dtype),
        BLOCK_E=max(16, triton.next_power_of_2(num_experts)),
    )
    return dw


def _check_score_block(config: dict[str, int] | None) -> None:
    # Each N-tile writes whole slots: a tile narrower than a slot would share one with its neighbour.
    if config is not None and config.get("BLOCK_N", SCORE_SLOT) % SCORE_SLOT:
        raise ValueError(f"grouped_gemm config {config}: the routing-score gradient needs BLOCK_N a multiple of "
                         f"{SCORE_SLOT}, got {config['BLOCK_N']}")


def score_slots(out_width: int) -> int:
    """Columns of the (N, slots) fp32 partial-sum buffer a scored "*_bwd" launch of width out_width fills."""
    return max(1, -(-out_width // SCORE_SLOT))


def _num_rows(x: torch.Tensor, gather_N: torch.Tensor | None) -> int:
    return x.shape[0] if gather_N is None else gather_N.shape[0]


# Custom ops (Triton), their fakes and autograd

@torch.library.custom_op("moe_engine::grouped_gemm", mutates_args=())
def _grouped_gemm_op(
    x: torch.Tensor, w_EOI: torch.Tensor, tokens_per_expert_E: torch.Tensor, gather_index_N: Optional[torch.Tensor]
) -> torch.Tensor:
    y = x.new_empty(_num_rows(x, gather_index_N), w_EOI.shape[1])
    _launch_gemm(x, w_EOI.transpose(1, 2), tokens_per_expert_E, gather_index_N, y, w_EOI.shape[1])
    return y


@_grouped_gemm_op.register_fake
def _(x, w_EOI, tokens_per_expert_E, gather_index_N):
    return x.new_empty(_num_rows(x, gather_index_N), w_EOI.shape[1])


@torch.library.custom_op("moe_engine::grouped_gemm_dx", mutates_args=())
def _grouped_gemm_dx_op(
    dy_NO: torch.Tensor, w_EOI: torch.Tensor, tokens_per_expert_E: torch.Tensor, gather_index_N: Optional[torch.Tensor],
    num_x_rows: int,
) -> torch.Tensor:
    """dx_N[n] = dy[n] @ w[e(n)]; with a gather, dx[m] = sum of dx_N[n] over rows n with gather[n] = m."""
    dx_NI = dy_NO.new_empty(dy_NO.shape[0], w_EOI.shape[2])
    _launch_gemm(dy_NO, w_EOI, tokens_per_expert_E, None, dx_NI, w_EOI.shape[2])
    if gather_index_N is None:
        return dx_NI
    # The rows of one source row summed in fp32, in row order (deterministic, unlike index_add_'s
    # atomics on CUDA): exactly what permute's backward does on the materialised path.
    return gather_backward_triton(dx_NI, gather_index_N, num_x_rows)


@_grouped_gemm_dx_op.register_fake
def _(dy_NO, w_EOI, tokens_per_expert_E, gather_index_N, num_x_rows):
    rows = dy_NO.shape[0] if gather_index_N is None else num_x_rows
    return dy_NO.new_empty(rows, w_EOI.shape[2])


@torch.library.custom_op("moe_engine::grouped_gemm_dw", mutates_args=())
def _grouped_gemm_dw_op(
    dy_NO: torch.Tensor, x: torch.Tensor, tokens_per_expert_E: torch.Tensor, gather_index_N: Optional[torch.Tensor],
    dy_gather_index_N: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """dw (E, O, I): dw[e] = dy_e^T @ x_e, x rows read through gather_index_N, dy rows through dy_gather_index_N."""
    return _launch_dw(dy_NO, x, tokens_per_expert_E, gather_index_N, dy_gather_index_N)


@_grouped_gemm_dw_op.register_fake
def _(dy_NO, x, tokens_per_expert_E, gather_index_N, dy_gather_index_N=None):
    return x.new_empty(tokens_per_expert_E.shape[0], dy_NO.shape[1], x.shape[1])


def _gemm_setup_context(ctx, inputs, output):
    x, w_EOI, tokens_per_expert_E, gather_index_N = inputs
    ctx.save_for_backward(x, w_EOI, tokens_per_expert_E, gather_index_N)


def _gemm_backward(ctx, grad_y):
    x, w_EOI, tokens_E, gather_N = ctx.saved_tensors
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = torch.ops.moe_engine.grouped_gemm_dx(grad_y, w_EOI, tokens_E, gather_N, x.shape[0])
    if ctx.needs_input_grad[1]:
        dw = torch.ops.moe_engine.grouped_gemm_dw(grad_y, x, tokens_E, gather_N)
    return dx, dw, None, None


_grouped_gemm_op.register_autograd(_gemm_backward, setup_context=_gemm_setup_context)


# Launchers (validate, then call the custom op) and the public op

def _check_rows(op: str, x: torch.Tensor, w: torch.Tensor, tokens_E: torch.Tensor, gather_N: torch.Tensor | None) -> None:
    if x.dim() != 2:
        raise ValueError(f"{op}: x has shape {tuple(x.shape)}, expected 2-D (rows, {w.shape[-1]})")
    if w.dim() != 3 or w.shape[2] != x.shape[1]:
        raise ValueError(f"{op}: w has shape {tuple(w.shape)}, expected (E, out, {x.shape[1]}) to match x's width")
    if tokens_E.dim() != 1 or tokens_E.shape[0] != w.shape[0] or tokens_E.is_floating_point():
        raise ValueError(f"{op}: tokens_per_expert_E has shape {tuple(tokens_E.shape)} and dtype {tokens_E.dtype}, "
                         f"expected ({w.shape[0]},) integers (one count per expert of w)")
    if gather_N is not None and (gather_N.dim() != 1 or gather_N.dtype != torch.int64):
        raise ValueError(f"{op}: gather_index_N has shape {tuple(gather_N.shape)} and dtype {gather_N.dtype}, expected (N,) int64")
    if x.dtype not in TRITON_DTYPES or w.dtype != x.dtype:
        raise ValueError(f"{op}: x is {x.dtype} and w is {w.dtype}, expected the same dtype, one of {TRITON_DTYPES}")
    for name, t in (("w", w), ("tokens_per_expert_E", tokens_E), ("gather_index_N", gather_N)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device}, expected x's device {x.device}")
    reason = triton_unsupported_reason(x.device, x.dtype)
    if reason is not None:
        raise RuntimeError(f"{op}: {reason}")


def grouped_gemm_triton(
    x: torch.Tensor, w_EOI: torch.Tensor, tokens_per_expert_E: torch.Tensor, gather_index_N: torch.Tensor | None = None
) -> torch.Tensor:
    """The Triton grouped GEMM: x (M_x, I) or x_NI, w_EOI (E, O, I) -> y_NO (N, O), N = len(gather_index_N) or M_x.

    tokens_per_expert_E: (E,) int on x's device, summing to N (not checked: that needs a host sync).
    Differentiable in x and w (dx of a gathered x sums the rows that read each source row).
    """
    _check_rows("grouped_gemm", x, w_EOI, tokens_per_expert_E, gather_index_N)
    return torch.ops.moe_engine.grouped_gemm(x, w_EOI, tokens_per_expert_E, gather_index_N)


def grouped_gemm(
    x: torch.Tensor, w_EOI: torch.Tensor, tokens_per_expert_E: torch.Tensor, gather_index_N: torch.Tensor | None = None
) -> torch.Tensor:
    """y_NO[n] = x[g(n)] @ w_EOI[e(n)]^T: the Triton kernel or the torch loop, per `select_backend`."""
    if select_backend("grouped_gemm", x.device, has_triton=TRITON_AVAILABLE) == "triton":
        return grouped_gemm_triton(x, w_EOI, tokens_per_expert_E, gather_index_N)
    return grouped_gemm_reference(x, w_EOI, tokens_per_expert_E, gather_index_N)
