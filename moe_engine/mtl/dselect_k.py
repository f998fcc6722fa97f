"""DSelect-k (Hazimeh et al., NeurIPS 2021): a differentiable gate that selects at most k of E experts.

Notation: E experts, m = max(1, ceil(log2 E)) bits, k selectors, X tasks, C = 2^m binary codes.

    S(t)      = 0 if t <= -g/2;  1 if t >= g/2;  else -2t^3/g^3 + 3t/(2g) + 1/2       (g = gamma)
    r(z)_e    = prod_j ( S(z_j) if bit_j(e) = 1 else 1 - S(z_j) ),  z in R^m            (one selector)
    q         = sum_i softmax(w)_i r(z^(i)),  restricted to the E real experts
    reg       = entropy_coef * sum_i H(r(z^(i)))  -  nonexistent_coef * sum_i log(1 - N_i)

bit_j(e) is bit j of e written with m digits, most significant first (the official code's
`np.binary_repr`). A saturated selector (every |z_j| >= g/2) puts all its mass on one code, so q
has at most k nonzeros; the entropy term drives the selectors there during training.

When E is not a power of two the C - E codes >= E name no expert. r and q are taken over the E real
experts only and NOT renormalised (as the official google-research `dselect_k_moe` code): mass a
selector puts on a non-existent code is simply lost, so q sums to 1 only once no selector has any.
N_i = sum over the codes >= E of r(z^(i))_c, the mass selector i puts on non-existent codes, is
penalised by -log(1 - N_i): about N_i when small, 0 once settled, and a barrier near N_i = 1. A
barrier is needed because H, taken over the real experts as in the official code, falls to 0 on a
non-existent code too; without it entropy minimisation parks selectors there (tested). The
official code uses 1/(1 - N_i), infinite (NaN gradients) for a selector saturated on non-existent
codes; -log(1 - N_i), with 1 - N_i floored at 1e-6, stays finite (at most 13.8 a selector), and
such a selector has no gradient anyway. The term has its own weight, 1 as in the official code: folded into entropy_coef
(about 1e-6) it would stop nothing. With E a power of two N_i is 0 and the term is skipped.

Reductions: the static gate's regulariser is summed over the k selectors of every task, present in
the batch or not (as the official code, one gate per task, each adding its own term); the
per-example gate's is summed over the k selectors and averaged over the tokens (the official code
sums over the batch, which ties the weight to the batch size).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from moe_engine.mtl.statistics import check_task_ids
from moe_engine.routing.gate import gate_logits
from moe_engine.routing.types import Routing, RoutingContext

GATE_KINDS = ("static", "per_example")
# Floor of a selector's mass 1 - N on real experts in -log(1 - N): bounds a dead selector's penalty.
_MASS_FLOOR = 1e-6


def num_selector_bits(num_experts: int) -> int:
    """m = max(1, ceil(log2 E)), computed on integers (no float log2 rounding)."""
    return max(1, (num_experts - 1).bit_length())


def binary_codes(num_codes: int, num_bits: int, device: torch.device | None = None) -> torch.Tensor:
    """(num_codes, num_bits) bool: row c is c in binary, most significant bit first."""
    shifts_M = torch.arange(num_bits - 1, -1, -1, device=device)
    return (torch.arange(num_codes, device=device)[:, None] >> shifts_M) & 1 == 1


def smooth_step(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """S(t) elementwise, same shape and dtype as t; exactly 0 / 1 (gradient exactly 0) outside (-g/2, g/2).

    Evaluated as u^2 (3 - 2u) with u = (t + g/2) / g, the paper's cubic rewritten: t + g/2 is exact
    near the lower edge, so S keeps its relative precision where it is tiny (the expanded cubic sums
    O(1) terms to a value near 0, which rounds to 0 or below). The edges sit at +-g/2 in t's dtype.
    """
    half = gamma / 2
    rise, fall = t + half, half - t
    u = rise / gamma
    cubic = u.square() * (3.0 - 2.0 * u)
    return torch.where(rise <= 0, torch.zeros_like(t), torch.where(fall <= 0, torch.ones_like(t), cubic))


def selector_weights(z_XM: torch.Tensor, bits_EM: torch.Tensor, gamma: float) -> torch.Tensor:
    """r (..., E): r_e = prod_j (S(z_j) if bit_j(e) else 1 - S(z_j)) for selectors z_XM (..., m).

    bits_EM: (E, m) 0/1 or bool codes (rows may be any subset of the C codes). 1 - S(z) is taken as
    S(-z), equal in exact arithmetic (S(t) + S(-t) = 1): just below z = g/2, 1 - S would round to 0
    (dropping an expert whose weight is not 0) where S(-z) keeps its relative precision.
    """
    on_X1M = smooth_step(z_XM, gamma).unsqueeze(-2)
    off_X1M = smooth_step(-z_XM, gamma).unsqueeze(-2)
    return torch.where(bits_EM.bool(), on_X1M, off_X1M).prod(-1)


def selector_entropy(r_XE: torch.Tensor) -> torch.Tensor:
    """H (...,) = -sum_e r_e log r_e over the last dim, with 0 log 0 = 0 (and a 0 gradient there)."""
    safe_XE = torch.where(r_XE > 0, r_XE, torch.ones_like(r_XE))
    return -(r_XE * safe_XE.log()).sum(-1)


class DSelectKWeights(NamedTuple):
    """q_TE (T, E) fp32 expert weights; reg_loss () fp32 weighted; entropy, nonexistent () fp32 unweighted."""

    q_TE: torch.Tensor
    reg_loss: torch.Tensor
    entropy: torch.Tensor
    nonexistent: torch.Tensor


class DSelectKGate(nn.Module):
    """DSelect-k expert weights q (T, E) for tokens of X tasks.

    Args:
        num_experts: E >= 1.
        k: selectors per gate, >= 1 (q has at most k nonzeros once they saturate).
        gamma: smooth-step width g > 0.
        entropy_coef: weight of the selectors' entropy in reg_loss (official default 1e-6).
        nonexistent_coef: weight of the non-existent-code penalty (E not a power of two), official 1.
        gate: "static" (per-task parameters z (X, k, m), w (X, k): each task has one fixed q) or
            "per_example" (z = Linear(D, k m)(x), w = Linear(D, k)(x), one pair of Linears per task).
        num_tasks: X >= 1.
        d_model: D, needed by the per-example gate.

    Init as the official code: z (and the per-example z Linear's weight and bias) ~ U(-g/100, g/100),
    w (and its Linear's weight and bias) ~ U(-0.05, 0.05).
    """

    def __init__(
        self,
        num_experts: int,
        k: int,
        *,
        gamma: float = 1.0,
        entropy_coef: float = 1e-6,
        nonexistent_coef: float = 1.0,
        gate: str = "static",
        num_tasks: int = 1,
        d_model: int | None = None,
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts = {num_experts}: must be >= 1")
        if k < 1:
            raise ValueError(f"k = {k}: must be >= 1 (the number of selectors)")
        if not (math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"gamma = {gamma}: must be a finite number > 0")
        for name, value in (("entropy_coef", entropy_coef), ("nonexistent_coef", nonexistent_coef)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} = {value}: must be a finite number >= 0")
        if gate not in GATE_KINDS:
            raise ValueError(f"gate = {gate!r}: allowed: {', '.join(GATE_KINDS)}")
        if num_tasks < 1:
            raise ValueError(f"num_tasks = {num_tasks}: must be >= 1")
        if gate == "per_example" and (d_model is None or d_model < 1):
            raise ValueError(f"d_model = {d_model}: the per_example gate needs d_model >= 1")
        self.num_experts, self.k, self.num_tasks = num_experts, k, num_tasks
        self.gamma, self.entropy_coef = float(gamma), float(entropy_coef)
        self.nonexistent_coef = float(nonexistent_coef)
        self.kind, self.d_model = gate, d_model
        self.num_bits = num_selector_bits(num_experts)
        self.power_of_two = num_experts == 2**self.num_bits
        # All C codes: the first E name the experts, the rest only feed the penalty.
        self.register_buffer("codes_CM", binary_codes(2**self.num_bits, self.num_bits), persistent=False)
        z_bound = gamma / 100
        if gate == "static":
            self.z_logits = nn.Parameter(torch.empty(num_tasks, k, self.num_bits).uniform_(-z_bound, z_bound))
            self.w_logits = nn.Parameter(torch.empty(num_tasks, k).uniform_(-0.05, 0.05))
        else:
            # Output index (task * k + i) * m + j: every task's selectors in one GEMM.
            self.z_proj = nn.Linear(d_model, num_tasks * k * self.num_bits)
            self.w_proj = nn.Linear(d_model, num_tasks * k)
            with torch.no_grad():
                for p in (self.z_proj.weight, self.z_proj.bias):
                    p.uniform_(-z_bound, z_bound)
                for p in (self.w_proj.weight, self.w_proj.bias):
                    p.uniform_(-0.05, 0.05)

    def forward(self, x_TD: torch.Tensor, task_ids_T: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x_TD: (T, D) any float dtype (the static gate reads only T); task_ids_T: (T,) int in [0, X),
        may be None when X = 1. Returns q_TE (T, E) fp32 and reg_loss () fp32 (weighted)."""
        out = self.weights(x_TD, self.task_ids_for(x_TD, task_ids_T, "DSelectKGate"))
        return out.q_TE, out.reg_loss

    def task_ids_for(self, x_TD: torch.Tensor, task_ids_T: torch.Tensor | None, who: str) -> torch.Tensor:
        """x_TD's shape checked, and its (T,) int64 task ids validated; None means task 0 when X = 1."""
        if x_TD.dim() != 2:
            raise ValueError(f"{who}: x_TD has shape {tuple(x_TD.shape)}: expected (T, D), 2-D")
        if self.kind == "per_example" and x_TD.shape[1] != self.d_model:
            raise ValueError(f"{who}: x_TD has width {x_TD.shape[1]}: expected d_model = {self.d_model}")
        if task_ids_T is None and self.num_tasks == 1:
            return torch.zeros(x_TD.shape[0], dtype=torch.int64, device=x_TD.device)
        return check_task_ids(task_ids_T, x_TD.shape[0], self.num_tasks, who)

    def weights(self, x_TD: torch.Tensor, task_ids_T: torch.Tensor) -> DSelectKWeights:
        """q, the weighted regulariser and its unweighted terms; task_ids_T already validated."""
        # fp32 under any autocast: bf16 would blur the smooth step's exact 0/1 edges.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            if self.kind == "static":
                q_XE, r_XKC = self._mix(self.z_logits.float(), self.w_logits.float())
                q_TE = q_XE.index_select(0, task_ids_T)
                scale = 1.0
            else:
                num_tokens = x_TD.shape[0]
                rows_T = torch.arange(num_tokens, device=x_TD.device)
                # Both projections in one fp32 GEMM that keeps x_TD as it came for the backward (not an
                # fp32 copy) and sums the tokens' gradient in fp32 before rounding it once.
                weight = torch.cat([self.z_proj.weight, self.w_proj.weight])
                bias = torch.cat([self.z_proj.bias, self.w_proj.bias]).float()
                z_TO, w_TO = (gate_logits(x_TD, weight) + bias).split(self.z_proj.out_features, dim=1)
                z_TXKM = z_TO.view(num_tokens, self.num_tasks, self.k, self.num_bits)
                w_TXK = w_TO.view(num_tokens, self.num_tasks, self.k)
                q_TE, r_XKC = self._mix(z_TXKM[rows_T, task_ids_T], w_TXK[rows_T, task_ids_T])
                scale = 1.0 / max(num_tokens, 1)
            r_XKE = r_XKC[..., : self.num_experts]
            entropy = selector_entropy(r_XKE).sum() * scale
            reg_loss = self.entropy_coef * entropy
            if self.power_of_two:
                nonexistent = torch.zeros_like(entropy)
            else:
                # -log of the mass on real codes, 1 exactly (a 0 penalty) once a selector settles on one.
                nonexistent = -torch.log(r_XKE.sum(-1).clamp_min(_MASS_FLOOR)).sum() * scale
                reg_loss = reg_loss + self.nonexistent_coef * nonexistent
        return DSelectKWeights(q_TE, reg_loss, entropy.detach(), nonexistent.detach())

    def _mix(self, z_XKM: torch.Tensor, w_XK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q_XE = sum_i softmax(w)_i r(z^(i)) over the real experts, and r over all codes (X, k, C)."""
        r_XKC = selector_weights(z_XKM, self.codes_CM, self.gamma)
        q_XE = (torch.softmax(w_XK, dim=-1).unsqueeze(-1) * r_XKC[..., : self.num_experts]).sum(-2)
        # Every term of q is >= 0, so q_e == 0 means each term is 0, and in exact arithmetic then
        # dq_e/d(z, w) == 0 as well: a zero factor S or 1 - S sits at or past a smooth-step edge,
        # where S' == 0, and any other factor's derivative is multiplied by it. Routers therefore
        # skip the experts with q == 0 without losing gradient. This `where` makes that exact in
        # floating point too, where a tiny softmax weight times a tiny r can underflow to 0 while
        # its derivative does not.
        return torch.where(q_XE > 0, q_XE, torch.zeros_like(q_XE)), r_XKC

    @torch.no_grad()
    def task_weights(self) -> torch.Tensor:
        """(X, E) fp32: each task's q (static gate only)."""
        if self.kind != "static":
            raise ValueError(f"task_weights: gate = {self.kind!r} has no per-task weights; only 'static' does")
        return self._mix(self.z_logits.float(), self.w_logits.float())[0]

    def task_specific_parameters(self) -> list[nn.Parameter]:
        """Every parameter of the gate: each row (static: z_logits[t], w_logits[t]; per_example: the
        z_proj / w_proj outputs of task t) is read by task t's tokens only, so none is shared between
        tasks for gradient-based loss weighting."""
        return list(self.parameters())

    def selected_experts(self, task: int) -> list[int]:
        """The experts with nonzero weight for `task`, ascending (static gate only): once the selectors
        have saturated, at most k of them, and the sub-network to extract for that task."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task = {task}: allowed [0, {self.num_tasks - 1}] ({self.num_tasks} tasks)")
        q_E = self.task_weights()[task]
        return torch.nonzero(q_E > 0).flatten().tolist()  # NOTE: device-to-host sync

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, k={self.k}, gate={self.kind}, num_tasks={self.num_tasks}, "
            f"gamma={self.gamma:g}, entropy_coef={self.entropy_coef:g}, nonexistent_coef={self.nonexistent_coef:g}"
        )


class DSelectKRouter(nn.Module):
    """DSelect-k as a router: every expert with q_te > 0 runs for token t, with weight q_te.

    Args: d_model D; num_experts E; k selectors; num_tasks X; gamma, entropy_coef, nonexistent_coef,
    gate: see DSelectKGate. Reads ctx.task_ids_T (may be omitted when X = 1).

    Routing: experts_TK is (T, E): column e holds e where q_te > 0 and -1 where q_te == 0, so only
    the selected experts compute (at most k per token once the selectors saturate; before that, up to
    E). weights_TK = scores_TE = q (0 on the dropped columns); capacity = T, since -1 appears (no
    expert takes more than T rows, so nothing is cut). top_k = E (the columns), k = the selectors.
    aux_loss = the gate's reg_loss; aux_terms: dselect_entropy (and dselect_nonexistent when E is not
    a power of two), unweighted.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int,
        num_tasks: int,
        *,
        gamma: float = 1.0,
        entropy_coef: float = 1e-6,
        nonexistent_coef: float = 1.0,
        gate: str = "static",
    ) -> None:
        super().__init__()
        if d_model < 1:
            raise ValueError(f"d_model = {d_model}: must be >= 1")
        self.gate = DSelectKGate(
            num_experts, k, gamma=gamma, entropy_coef=entropy_coef, nonexistent_coef=nonexistent_coef,
            gate=gate, num_tasks=num_tasks, d_model=d_model,
        )
        self.d_model, self.num_experts, self.num_tasks = d_model, num_experts, num_tasks
        self.top_k = num_experts
        self.k = k

    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext | None = None) -> Routing:
        """x_TD: (T, D) any float dtype. Returns a Routing with (T, E) float32 weights and int64 experts."""
        task_ids_T = self.gate.task_ids_for(x_TD, None if ctx is None else ctx.task_ids_T, "DSelectKRouter")
        out = self.gate.weights(x_TD, task_ids_T)
        experts_E = torch.arange(self.num_experts, device=x_TD.device)
        experts_TE = torch.where(out.q_TE > 0, experts_E, -1)
        terms = {"dselect_entropy": out.entropy}
        if not self.gate.power_of_two:
            terms["dselect_nonexistent"] = out.nonexistent
        return Routing(out.q_TE, experts_TE, out.q_TE, out.reg_loss, terms, capacity=x_TD.shape[0])

    def selected_experts(self, task: int) -> list[int]:
        """See DSelectKGate.selected_experts."""
        return self.gate.selected_experts(task)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, num_tasks={self.num_tasks}"
