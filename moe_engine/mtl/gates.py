"""`TaskGateRouter`: a top-k gate that sees each token's task (M3ViT, Mod-Squad, AdaMV-MoE, sparse MMoE).

Notation: T tokens, D width, E experts, K = top_k choices per token, X tasks, task(t) the task of
token t (RoutingContext.task_ids_T). Logits, in fp32:

- mode "per_task" (Mod-Squad, AdaMV-MoE, sparse MMoE): one gate per task, W_x (E, D), stored as one
  parameter w_XED (X, E, D); logits_t = x_t W_{task(t)}^T. Computed as one GEMM of width X*E followed
  by a gather of each token's own task's E columns: X times the FLOPs of a single gate (small next to
  the experts) and no device-to-host sync, where grouping the tokens by task would need one per task.
- mode "concat" (M3ViT): one gate over [x_t ; onehot(task(t))], weight (E, D + X); computed as
  x_t W[:, :D]^T + W[:, D + task(t)] (the one-hot product is a column pick), never materialising the
  concatenation.

Noise on the logits, in training only: "none"; "learned", Shazeer's noisy top-k with a second gate
W_noise of the same layout (zero at start) and H = logits + N(0,1) (softplus(x W_noise) + noise_epsilon)
(moe_engine.routing.noisy); "fixed", H = logits + N(0, (1/E)^2) (V-MoE, Uni-Perceiver-MoE).

Scores and weights: scores_TE = softmax(H). The K experts of highest score are chosen by
`topk_gating`. With score_epsilon = eps > 0 (Mod-Squad's "softmax + small epsilon") each chosen
weight is p_i + eps, renormalised over the chosen: (p_i + eps) / sum_j (p_j + eps). The shift does
not change which experts win, so the selection still runs in `topk_gating` (with its own
renormalisation off) and the shift is folded into the K weights afterwards, exactly; the kernel has
no such term, since adding eps to all E scores would change its softmax statistics for nothing.

Per-task k (AdaMV-MoE): the buffer task_top_k_X (X,) int64 holds each task's k_x <= K (K at start,
moved by `set_task_top_k`, e.g. by moe_engine.mtl.adaptive_k.AdaptiveTopK). Routing keeps K columns;
a token of a task with k_x < K gets expert -1 and weight 0 in columns k_x..K-1, and its kept weights
are renormalised over its kept choices when renormalize=True. Since -1 choices need an integer
capacity (see Routing), capacity is then T (no expert takes more than T rows of one batch) when no
capacity_factor is set.

Auxiliary losses (aux_loss_coef times the chosen one, plus mi_loss_coef times the MI loss):
- "switch": E * sum_i f_i P_i (f over the T*K choices; masked choices count for no expert).
- "importance_load": Shazeer's cv2(sum_t G_t) + cv2(Load); Load is the smooth estimator of
  routing.noisy (with each token's own k) for noise "learned" in training, else the routed counts.
- mi_loss_coef > 0: Mod-Squad's mutual-information loss -I(task; expert) on scores_TE
  (moe_engine.mtl.statistics.mutual_information_loss).
All balance terms use the choices before capacity drops.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_engine.kernels.router import TopKGating, topk_gating
from moe_engine.mtl.statistics import check_task_ids, mutual_information_loss
from moe_engine.routing.capacity import apply_capacity, check_routing_args
from moe_engine.routing.gate import gate_logits
from moe_engine.routing.losses import switch_load_balancing_loss, switch_loss_from_stats
from moe_engine.routing.noisy import (
    check_noise,
    chosen_mask,
    dense_gates,
    importance_load_losses,
    noisy_logits,
    prob_in_top_k,
)
from moe_engine.routing.types import Routing, RoutingContext

MODES = ("per_task", "concat")
NOISES = ("none", "learned", "fixed")
AUX_LOSSES = ("none", "switch", "importance_load")
_RENORM_EPS = 1e-20  # as topk_gating's clamp of the weight sum


class TaskGateRouter(nn.Module):
    """Routes each of T tokens to K of E experts with a gate conditioned on the token's task.

    Args:
        d_model: width D of the tokens.
        num_experts: E.
        top_k: K, 1 <= K <= E (the most choices any task may use).
        num_tasks: X >= 1; RoutingContext.task_ids_T must hold ids in [0, X).
        mode: "per_task" (a gate per task) or "concat" (one gate over [x ; onehot(task)]).
        noise: "none", "learned" (Shazeer's noisy top-k) or "fixed" (std 1/E), in training only.
        zero_init: gate weights start at 0 (Mod-Squad); else normal with std d_model**-0.5.
        score_epsilon: eps >= 0 added to the chosen softmax scores before renormalising (Mod-Squad).
        renormalize: divide each token's kept weights by their sum.
        aux_loss: "none", "switch" or "importance_load"; weighted by aux_loss_coef.
        mi_loss_coef: weight of the mutual-information loss (0: not computed).
        capacity_factor: None for dropless; else each expert keeps ceil(cf * T * K / E) choices.
        drop_policy: "position" or "score", see moe_engine.routing.capacity.
        noise_epsilon: the floor of the learned noise scale (noise "learned" only).

    Parameters: mode "per_task": w_XED (X, E, D) (and noise_w_XED for learned noise);
    mode "concat": weight (E, D + X) (and noise_weight). Buffer: task_top_k_X (X,) int64.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        num_tasks: int,
        *,
        mode: str = "per_task",
        noise: str = "none",
        zero_init: bool = False,
        score_epsilon: float = 0.0,
        renormalize: bool = True,
        aux_loss: str = "none",
        aux_loss_coef: float = 0.01,
        mi_loss_coef: float = 0.0,
        capacity_factor: float | None = None,
        drop_policy: str = "position",
        noise_epsilon: float = 1e-2,
    ) -> None:
        super().__init__()
        check_routing_args(num_experts, top_k, capacity_factor, drop_policy)
        if num_tasks < 1:
            raise ValueError(f"num_tasks = {num_tasks}: must be >= 1")
        if mode not in MODES:
            raise ValueError(f"mode = {mode!r}: allowed: {', '.join(MODES)}")
        if noise not in NOISES:
            raise ValueError(f"noise = {noise!r}: allowed: {', '.join(NOISES)}")
        if aux_loss not in AUX_LOSSES:
            raise ValueError(f"aux_loss = {aux_loss!r}: allowed: {', '.join(AUX_LOSSES)}")
        for name, value in (("score_epsilon", score_epsilon), ("aux_loss_coef", aux_loss_coef),
                            ("mi_loss_coef", mi_loss_coef)):
            if not value >= 0:
                raise ValueError(f"{name} = {value}: must be >= 0")
        if not noise_epsilon > 0:
            raise ValueError(f"noise_epsilon = {noise_epsilon}: must be > 0 (it keeps the noise scale positive)")
        self.d_model = d_model
        self.num_experts = num_experts
        self.top_k = top_k
        self.num_tasks = num_tasks
        self.mode = mode
        self.noise = noise
        self.score_epsilon = score_epsilon
        self.renormalize = renormalize
        self.aux_loss = aux_loss
        self.aux_loss_coef = aux_loss_coef
        self.mi_loss_coef = mi_loss_coef
        self.capacity_factor = capacity_factor
        self.drop_policy = drop_policy
        self.noise_epsilon = noise_epsilon
        shape = (num_tasks, num_experts, d_model) if mode == "per_task" else (num_experts, d_model + num_tasks)
        gate = nn.Parameter(torch.zeros(shape))
        if not zero_init:
            nn.init.normal_(gate, std=d_model**-0.5)
        noise_gate = nn.Parameter(torch.zeros(shape)) if noise == "learned" else None
        if mode == "per_task":
            self.w_XED, self.noise_w_XED = gate, noise_gate
        else:
            self.weight, self.noise_weight = gate, noise_gate
        # A buffer, so a checkpoint keeps each task's k; moved only by set_task_top_k.
        self.register_buffer("task_top_k_X", torch.full((num_tasks,), top_k, dtype=torch.int64))

    def task_specific_parameters(self) -> list[nn.Parameter]:
        """The per-task gates ("per_task": w_XED and the noise gate): task t's loss reaches only row t,
        so they are no shared parameters for gradient-based loss weighting. The "concat" gate's
        task columns are per task too but share a tensor with the token columns: none listed."""
        if self.mode != "per_task":
            return []
        return [p for p in (self.w_XED, self.noise_w_XED) if p is not None]

    @property
    def gate_weight(self) -> torch.Tensor:
        """The gate parameter: w_XED (X, E, D) for "per_task", weight (E, D + X) for "concat"."""
        return self.w_XED if self.mode == "per_task" else self.weight

    @property
    def noise_gate_weight(self) -> torch.Tensor | None:
        """W_noise in the gate's layout (noise "learned"), else None."""
        return self.noise_w_XED if self.mode == "per_task" else self.noise_weight

    def set_task_top_k(self, task: int, k: int) -> None:
        """Route the tokens of `task` to k <= top_k experts from the next forward on."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task = {task}: must be in [0, {self.num_tasks - 1}] ({self.num_tasks} tasks)")
        if not 1 <= k <= self.top_k:
            raise ValueError(f"k = {k} for task {task}: must be in [1, top_k = {self.top_k}]")
        self.task_top_k_X[task] = k

    def task_logits(self, x_TD: torch.Tensor, task_ids_T: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """(T, O) float32 logits of the tokens x_TD (any float dtype) through `gate`, each token through its
        own task's gate: gate_weight's layout with O outputs, (X, O, D) per task or (O, D + X) with task
        columns; O = E, or 2E for the clean and noise gates stacked (one GEMM, so the tokens' gradient
        is summed in fp32 and rounded once). One fp32 GEMM that keeps no fp32 copy of x_TD (`gate_logits`).
        task_ids_T: (T,) int64 in [0, X), already checked."""
        num_outputs = gate.shape[-2]
        if self.mode == "per_task":
            num_tokens = x_TD.shape[0]
            all_TXO = gate_logits(x_TD, gate.reshape(-1, self.d_model)).view(num_tokens, self.num_tasks, num_outputs)
            index_T1O = task_ids_T.view(num_tokens, 1, 1).expand(num_tokens, 1, num_outputs)
            return all_TXO.gather(1, index_T1O).squeeze(1)
        return gate_logits(x_TD, gate[:, : self.d_model]) + gate[:, self.d_model :].float().t()[task_ids_T]

    def forward(
        self, x_TD: torch.Tensor, ctx: RoutingContext | None = None, *, noise_TE: torch.Tensor | None = None
    ) -> Routing:
        """x_TD: (T, D) any float dtype; ctx.task_ids_T: (T,) integer task ids in [0, X).

        noise_TE: (T, E) standard normal samples used in training instead of torch.randn (noise
        "learned": scaled by the learned std; "fixed": by 1/E); an error in eval or with noise "none".
        Returns a Routing with float32 weights and scores; scores_TE = softmax(H).
        """
        who = type(self).__name__
        num_tokens, num_experts, top_k = x_TD.shape[0], self.num_experts, self.top_k
        task_ids_T = check_task_ids(ctx.task_ids_T if ctx is not None else None, num_tokens, self.num_tasks, who)
        task_ids_T = task_ids_T.to(x_TD.device)
        if noise_TE is not None and self.noise == "none":
            raise ValueError(f"{who}: noise_TE was given but noise = 'none' adds no noise")
        check_noise(noise_TE, (num_tokens, num_experts), self.training, who)
        task_k = self.task_top_k_X.tolist()  # NOTE: device-to-host sync (X ints: is any task below K?)
        masked = any(k < top_k for k in task_k)
        fold = masked or self.score_epsilon > 0
        # fp32 even under bf16 autocast: top-k near ties decide which experts run.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            noise_std_TE = None
            if self.training and self.noise == "learned":
                both = torch.cat([self.gate_weight, self.noise_gate_weight], dim=-2)  # E more outputs
                clean_TE, raw_noise_TE = self.task_logits(x_TD, task_ids_T, both).split(num_experts, dim=-1)
                noisy_TE, noise_std_TE = noisy_logits(clean_TE, raw_noise_TE, self.noise_epsilon, noise_TE)
            else:
                clean_TE = noisy_TE = self.task_logits(x_TD, task_ids_T, self.gate_weight)
            if self.training and self.noise == "fixed":
                noise_TE = torch.randn_like(clean_TE) if noise_TE is None else noise_TE.float()
                noisy_TE = clean_TE + noise_TE / num_experts
            gating = topk_gating(
                noisy_TE, top_k, score_function="softmax", renormalize=self.renormalize and not fold
            )
            weights_TK, experts_TK, k_T = gating.weights_TK, gating.experts_TK, None
            if fold:
                keep_TK = torch.ones_like(experts_TK, dtype=torch.bool)
                if masked:
                    k_T = self.task_top_k_X[task_ids_T]
                    keep_TK = torch.arange(top_k, device=x_TD.device) < k_T[:, None]
                    experts_TK = experts_TK.masked_fill(~keep_TK, -1)
                weights_TK = torch.where(keep_TK, weights_TK + self.score_epsilon, 0.0)
                if self.renormalize:
                    weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(_RENORM_EPS)
            aux_loss, aux_terms = self._aux_losses(
                gating, weights_TK, experts_TK, k_T, clean_TE, noisy_TE, noise_std_TE, task_ids_T
            )
            # Masked (-1) choices take no expert's slots.
            experts_TK, weights_TK, capacity = apply_capacity(
                experts_TK, weights_TK, num_experts, self.capacity_factor, self.drop_policy
            )
            if capacity is None and masked:
                capacity = max(num_tokens, 1)
        return Routing(weights_TK, experts_TK, gating.scores_TE, aux_loss, aux_terms, capacity)

    def _aux_losses(
        self, gating: TopKGating, weights_TK: torch.Tensor, experts_TK: torch.Tensor, k_T: torch.Tensor | None,
        clean_TE: torch.Tensor, noisy_TE: torch.Tensor, noise_std_TE: torch.Tensor | None, task_ids_T: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted total and unweighted terms, from the choices after per-task k, before capacity drops.

        k_T: (T,) int64 each token's k, or None when every task uses K.
        """
        num_tokens, num_experts = gating.scores_TE.shape
        total = gating.scores_TE.new_zeros(())
        terms: dict[str, torch.Tensor] = {}
        if self.aux_loss == "switch" and self.aux_loss_coef > 0:
            if k_T is None:
                balance = switch_loss_from_stats(gating.counts_E, gating.prob_sums_E, num_tokens, self.top_k)
            else:
                # The kernel's counts include the masked choices; this one skips ids of -1.
                balance = switch_load_balancing_loss(gating.scores_TE, experts_TK)
            total = total + self.aux_loss_coef * balance
            terms["balance_loss"] = balance.detach()
        elif self.aux_loss == "importance_load" and self.aux_loss_coef > 0:
            chosen_TE = chosen_mask(experts_TK, num_experts)
            if noise_std_TE is not None:
                if k_T is None:
                    k_T = torch.full((num_tokens,), self.top_k, dtype=torch.int64, device=clean_TE.device)
                load_E = prob_in_top_k(clean_TE, noisy_TE, noise_std_TE, chosen_TE, k_T, self.top_k).sum(0)
            else:
                load_E = chosen_TE.float().sum(0)
            importance, load = importance_load_losses(dense_gates(weights_TK, experts_TK, num_experts), load_E)
            total = total + self.aux_loss_coef * (importance + load)
            terms["importance_loss"], terms["load_loss"] = importance.detach(), load.detach()
        if self.mi_loss_coef > 0:
            mi = mutual_information_loss(gating.scores_TE, task_ids_T, self.num_tasks)
            total = total + self.mi_loss_coef * mi
            terms["mi_loss"] = mi.detach()
        return total, terms

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"num_tasks={self.num_tasks}, mode={self.mode}, noise={self.noise}, "
            f"score_epsilon={self.score_epsilon}, aux_loss={self.aux_loss}, mi_loss_coef={self.mi_loss_coef}, "
            f"capacity_factor={self.capacity_factor}"
        )
