"""Conditional MoE attribute routing (Uni-Perceiver-MoE, Zhu et al. 2022): tokens choose experts by what they are.

Each token carries an attribute vector a_t (A values: modality, input or target role, task flags);
the gate reads those attributes instead of (or beside) the token's features:

    g_t      = LayerNorm(W_a a_t + b_a)                   (attribute_dim)
    logits_t = W_g g_t            (use_tokens=False)      (E), no bias, fp32
    logits_t = W_g [g_t ; x_t]    (use_tokens=True)
    training: logits_t += N(0, noise_std^2) per entry     (V-MoE style, noise_std = 1/E by default)
    top-k of softmax(logits_t), weights renormalised over the k chosen

With use_tokens=False every token of one attribute vector takes the same experts, whatever its
features: the routing is decided by the token's kind, which is what lets tasks that share
attributes share experts and keeps the others apart. The official code's 8-bit attribute vectors
are in `UNI_PERCEIVER_ATTRIBUTES` / `uni_perceiver_attributes`.
"""

from __future__ import annotations

import math
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from moe_engine.kernels.router import topk_gating
from moe_engine.routing.capacity import apply_capacity, check_routing_args
from moe_engine.routing.gate import gate_logits
from moe_engine.routing.losses import switch_loss_from_stats
from moe_engine.routing.types import Routing, RoutingContext

# The 8-bit token attributes of the official Uni-Perceiver-MoE code, by token kind.
UNI_PERCEIVER_ATTRIBUTES: MappingProxyType[str, tuple[int, ...]] = MappingProxyType({
    "image_classification_input": (1, 0, 0, 1, 1, 0, 0, 0),
    "mlm_text": (0, 1, 0, 1, 0, 1, 0, 0),
    "caption_image": (1, 1, 0, 1, 1, 0, 0, 0),
    "caption_text": (1, 1, 0, 1, 0, 1, 0, 1),
    "retrieval_text_target": (1, 0, 0, 1, 0, 1, 1, 0),
})


def uni_perceiver_attributes(kind: str) -> tuple[int, ...]:
    """The 8-bit attribute vector of a Uni-Perceiver-MoE token kind, e.g. "mlm_text" -> (0, 1, 0, 1, 0, 1, 0, 0)."""
    try:
        return UNI_PERCEIVER_ATTRIBUTES[kind]
    except KeyError:
        raise ValueError(f"attribute kind = {kind!r}: known kinds: {', '.join(UNI_PERCEIVER_ATTRIBUTES)}") from None


class AttributeRouter(nn.Module):
    """Routes each of T tokens to K of E experts from its attributes (ctx.attributes_TA).

    Args:
        d_model: width D of the tokens (read by the gate only with use_tokens=True).
        num_experts: E.
        num_attributes: A, the length of each token's attribute vector.
        top_k: K, 1 <= K <= E (Uni-Perceiver-MoE: 2).
        attribute_dim: width of the attribute embedding g_t; None: d_model. At least 2, since a
            LayerNorm over one feature outputs a constant.
        use_tokens: the gate sees [g_t ; x_t], attributes beside the token's features.
        noise_std: std of the Gaussian noise added to the logits in training; None: 1/E; 0: none.
        renormalize: divide the K chosen probabilities by their sum.
        aux_loss_coef: weight of the Switch balance loss in `aux_loss` (0, the paper's default: off).
        capacity_factor: None for dropless; else each expert keeps ceil(cf * T * K / E) choices
            (the paper's config: 3.0).
        drop_policy: "position" or "score", see moe_engine.routing.capacity.

    Parameters: attribute_proj (Linear A -> attribute_dim, with bias), attribute_norm (LayerNorm),
    weight (E, attribute_dim [+ D]) the gate, nn.Linear's layout, no bias.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        num_attributes: int,
        top_k: int = 2,
        *,
        attribute_dim: int | None = None,
        use_tokens: bool = False,
        noise_std: float | None = None,
        renormalize: bool = True,
        aux_loss_coef: float = 0.0,
        capacity_factor: float | None = None,
        drop_policy: str = "position",
    ) -> None:
        super().__init__()
        if d_model < 1:
            raise ValueError(f"d_model = {d_model}: must be >= 1")
        if num_experts < 1:
            raise ValueError(f"num_experts = {num_experts}: must be >= 1")
        attribute_dim = d_model if attribute_dim is None else attribute_dim
        noise_std = 1.0 / num_experts if noise_std is None else noise_std
        if num_attributes < 1:
            raise ValueError(f"num_attributes = {num_attributes}: must be >= 1")
        check_routing_args(num_experts, top_k, capacity_factor, drop_policy)
        if attribute_dim < 2:
            raise ValueError(
                f"attribute_dim = {attribute_dim}: must be >= 2 (a LayerNorm over one feature is constant)"
            )
        if not (math.isfinite(noise_std) and noise_std >= 0):
            raise ValueError(f"noise_std = {noise_std}: must be a finite number >= 0, or None for 1/num_experts")
        if not (math.isfinite(aux_loss_coef) and aux_loss_coef >= 0):
            raise ValueError(f"aux_loss_coef = {aux_loss_coef}: must be a finite number >= 0")
        self.d_model = d_model
        self.num_experts = num_experts
        self.num_attributes = num_attributes
        self.top_k = top_k
        self.attribute_dim = attribute_dim
        self.use_tokens = use_tokens
        self.noise_std = float(noise_std)
        self.renormalize = renormalize
        self.aux_loss_coef = aux_loss_coef
        self.capacity_factor = capacity_factor
        self.drop_policy = drop_policy
        self.attribute_proj = nn.Linear(num_attributes, attribute_dim)
        self.attribute_norm = nn.LayerNorm(attribute_dim)
        gate_width = attribute_dim + (d_model if use_tokens else 0)
        self.weight = nn.Parameter(torch.empty(num_experts, gate_width))
        nn.init.normal_(self.weight, std=gate_width**-0.5)

    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext | None = None) -> Routing:
        """x_TD: (T, D) any float dtype; ctx.attributes_TA: (T, A) float, or bool/integer 0/1 flags.

        Returns a Routing with float32 weights and scores; capacity None unless capacity_factor is set.
        """
        attributes_TA = self._check_attributes(x_TD, ctx)
        # The gate runs in fp32 under any autocast: top-k near ties decide which experts run.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            proj, norm = self.attribute_proj, self.attribute_norm
            g_TA = F.linear(attributes_TA.float(), proj.weight.float(), proj.bias.float())
            g_TA = F.layer_norm(g_TA, (self.attribute_dim,), norm.weight.float(), norm.bias.float(), norm.eps)
            # [g_TA | x_TD] @ weight^T, without concatenating (or keeping) an fp32 copy of the tokens.
            logits_TE = g_TA @ self.weight[:, : self.attribute_dim].float().t()
            if self.use_tokens:
                logits_TE = logits_TE + gate_logits(x_TD, self.weight[:, self.attribute_dim :])
            if self.training and self.noise_std > 0:
                logits_TE = logits_TE + self.noise_std * torch.randn_like(logits_TE)
            gating = topk_gating(logits_TE, self.top_k, renormalize=self.renormalize)
            weights_TK, experts_TK = gating.weights_TK, gating.experts_TK
            num_tokens = x_TD.shape[0]
            aux_loss = logits_TE.new_zeros(())
            aux_terms: dict[str, torch.Tensor] = {}
            if self.aux_loss_coef > 0:
                # Balance counts the choices before capacity drops, as TopKRouter does.
                balance = switch_loss_from_stats(gating.counts_E, gating.prob_sums_E, num_tokens, self.top_k)
                aux_loss = self.aux_loss_coef * balance
                aux_terms["balance_loss"] = balance.detach()
            experts_TK, weights_TK, capacity = apply_capacity(
                experts_TK, weights_TK, self.num_experts, self.capacity_factor, self.drop_policy
            )
        return Routing(weights_TK, experts_TK, gating.scores_TE, aux_loss, aux_terms, capacity)

    def _check_attributes(self, x_TD: torch.Tensor, ctx: RoutingContext | None) -> torch.Tensor:
        """ctx.attributes_TA validated against x_TD; raises ValueError naming what is wrong."""
        if x_TD.dim() != 2:
            raise ValueError(f"AttributeRouter: x_TD has shape {tuple(x_TD.shape)}: expected (T, D), 2-D")
        if self.use_tokens and x_TD.shape[1] != self.d_model:
            raise ValueError(f"AttributeRouter: x_TD has width {x_TD.shape[1]}: expected d_model = {self.d_model}")
        attributes_TA = None if ctx is None else ctx.attributes_TA
        if attributes_TA is None:
            raise ValueError(
                "AttributeRouter needs RoutingContext.attributes_TA (T, A), the attributes of each token; got "
                + ("no RoutingContext" if ctx is None else "attributes_TA = None")
            )
        num_tokens = x_TD.shape[0]
        if attributes_TA.dim() != 2:
            raise ValueError(
                f"AttributeRouter: attributes_TA has shape {tuple(attributes_TA.shape)}: expected 2-D (T, A)"
            )
        if attributes_TA.shape[0] != num_tokens:
            raise ValueError(
                f"AttributeRouter: attributes_TA has {attributes_TA.shape[0]} rows: "
                f"expected T = {num_tokens}, one per token"
            )
        if attributes_TA.shape[1] != self.num_attributes:
            raise ValueError(
                f"AttributeRouter: attributes_TA has {attributes_TA.shape[1]} columns: "
                f"expected num_attributes = {self.num_attributes}"
            )
        if attributes_TA.is_complex():
            raise ValueError(f"AttributeRouter: attributes_TA has dtype {attributes_TA.dtype}: expected real or bool")
        if attributes_TA.is_floating_point():
            # NOTE: device-to-host sync (validation): a NaN attribute would silently route to expert 0.
            if not bool(torch.isfinite(attributes_TA).all()):
                raise ValueError("AttributeRouter: attributes_TA has non-finite values (NaN or inf): expected finite")
        return attributes_TA

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, num_attributes={self.num_attributes}, "
            f"top_k={self.top_k}, attribute_dim={self.attribute_dim}, use_tokens={self.use_tokens}, "
            f"noise_std={self.noise_std:g}, capacity_factor={self.capacity_factor}"
        )
