"""The one setup factory every benchmark path draws from: shapes, inputs, weights, the fp32 reference.

Every path of a benchmark (ours and each peer) runs on the tensors of one `Problem`, so their
outputs can be compared before anything is timed.

- `Shape`: (T, D, F, E, K) and a dtype; `FULL_SHAPES` are the published MoE layers,
  `QUICK_SHAPES` are tiny CPU ones (E = 7 prime, a width torch._grouped_mm cannot take, bf16).
- `make_problem`: x_TD, router weight, expert weights and an output gradient, drawn on the device.
  Routing "balanced" is random top-k (Gaussian tokens, random router); "skewed" adds a Zipf-like
  bias to the router logits so expert 0 is hot: logit_e = w_e . x_perp - s * ln(e + 1), built
  into the weights and tokens (a shared direction u with u . x = alpha), so every path sees it.
- `softmax_topk`: the routing rule all paths implement (fp32 logits, softmax, top-k, renormalise).
- `loop_moe_forward`: the classic per-expert loop; run on fp32 copies it is the reference.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

ROUTINGS = ("balanced", "skewed")
DTYPES = types.MappingProxyType({"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16})
# Skewed routing: p_e proportional to (e + 1) ** -ZIPF_EXPONENT before the token-dependent part.
ZIPF_EXPONENT = 1.2
# Length of every token's component along the skew direction u.
SKEW_ALPHA = 4.0
# Tokens whose K-th and (K+1)-th fp32 logits are this close may be routed differently by paths
# that sum the gate GEMM in another order; they are left out of the output comparison.
TIE_EPS = 1e-4


@dataclass(frozen=True)
class Shape:
    """One MoE layer: T tokens of width D, E experts of hidden width F (SwiGLU), K choices per token."""

    name: str
    T: int
    D: int
    F: int
    E: int
    K: int
    dtype: str = "bfloat16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def flops_fwd(self) -> int:
        """Useful forward FLOPs: up-projection 2*T*K*D*2F plus down-projection 2*T*K*F*D."""
        return 6 * self.T * self.K * self.D * self.F

    @property
    def flops_fwd_bwd(self) -> int:
        return 3 * self.flops_fwd

    def describe(self) -> str:
        return f"{self.name} (T={self.T} D={self.D} F={self.F} E={self.E} K={self.K}) {self.dtype}"


FULL_SHAPES = (
    Shape("mixtral", 8192, 4096, 14336, 8, 2),
    Shape("olmoe", 16384, 2048, 1024, 64, 8),
    Shape("qwen3_30b_a3b", 16384, 2048, 768, 128, 8),
    Shape("deepseek_v3_ep4", 16384, 7168, 2048, 64, 8),
    Shape("sonicmoe", 32768, 4096, 1024, 64, 4),
)
QUICK_SHAPES = (
    Shape("quick_e8", 256, 64, 64, 8, 2, "float32"),
    # Prime E, T not a multiple of anything, F * 4 bytes not 16-byte aligned (no torch._grouped_mm).
    Shape("quick_e7", 250, 64, 50, 7, 2, "float32"),
    Shape("quick_bf16", 256, 64, 64, 8, 2, "bfloat16"),
)


def find_shapes(names: str | None, quick: bool, dtype: str | None = None) -> list[Shape]:
    """Shapes named in a comma-separated list (any of FULL_SHAPES and QUICK_SHAPES), or the default set.

    dtype, if given, replaces every shape's dtype.
    """
    known = {s.name: s for s in (*FULL_SHAPES, *QUICK_SHAPES)}
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise ValueError(f"--shapes {names!r}: unknown {unknown}; known: {', '.join(known)}")
        shapes = [known[n] for n in wanted]
    else:
        shapes = list(QUICK_SHAPES if quick else FULL_SHAPES)
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"--dtype {dtype!r}: allowed: {', '.join(DTYPES)}")
        shapes = [Shape(s.name, s.T, s.D, s.F, s.E, s.K, dtype) for s in shapes]
    return shapes


@dataclass(frozen=True)
class Problem:
    """The inputs and weights every path of one benchmark case shares (all leaves with requires_grad).

    x_TD: (T, D). router_weight_ED: (E, D). w_in_EHD: (E, 2F, D), gate rows then up rows.
    w_out_EDF: (E, D, F). grad_y_TD: (T, D), the output gradient of fwd+bwd. All in shape.dtype
    on one device; the expert weights are None for benchmarks that need no experts.
    """

    shape: Shape
    routing: str
    x_TD: torch.Tensor
    router_weight_ED: torch.Tensor
    w_in_EHD: torch.Tensor | None
    w_out_EDF: torch.Tensor | None
    grad_y_TD: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.x_TD.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x_TD.dtype


def make_problem(shape: Shape, routing: str, device: torch.device, seed: int = 0, with_experts: bool = True) -> Problem:
    """Draw one benchmark case on `device` (random numbers are drawn there: CPU draws of GB-sized
    weights would take longer than the benchmark)."""
    if routing not in ROUTINGS:
        raise ValueError(f"--routing {routing!r}: allowed: {', '.join(ROUTINGS)}")
    T, D, Fh, E = shape.T, shape.D, shape.F, shape.E
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*size, generator=gen, device=device) * scale

    x_TD = randn(T, D)
    router_ED = randn(E, D, scale=D**-0.5)
    if routing == "skewed":
        u_D = randn(D)
        u_D = u_D / u_D.norm()
        bias_E = -ZIPF_EXPONENT * torch.log(torch.arange(1, E + 1, device=device, dtype=torch.float32))
        x_TD = x_TD - (x_TD @ u_D)[:, None] * u_D + SKEW_ALPHA * u_D
        router_ED = router_ED - (router_ED @ u_D)[:, None] * u_D + (bias_E / SKEW_ALPHA)[:, None] * u_D
    dtype = shape.torch_dtype

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).requires_grad_(True)

    w_in = w_out = None
    if with_experts:
        w_in = leaf(randn(E, 2 * Fh, D, scale=D**-0.5))
        w_out = leaf(randn(E, D, Fh, scale=Fh**-0.5))
    return Problem(shape, routing, leaf(x_TD), leaf(router_ED), w_in, w_out, randn(T, D).to(dtype))


def softmax_topk(x_TD: torch.Tensor, router_weight_ED: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing rule of every path: fp32 logits, softmax over E, top-k, weights renormalised to sum 1.

    Returns weights_TK (T, K) float32 and experts_TK (T, K) int64.
    """
    logits_TE = x_TD.float() @ router_weight_ED.float().t()
    top_TK, experts_TK = torch.topk(logits_TE.softmax(dim=-1), top_k, dim=-1)
    return top_TK / top_TK.sum(dim=-1, keepdim=True), experts_TK


def swiglu(h_NH: torch.Tensor) -> torch.Tensor:
    gate, up = h_NH.chunk(2, dim=-1)
    return F.silu(gate) * up


def weighted_combine(out_ND: torch.Tensor, order_N: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """y_TD[t] = sum_k weights_TK[t, k] * out_ND[row of choice t*K + k], in out_ND's dtype.

    out_ND (N, D), N = T*K: the expert outputs in expert-sorted order; order_N (N,) int64: the flat
    choice (t*K + k) each row holds (a permutation). The rows go back to token order, then one
    batched matmul weights and sums each token's K rows (fp32 accumulation inside the matmul): the
    lean torch combine, with no fp32 copy of the N rows.
    """
    T, K = weights_TK.shape
    inverse_N = torch.empty_like(order_N)
    inverse_N[order_N] = torch.arange(order_N.numel(), device=order_N.device)
    out_TKD = out_ND.index_select(0, inverse_N).view(T, K, out_ND.shape[1])
    return torch.bmm(weights_TK.to(out_ND.dtype).unsqueeze(1), out_TKD).squeeze(1)


def loop_moe_forward(
    x_TD: torch.Tensor, router_weight_ED: torch.Tensor, w_in_EHD: Sequence[torch.Tensor],
    w_out_EDF: Sequence[torch.Tensor], top_k: int,
) -> torch.Tensor:
    """The classic MoE layer: for each expert, index-select its rows, two matmuls, SwiGLU, index_add.

    w_in_EHD / w_out_EDF: (E, 2F, D) / (E, D, F) tensors, or sequences of E per-expert matrices.
    Computes in the inputs' dtype, sums the K weighted contributions in fp32, returns x's dtype.
    """
    weights_TK, experts_TK = softmax_topk(x_TD, router_weight_ED, top_k)
    y_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
    for e in range(len(w_in_EHD)):
        token_idx, choice_idx = torch.where(experts_TK == e)  # NOTE: device-to-host sync
        if token_idx.numel() == 0:
            continue
        h_NH = x_TD.index_select(0, token_idx) @ w_in_EHD[e].t()
        out_ND = swiglu(h_NH) @ w_out_EDF[e].t()
        y_TD = y_TD.index_add(0, token_idx, out_ND.float() * weights_TK[token_idx, choice_idx, None])
    return y_TD.to(x_TD.dtype)


@dataclass(frozen=True)
class Reference:
    """The fp32 per-expert loop on the problem's (dtype-rounded) values, computed once per case.

    y_TD, dx_TD: float32 output and input gradient. keep_T: (T,) bool, False for near-tie tokens.
    tokens_per_expert_E: (E,) int64 rows each expert gets. checked_experts: the experts whose weight
    gradients are kept (the busiest, the least busy and a middle one: all E would double the
    weights' memory in fp32); grads: float32 gradients {"router_weight_ED": (E, D), "w_in_EHD":
    (len(checked), 2F, D), "w_out_EDF": (len(checked), D, F)}; empty when the problem has no experts.
    """

    y_TD: torch.Tensor
    dx_TD: torch.Tensor
    keep_T: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    checked_experts: tuple[int, ...] = ()
    grads: dict[str, torch.Tensor] = field(default_factory=dict)

    def load_stats(self) -> dict[str, float | int]:
        counts = self.tokens_per_expert_E.float()
        return {
            "max_over_mean": float(counts.max() / counts.mean()),
            "max_tokens": int(counts.max()),
            "min_tokens": int(counts.min()),
            "near_tie_tokens": int((~self.keep_T).sum()),
        }


def near_tie_keep_mask(x_TD: torch.Tensor, router_weight_ED: torch.Tensor, top_k: int) -> torch.Tensor:
    """(T,) bool: True where the K-th and (K+1)-th fp32 logits differ by more than TIE_EPS (relative)."""
    logits_TE = x_TD.detach().float() @ router_weight_ED.detach().float().t()
    if top_k >= logits_TE.shape[1]:
        return torch.ones(logits_TE.shape[0], dtype=torch.bool, device=logits_TE.device)
    top = torch.topk(logits_TE, top_k + 1, dim=-1).values
    gap = top[:, top_k - 1] - top[:, top_k]
    return gap > TIE_EPS * (1.0 + top[:, top_k - 1].abs())


def checked_experts(counts_E: torch.Tensor) -> tuple[int, ...]:
    """The experts whose weight gradients a benchmark checks: busiest, least busy, and E // 2 (distinct, sorted)."""
    return tuple(sorted({int(counts_E.argmax()), int(counts_E.argmin()), counts_E.numel() // 2}))


def compute_reference(problem: Problem) -> Reference:
    """Run the loop in fp32 on copies of the problem's values: y, and the gradients of x, of the
    router weight and of the checked experts' weights (the other experts' weights stay frozen)."""
    K = problem.shape.K
    x = problem.x_TD.detach().float().requires_grad_(True)
    router = problem.router_weight_ED.detach().float().requires_grad_(True)
    with torch.no_grad():
        _, experts_TK = softmax_topk(x, router, K)
    counts_E = torch.bincount(experts_TK.reshape(-1), minlength=problem.shape.E)
    checked = checked_experts(counts_E)
    w_in = list(problem.w_in_EHD.detach().float().unbind(0))
    w_out = list(problem.w_out_EDF.detach().float().unbind(0))
    for e in checked:
        w_in[e], w_out[e] = w_in[e].clone().requires_grad_(True), w_out[e].clone().requires_grad_(True)
    y = loop_moe_forward(x, router, w_in, w_out, K)
    leaves = [x, router, *(w_in[e] for e in checked), *(w_out[e] for e in checked)]
    dx, d_router, *d_experts = torch.autograd.grad(y, leaves, problem.grad_y_TD.float())
    grads = {
        "router_weight_ED": d_router,
        "w_in_EHD": torch.stack(d_experts[: len(checked)]),
        "w_out_EDF": torch.stack(d_experts[len(checked):]),
    }
    return Reference(y.detach(), dx, near_tie_keep_mask(x, router, K), counts_E, checked, grads)


def expected_drop_fraction(counts_E: torch.Tensor, num_tokens: int, top_k: int, capacity_factor: float) -> float:
    """Share of the T*K choices over capacity ceil(cf * T * K / E), as a capacity-factor gate drops them."""
    capacity = math.ceil(capacity_factor * num_tokens * top_k / counts_E.numel())
    return float((counts_E - capacity).clamp_min(0).sum()) / (num_tokens * top_k)
