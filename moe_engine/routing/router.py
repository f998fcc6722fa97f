"""Token-choice top-k routers: softmax top-k (Switch, Mixtral, Qwen-MoE) and sigmoid top-k (DeepSeek-V3).

One Router does: logits in fp32 (a cuBLAS GEMM) -> `topk_gating` (one fused kernel on CUDA:
scores, optional aux-loss-free bias and group limit for the selection, top-k, renormalisation,
scaling, and the statistics of the losses) -> auxiliary losses -> capacity drops -> `Routing`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from moe_engine.kernels.router import TopKGating, topk_gating
from moe_engine.routing.capacity import apply_capacity, check_routing_args
from moe_engine.routing.gate import gate_logits
from moe_engine.routing.losses import sequence_load_balancing_loss, switch_loss_from_stats
from moe_engine.routing.types import Routing, RoutingContext

if TYPE_CHECKING:
    from moe_engine.config import RouterConfig

SCORE_FUNCTIONS = ("softmax", "sigmoid")


class TopKRouter(nn.Module):
    """Routes each of T tokens to K of E experts.

    Args:
        d_model: width D of the tokens.
        num_experts: E.
        top_k: K, 1 <= K <= E.
        score_function: "softmax" (probabilities over experts) or "sigmoid" (independent affinities).
        renormalize: divide the K chosen scores by their sum, so a token's weights sum to 1.
        scaling_factor: multiply the weights by this (DeepSeek-V3's routed_scaling_factor).
        aux_loss_type: "switch", "seq_switch" (needs ctx.sequence_ids_T) or "none".
        aux_loss_coef, z_loss_coef: weights of the balance loss and the z-loss in `aux_loss`.
        capacity_factor: None for dropless; else each expert keeps ceil(cf * T * K / E) choices.
        drop_policy: "position" or "score", see moe_engine.routing.capacity.
        expert_bias: keep a per-expert bias (a buffer, zeros at start, saved in the state dict)
            that is added to the scores for the choice of experts only, never to the weights
            (DeepSeek-V3's aux-loss-free balancing); `update_expert_bias` moves it.
        n_groups, topk_groups: group-limited routing (DeepSeek-V3): the E experts form n_groups
            equal groups, a group scores the sum of its two best (biased) scores, and each token
            chooses among the experts of its best topk_groups groups. 1, 1: no limit.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        score_function: str = "softmax",
        renormalize: bool = True,
        scaling_factor: float = 1.0,
        aux_loss_type: str = "switch",
        aux_loss_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        capacity_factor: float | None = None,
        drop_policy: str = "position",
        expert_bias: bool = False,
        n_groups: int = 1,
        topk_groups: int = 1,
    ) -> None:
        super().__init__()
        check_routing_args(num_experts, top_k, capacity_factor, drop_policy)
        if score_function not in SCORE_FUNCTIONS:
            raise ValueError(f"score_function = {score_function!r}: allowed: {', '.join(SCORE_FUNCTIONS)}")
        if aux_loss_type not in ("switch", "seq_switch", "none"):
            raise ValueError(f"aux_loss_type = {aux_loss_type!r}: allowed: switch, seq_switch, none")
        if n_groups < 1 or num_experts % n_groups:
            raise ValueError(f"n_groups = {n_groups}: must divide num_experts = {num_experts}")
        if not 1 <= topk_groups <= n_groups:
            raise ValueError(f"topk_groups = {topk_groups}: must be in [1, n_groups = {n_groups}]")
        if top_k > topk_groups * (num_experts // n_groups):
            raise ValueError(
                f"top_k = {top_k}: topk_groups = {topk_groups} groups of {num_experts // n_groups} experts "
                f"offer only {topk_groups * (num_experts // n_groups)} experts"
            )
        self.num_experts = num_experts
        self.top_k = top_k
        self.score_function = score_function
        self.renormalize = renormalize
        self.scaling_factor = scaling_factor
        self.aux_loss_type = aux_loss_type
        self.aux_loss_coef = aux_loss_coef
        self.z_loss_coef = z_loss_coef
        self.capacity_factor = capacity_factor
        self.drop_policy = drop_policy
        self.n_groups = n_groups
        self.topk_groups = topk_groups
        # Not a parameter: moved by `update_expert_bias` from routing counts, never by gradients.
        self.register_buffer("expert_bias", torch.zeros(num_experts) if expert_bias else None)
        # (E, D) like nn.Linear and the Hugging Face checkpoints' `gate.weight`.
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight, std=d_model**-0.5)

    @classmethod
    def from_config(cls, d_model: int, num_experts: int, cfg: RouterConfig) -> TopKRouter:
        return cls(
            d_model,
            num_experts,
            cfg.top_k,
            score_function="sigmoid" if cfg.type == "sigmoid_topk" else "softmax",
            renormalize=cfg.renormalize,
            scaling_factor=cfg.scaling_factor,
            aux_loss_type=cfg.aux_loss_type,
            aux_loss_coef=cfg.aux_loss_coef,
            z_loss_coef=cfg.z_loss_coef,
            capacity_factor=cfg.capacity_factor,
            drop_policy=cfg.drop_policy,
            expert_bias=cfg.expert_bias_rate > 0,
            n_groups=cfg.n_groups,
            topk_groups=cfg.topk_groups,
        )

    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext | None = None) -> Routing:
        """x_TD: (T, D) any float dtype. Returns a Routing with float32 weights and scores."""
        # Routing decisions are made in fp32 even under bf16 autocast: top-k near ties and the
        # z-loss's logsumexp are where low precision changes which experts get picked.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = gate_logits(x_TD, self.weight)  # fp32, without keeping an fp32 copy of x
            gating = topk_gating(
                logits_TE, self.top_k, score_function=self.score_function, renormalize=self.renormalize,
                scaling_factor=self.scaling_factor, expert_bias_E=self.expert_bias, n_groups=self.n_groups,
                topk_groups=self.topk_groups,
            )
            scores_TE, weights_TK, experts_TK = gating.scores_TE, gating.weights_TK, gating.experts_TK
            with torch.profiler.record_function("moe::aux_loss"):  # its own row in `moe-engine profile`
                aux_loss, aux_terms = self._aux_losses(gating, ctx)
            experts_TK, weights_TK, capacity = apply_capacity(
                experts_TK, weights_TK, self.num_experts, self.capacity_factor, self.drop_policy
            )
        return Routing(weights_TK, experts_TK, scores_TE, aux_loss, aux_terms, capacity)

    def _aux_losses(
        self, gating: TopKGating, ctx: RoutingContext | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted total and the unweighted terms. Balance uses the choices before capacity drops."""
        num_tokens = gating.scores_TE.shape[0]
        total = gating.scores_TE.new_zeros(())
        terms: dict[str, torch.Tensor] = {}
        if self.aux_loss_type != "none" and self.aux_loss_coef > 0:
            if self.aux_loss_type == "seq_switch":
                if ctx is None or ctx.sequence_ids_T is None:
                    raise ValueError("aux_loss_type 'seq_switch' needs RoutingContext.sequence_ids_T; got none")
                # For sigmoid scores, P_i uses the scores normalised per token (DeepSeek-V3).
                probs_TE = gating.scores_TE
                if self.score_function == "sigmoid":
                    # clamped as the gating kernel's: a token whose scores all underflow adds 0, not NaN
                    probs_TE = probs_TE / probs_TE.sum(-1, keepdim=True).clamp_min(1e-20)
                balance = sequence_load_balancing_loss(probs_TE, gating.experts_TK, ctx.sequence_ids_T)
            else:
                # f_i and P_i from the gating kernel's per-expert sums (prob_sums_E already holds
                # the per-token normalised sigmoid scores).
                balance = switch_loss_from_stats(gating.counts_E, gating.prob_sums_E, num_tokens, self.top_k)
            total = total + self.aux_loss_coef * balance
            terms["balance_loss"] = balance.detach()
        if self.z_loss_coef > 0:
            z = gating.lse_T.square().sum() / max(num_tokens, 1)
            total = total + self.z_loss_coef * z
            terms["z_loss"] = z.detach()
        return total, terms

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert_E: torch.Tensor, rate: float) -> None:
        """Nudge the selection bias toward balance: bias_e += rate * sign(mean_e' count_e' - count_e).

        DeepSeek-V3's aux-loss-free balancing: after each step, an overloaded expert's bias falls by
        `rate` and an underloaded one's rises by `rate` (0 change at exactly the mean), which moves
        future choices without touching the weights or the gradients.
        tokens_per_expert_E: (E,) choices (or rows) per expert over the step; in data/expert-parallel
        training sum it over the ranks first (this module does no collectives), so every replica
        applies the same update. rate: the update speed (DeepSeek-V3: 0.001). Keep the bias in
        fp32 (a router cast to bf16 casts it too, and bf16 cannot hold steps of 0.001 once
        |bias| > 0.25).
        """
        if self.expert_bias is None:
            raise ValueError("update_expert_bias: this router was built with expert_bias=False; pass expert_bias=True")
        if tokens_per_expert_E.shape != (self.num_experts,):
            raise ValueError(
                f"tokens_per_expert_E has shape {tuple(tokens_per_expert_E.shape)}: expected ({self.num_experts},)"
            )
        counts_E = tokens_per_expert_E.to(device=self.expert_bias.device, dtype=torch.float32)
        self.expert_bias += rate * torch.sign(counts_E.mean() - counts_E)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.weight.shape[1]}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"score={self.score_function}, capacity_factor={self.capacity_factor}, "
            f"expert_bias={self.expert_bias is not None}, n_groups={self.n_groups}, topk_groups={self.topk_groups}"
        )
