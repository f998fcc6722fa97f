"""Multi-gate Mixture-of-Experts (MMoE, Ma et al., KDD 2018) and its baselines, OMoE and shared-bottom.

Notation: B examples, D input width, E experts, H expert width, X tasks, G gates (G = X for MMoE,
G = 1 for OMoE), K experts kept per gate in the sparse variant, R = G * B gate rows.

    f_i(x)   = act(W_i x + b_i)                        expert i, one layer D -> H   (W_EHD, b_EH)
    g_t(x)   = softmax(V_t x + c_t)                    gate of task t over E, in fp32 (V_GED, c_GE)
    bottom_t = sum_i g_t(x)_i f_i(x)                   what task t's tower reads
    y_t      = h_t(bottom_t)                           tower: Linear(H, tower_hidden), ReLU, Linear(., 1)

The experts run as one grouped GEMM over rows grouped by expert
(`moe_engine.kernels.grouped_gemm.grouped_gemm`): in the dense layer every expert reads every
example (rows e*B .. e*B + B - 1 read x through the kernel's gather index, so the E copies of x
never exist on the Triton path). The sparse variant (top_k = K < E) keeps each gate's K best
experts (`topk_gating`, weights renormalised over the K) and computes only the chosen
(gate row, expert) pairs: `expert_order` groups the R * K choices by expert, the GEMM reads each
row's example through the gather index, and `unpermute` forms each gate row's weighted sum.
A pair chosen by two gates is computed once per gate: deduplicating would need a host sync to
size the rows, and X is small.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe_engine.kernels.expert_order import expert_order
from moe_engine.kernels.grouped_gemm import grouped_gemm
from moe_engine.kernels.permute import unpermute
from moe_engine.kernels.router import topk_gating
from moe_engine.routing.gate import gate_logits as fp32_gate_logits

ACTIVATIONS = ("relu", "gelu")
MODEL_KINDS = ("mmoe", "omoe", "shared_bottom")


def _activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    return F.relu(h) if activation == "relu" else F.gelu(h)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # The grouped GEMM is not on autocast's op lists: cast by hand to what autocast would pick.
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} = {value!r}: expected an integer >= 1")


def _check_input(x_BD: torch.Tensor, d_in: int, who: str) -> None:
    if x_BD.dim() != 2 or x_BD.shape[1] != d_in or not x_BD.is_floating_point():
        raise ValueError(f"{who}: x has shape {tuple(x_BD.shape)} and dtype {x_BD.dtype}: expected a floating (B, {d_in}) tensor")


class MultiGateMoE(nn.Module):
    """Shared experts mixed by one softmax gate per task (MMoE), or by one gate for all tasks (OMoE).

    Args:
        d_in: input width D.
        num_experts: E.
        expert_hidden: H, the width of each expert's one layer (and of each task's output).
        num_tasks: X.
        num_gates: X (MMoE, the default) or 1 (OMoE: every task reads the same mixture).
        top_k: None for dense gates; K in [1, E] keeps each gate's K largest probabilities,
            renormalised, and computes only those experts (K = E equals the dense layer).
        activation: "relu" (the paper) or "gelu".

    Parameters: expert_w_EHD (E, H, D), expert_b_EH (E, H), gate_w_GED (G, E, D), gate_b_GE (G, E).
    forward(x_BD) -> list of X tensors (B, H) in x's dtype (autocast's, under autocast).
    """

    def __init__(
        self, d_in: int, num_experts: int, expert_hidden: int, num_tasks: int, *,
        num_gates: int | None = None, top_k: int | None = None, activation: str = "relu",
    ) -> None:
        super().__init__()
        _check_positive(d_in=d_in, num_experts=num_experts, expert_hidden=expert_hidden, num_tasks=num_tasks)
        num_gates = num_tasks if num_gates is None else num_gates
        if num_gates not in (1, num_tasks):
            raise ValueError(f"num_gates = {num_gates!r}: allowed: 1 (OMoE) or num_tasks = {num_tasks} (MMoE)")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts):
            raise ValueError(f"top_k = {top_k!r}: allowed: None (dense gates) or an integer in [1, num_experts = {num_experts}]")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation = {activation!r}: allowed: {', '.join(ACTIVATIONS)}")
        self.d_in, self.num_experts, self.expert_hidden = d_in, num_experts, expert_hidden
        self.num_tasks, self.num_gates, self.top_k, self.activation = num_tasks, num_gates, top_k, activation
        self.out_features = expert_hidden
        # nn.Linear's default init, per expert and per gate.
        bound = 1 / math.sqrt(d_in)
        self.expert_w_EHD = nn.Parameter(torch.empty(num_experts, expert_hidden, d_in).uniform_(-bound, bound))
        self.expert_b_EH = nn.Parameter(torch.empty(num_experts, expert_hidden).uniform_(-bound, bound))
        self.gate_w_GED = nn.Parameter(torch.empty(num_gates, num_experts, d_in).uniform_(-bound, bound))
        self.gate_b_GE = nn.Parameter(torch.empty(num_gates, num_experts).uniform_(-bound, bound))

    def gate_logits(self, x_BD: torch.Tensor) -> torch.Tensor:
        """(G, B, E) fp32 logits V_g x + c_g, computed in fp32 whatever x's dtype or autocast."""
        G, E, D = self.gate_w_GED.shape
        with torch.autocast(x_BD.device.type, enabled=False):
            logits_BGE = fp32_gate_logits(x_BD, self.gate_w_GED.reshape(G * E, D)).view(-1, G, E)
            return logits_BGE.transpose(0, 1) + self.gate_b_GE.float()[:, None, :]

    def gate_probs(self, x_BD: torch.Tensor) -> torch.Tensor:
        """(G, B, E) fp32: each gate's softmax over the experts (the dense gates g_t(x))."""
        return self.gate_logits(x_BD).softmax(dim=-1)

    def _experts(self, x_BD: torch.Tensor, gather_N: torch.Tensor, experts_N: torch.Tensor,
                 tokens_per_expert_E: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(N, H): act(W_e x_b + b_e) for row n = (b = gather_N[n], e = experts_N[n]), rows grouped by expert."""
        h_NH = grouped_gemm(x_BD.to(dtype), self.expert_w_EHD.to(dtype), tokens_per_expert_E, gather_N)
        return _activate(h_NH + self.expert_b_EH.to(dtype).index_select(0, experts_N), self.activation)

    def forward(self, x_BD: torch.Tensor) -> list[torch.Tensor]:
        _check_input(x_BD, self.d_in, type(self).__name__)
        mixed_GBH = self._forward_dense(x_BD) if self.top_k is None else self._forward_sparse(x_BD)
        return [mixed_GBH[0 if self.num_gates == 1 else t] for t in range(self.num_tasks)]

    def _forward_dense(self, x_BD: torch.Tensor) -> torch.Tensor:
        B, E, dtype = x_BD.shape[0], self.num_experts, _compute_dtype(x_BD)
        experts_N = torch.arange(E, device=x_BD.device).repeat_interleave(B)
        gather_N = torch.arange(B, device=x_BD.device).repeat(E)
        tokens_per_expert_E = torch.full((E,), B, dtype=torch.int64, device=x_BD.device)
        f_EBH = self._experts(x_BD, gather_N, experts_N, tokens_per_expert_E, dtype).view(E, B, self.expert_hidden)
        mixed_GBH = torch.einsum("gbe,ebh->gbh", self.gate_probs(x_BD), f_EBH.float())
        return mixed_GBH.to(dtype)

    def _forward_sparse(self, x_BD: torch.Tensor) -> torch.Tensor:
        B, G, K, dtype = x_BD.shape[0], self.num_gates, self.top_k, _compute_dtype(x_BD)
        # Gate row r = g * B + b: every gate's choices in one gating call and one GEMM.
        gating = topk_gating(self.gate_logits(x_BD).reshape(G * B, self.num_experts), K)
        choice_N, tokens_per_expert_E = expert_order(gating.experts_TK, self.num_experts, num_rows=G * B * K)
        experts_N = gating.experts_TK.reshape(-1).index_select(0, choice_N)
        f_NH = self._experts(x_BD, (choice_N // K) % B, experts_N, tokens_per_expert_E, dtype)
        mixed_RH = unpermute(f_NH.float(), choice_N, gating.weights_TK, G * B)
        return mixed_RH.view(G, B, self.expert_hidden).to(dtype)

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, num_experts={self.num_experts}, expert_hidden={self.expert_hidden}, "
            f"num_tasks={self.num_tasks}, num_gates={self.num_gates}, top_k={self.top_k}, activation={self.activation}"
        )


class SharedBottom(nn.Module):
    """One shared layer act(W x + b), D -> hidden, that every task reads (the shared-bottom baseline).

    forward(x_BD) -> list of num_tasks references to the same (B, hidden) tensor, the interface of
    `MultiGateMoE`.
    """

    def __init__(self, d_in: int, hidden: int, num_tasks: int, *, activation: str = "relu") -> None:
        super().__init__()
        _check_positive(d_in=d_in, hidden=hidden, num_tasks=num_tasks)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation = {activation!r}: allowed: {', '.join(ACTIVATIONS)}")
        self.d_in, self.num_tasks, self.activation = d_in, num_tasks, activation
        self.out_features = hidden
        self.layer = nn.Linear(d_in, hidden)

    def forward(self, x_BD: torch.Tensor) -> list[torch.Tensor]:
        _check_input(x_BD, self.d_in, type(self).__name__)
        h_BH = _activate(self.layer(x_BD), self.activation)
        return [h_BH] * self.num_tasks


class MultiTaskRegressor(nn.Module):
    """A bottom (MultiGateMoE or SharedBottom) and one tower per task: y_t = h_t(bottom(x)[t]).

    Each tower h_t is Linear(bottom.out_features, tower_hidden), ReLU, Linear(tower_hidden, 1).
    forward(x_BD) -> (B, num_tasks) predictions in the bottom's output dtype.
    """

    def __init__(self, bottom: MultiGateMoE | SharedBottom, tower_hidden: int, num_tasks: int) -> None:
        super().__init__()
        _check_positive(tower_hidden=tower_hidden, num_tasks=num_tasks)
        if getattr(bottom, "num_tasks", None) != num_tasks:
            raise ValueError(f"num_tasks = {num_tasks}: the bottom serves {getattr(bottom, 'num_tasks', None)} tasks")
        self.bottom = bottom
        self.num_tasks = num_tasks
        self.towers = nn.ModuleList(
            nn.Sequential(nn.Linear(bottom.out_features, tower_hidden), nn.ReLU(), nn.Linear(tower_hidden, 1))
            for _ in range(num_tasks)
        )

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        features = self.bottom(x_BD)
        return torch.cat([tower(f) for tower, f in zip(self.towers, features)], dim=1)


def count_parameters(module: nn.Module) -> int:
    """The number of trainable scalars in `module`."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def multigate_parameter_count(d_in: int, num_tasks: int, num_gates: int, num_experts: int, expert_hidden: int,
                              tower_hidden: int) -> int:
    """Parameters of MultiTaskRegressor(MultiGateMoE(...)): experts, gates, towers."""
    experts = num_experts * expert_hidden * (d_in + 1)
    gates = num_gates * num_experts * (d_in + 1)
    return experts + gates + num_tasks * _tower_parameters(expert_hidden, tower_hidden)


def _tower_parameters(d_in: int, tower_hidden: int) -> int:
    return tower_hidden * (d_in + 1) + tower_hidden + 1


def shared_bottom_parameter_count(d_in: int, num_tasks: int, hidden: int, tower_hidden: int) -> int:
    """Parameters of MultiTaskRegressor(SharedBottom(d_in, hidden, ...)): the layer and the towers."""
    return hidden * (d_in + 1) + num_tasks * _tower_parameters(hidden, tower_hidden)


def shared_bottom_width(d_in: int, num_tasks: int, tower_hidden: int, target_parameters: int) -> int:
    """The hidden width >= 1 whose shared-bottom model has the parameter count closest to the target.

    The count is linear in the width, hidden * (d_in + 1 + X * tower_hidden) + X * (2 * tower_hidden + 1),
    so the best width is the rounded solution; ties go to the smaller width.
    """
    per_unit = d_in + 1 + num_tasks * tower_hidden
    estimate = max(1, (target_parameters - num_tasks * (2 * tower_hidden + 1)) // per_unit)
    candidates = [w for w in (estimate - 1, estimate, estimate + 1, estimate + 2) if w >= 1]
    return min(candidates, key=lambda w: (abs(shared_bottom_parameter_count(d_in, num_tasks, w, tower_hidden) - target_parameters), w))


def build_model(
    kind: str, d_in: int, num_tasks: int, *, num_experts: int = 8, expert_hidden: int = 16, tower_hidden: int = 8,
    top_k: int | None = None,
) -> MultiTaskRegressor:
    """One of the paper's three models, sized to be comparable.

    kind: "mmoe" (one gate per task), "omoe" (one gate shared by the tasks) or "shared_bottom".
    The MoE models have `num_experts` experts of `expert_hidden` units (the paper: 8 of 16) and
    towers of `tower_hidden` units (the paper: 8). The shared-bottom model's layer width is chosen
    by `shared_bottom_width` so that its parameter count is the closest to the MMoE model's
    (for d_in = 100, two tasks and the defaults: width 126, 14,776 parameters against 14,834).
    top_k: the sparse gates of the MoE models (None: dense, as in the paper).
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind = {kind!r}: allowed: {', '.join(MODEL_KINDS)}")
    _check_positive(d_in=d_in, num_tasks=num_tasks, num_experts=num_experts, expert_hidden=expert_hidden,
                    tower_hidden=tower_hidden)
    if kind == "shared_bottom":
        target = multigate_parameter_count(d_in, num_tasks, num_tasks, num_experts, expert_hidden, tower_hidden)
        bottom = SharedBottom(d_in, shared_bottom_width(d_in, num_tasks, tower_hidden, target), num_tasks)
    else:
        num_gates = num_tasks if kind == "mmoe" else 1
        bottom = MultiGateMoE(d_in, num_experts, expert_hidden, num_tasks, num_gates=num_gates, top_k=top_k)
    return MultiTaskRegressor(bottom, tower_hidden, num_tasks)
