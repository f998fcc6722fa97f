"""Token-choice top-k routers: softmax top-k (Switch, Mixtral, Qwen-MoE) and sigmoid top-k (DeepSeek-V3).

One Router does: logits in fp32 -> scores (softmax or sigmoid) -> top-k -> optional
renormalisation of the k weights -> scaling -> auxiliary losses -> capacity drops -> `Routing`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from moe_engine.routing.capacity import DROP_POLICIES, drop_over_capacity, expert_capacity
from moe_engine.routing.losses import router_z_loss, sequence_load_balancing_loss, switch_load_balancing_loss
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
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k = {top_k}: must be in [1, num_experts = {num_experts}]")
        if score_function not in SCORE_FUNCTIONS:
            raise ValueError(f"score_function = {score_function!r}: allowed: {', '.join(SCORE_FUNCTIONS)}")
        if drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy = {drop_policy!r}: allowed: {', '.join(DROP_POLICIES)}")
        if aux_loss_type not in ("switch", "seq_switch", "none"):
            raise ValueError(f"aux_loss_type = {aux_loss_type!r}: allowed: switch, seq_switch, none")
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
        )

    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext | None = None) -> Routing:
        """x_TD: (T, D) any float dtype. Returns a Routing with float32 weights and scores."""
        # Routing decisions are made in fp32 even under bf16 autocast: top-k near ties and the
        # z-loss's logsumexp are where low precision changes which experts get picked.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = x_TD.float() @ self.weight.float().t()
            scores_TE = logits_TE.softmax(dim=-1) if self.score_function == "softmax" else logits_TE.sigmoid()
            top_scores_TK, experts_TK = torch.topk(scores_TE, self.top_k, dim=-1)
            weights_TK = top_scores_TK
            if self.renormalize:
                weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
            weights_TK = weights_TK * self.scaling_factor
            aux_loss, aux_terms = self._aux_losses(logits_TE, scores_TE, experts_TK, ctx)
            capacity = None
            if self.capacity_factor is not None:
                capacity = expert_capacity(x_TD.shape[0], self.top_k, self.num_experts, self.capacity_factor)
                experts_TK, weights_TK = drop_over_capacity(
                    experts_TK, weights_TK, self.num_experts, capacity, self.drop_policy
                )
        return Routing(weights_TK, experts_TK, scores_TE, aux_loss, aux_terms, capacity)

    def _aux_losses(
        self, logits_TE: torch.Tensor, scores_TE: torch.Tensor, experts_TK: torch.Tensor, ctx: RoutingContext | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted total and the unweighted terms. Balance uses the choices before capacity drops."""
        total = logits_TE.new_zeros(())
        terms: dict[str, torch.Tensor] = {}
        if self.aux_loss_type != "none" and self.aux_loss_coef > 0:
            # For sigmoid scores, P_i uses the scores normalised per token (DeepSeek-V3).
            probs_TE = scores_TE if self.score_function == "softmax" else scores_TE / scores_TE.sum(-1, keepdim=True)
            if self.aux_loss_type == "seq_switch":
                if ctx is None or ctx.sequence_ids_T is None:
                    raise ValueError("aux_loss_type 'seq_switch' needs RoutingContext.sequence_ids_T; got none")
                balance = sequence_load_balancing_loss(probs_TE, experts_TK, ctx.sequence_ids_T)
            else:
                balance = switch_load_balancing_loss(probs_TE, experts_TK)
            total = total + self.aux_loss_coef * balance
            terms["balance_loss"] = balance.detach()
        if self.z_loss_coef > 0:
            z = router_z_loss(logits_TE)
            total = total + self.z_loss_coef * z
            terms["z_loss"] = z.detach()
        return total, terms

    def extra_repr(self) -> str:
        return (
            f"d_model={self.weight.shape[1]}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"score={self.score_function}, capacity_factor={self.capacity_factor}"
        )
