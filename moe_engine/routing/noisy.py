"""Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks"), and its pieces.

Notation: T tokens, D width, E experts, K choices per token. With gate weights W_g and W_noise, both
(E, D) and zero at start (as in the paper):

    clean_t  = x_t W_g^T                                       (T, E) logits
    std_t    = softplus(x_t W_noise^T) + noise_epsilon          (T, E) noise scale
    H_t      = clean_t + N(0, 1) * std_t   in training;  H_t = clean_t  in eval
    G_t      = softmax(KeepTopK(H_t, K))  = softmax(H_t) over the K largest, renormalised, 0 elsewhere

Losses (tensor2tensor's `noisy_top_k_gating`, the paper's code), each cv2 = var / mean^2:

    importance_loss = cv2( sum_t G_t )
    load_loss       = cv2( Load ),  Load_i = sum_t P(H_ti stays in the top K | a fresh noise draw for i)
                    = sum_t Phi( (clean_ti - threshold_ti) / std_ti )

where Phi is the standard normal CDF and threshold_ti is the K-th largest of H_t when i is not among
the K chosen, and the (K+1)-th largest when it is (with i in the top K, i stays in if its noisy logit
beats the best of the others, which is the (K+1)-th value). Gradients flow through clean, std and the
thresholds (the thresholds are noisy logits), as in the paper's code. Without noise (eval, or noise
off) and when K = E, the estimator is replaced by the count of tokens routed to each expert (every
expert is then in the top K with certainty; the paper's code does the same): the load loss then has
no gradient, and for K = E it is 0 since every expert gets every token.

`NoisyTopKRouter` applies the above; `noisy_logits`, `prob_in_top_k`, `dense_gates` and
`importance_load_losses` are the pieces that task-conditioned routers (moe_engine.mtl.gates) reuse.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from moe_engine.kernels.router import topk_gating
from moe_engine.routing.capacity import apply_capacity, check_routing_args
from moe_engine.routing.gate import gate_logits
from moe_engine.routing.losses import importance_cv_squared, load_cv_squared
from moe_engine.routing.types import Routing, RoutingContext


def noisy_logits(
    clean_TE: torch.Tensor, raw_noise_TE: torch.Tensor, noise_epsilon: float, noise_TE: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """H = clean + noise * (softplus(raw_noise) + noise_epsilon), and that scale.

    clean_TE, raw_noise_TE: (T, E) float32 (x W_g^T and x W_noise^T). noise_TE: (T, E) standard normal
    samples, or None to draw them with torch's global RNG. Returns (noisy_TE, noise_std_TE), float32.
    """
    noise_std_TE = F.softplus(raw_noise_TE) + noise_epsilon
    if noise_TE is None:
        noise_TE = torch.randn_like(clean_TE)
    return clean_TE + noise_TE.to(clean_TE.dtype) * noise_std_TE, noise_std_TE


def check_noise(noise_TE: torch.Tensor | None, shape: tuple[int, int], training: bool, who: str) -> None:
    """ValueError unless noise_TE is None, or a float tensor of `shape` given in training."""
    if noise_TE is None:
        return
    if not training:
        raise ValueError(f"{who}: noise_TE was given in eval mode, where no noise is added; pass it in training only")
    if tuple(noise_TE.shape) != tuple(shape) or not noise_TE.is_floating_point():
        raise ValueError(
            f"{who}: noise_TE has shape {tuple(noise_TE.shape)} {noise_TE.dtype}: "
            f"expected a float tensor {tuple(shape)}"
        )


def chosen_mask(experts_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(T, E) bool: True where the expert is one of the token's choices; choices of -1 are ignored."""
    mask_TE = torch.zeros(experts_TK.shape[0], num_experts + 1, dtype=torch.bool, device=experts_TK.device)
    # -1 lands in the extra last column, which is cut off.
    mask_TE.scatter_(1, torch.where(experts_TK < 0, num_experts, experts_TK), True)
    return mask_TE[:, :num_experts]


def dense_gates(weights_TK: torch.Tensor, experts_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """G (T, E) float32: each choice's weight at its expert, 0 elsewhere (and for choices of -1).

    Differentiable in weights_TK.
    """
    gates_TE = weights_TK.new_zeros(weights_TK.shape[0], num_experts + 1, dtype=torch.float32)
    index_TK = torch.where(experts_TK < 0, num_experts, experts_TK)
    return gates_TE.scatter_add(1, index_TK, weights_TK.float())[:, :num_experts]


def prob_in_top_k(
    clean_TE: torch.Tensor, noisy_TE: torch.Tensor, noise_std_TE: torch.Tensor, chosen_TE: torch.Tensor,
    k_T: torch.Tensor, max_k: int,
) -> torch.Tensor:
    """P (T, E) float32: the probability that expert i is among token t's top k_t under a new noise draw.

    clean_TE: logits without noise; noisy_TE: H, the logits the choice was made on; noise_std_TE: the
    noise scale; chosen_TE: (T, E) bool, expert i is among t's top k_t of H; k_T: (T,) int64 in [1, E],
    the number of choices of each token (NoisyTopKRouter: all K; task routers: each task's k);
    max_k: an upper bound of k_T, a Python int so that no device-to-host sync is needed.
    Where k_t = E the probability is 1 (every expert is in the top E).
    """
    num_experts = clean_TE.shape[1]
    width = min(max_k + 1, num_experts)
    top_TW = noisy_TE.topk(width, dim=-1).values
    k_T1 = k_T.view(-1, 1)
    # In the top k: stay in if the noisy logit beats the (k+1)-th value; out: it must beat the k-th.
    threshold_if_in_T1 = top_TW.gather(1, k_T1.clamp_max(width - 1))
    threshold_if_out_T1 = top_TW.gather(1, k_T1 - 1)
    prob_if_in_TE = torch.special.ndtr((clean_TE - threshold_if_in_T1) / noise_std_TE)
    prob_if_out_TE = torch.special.ndtr((clean_TE - threshold_if_out_T1) / noise_std_TE)
    prob_TE = torch.where(chosen_TE, prob_if_in_TE, prob_if_out_TE)
    return torch.where(k_T1 >= num_experts, chosen_TE.float(), prob_TE)


def importance_load_losses(gates_TE: torch.Tensor, load_E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(importance_loss, load_loss), both () float32 and unweighted: cv2(sum_t G_t) and cv2(load_E)."""
    return importance_cv_squared(gates_TE), load_cv_squared(load_E.float())


class NoisyTopKRouter(nn.Module):
    """Shazeer et al.'s noisy top-k gating with its importance and load losses (see the module docstring).

    Args:
        d_model: width D of the tokens.
        num_experts: E.
        top_k: K, 1 <= K <= E.
        aux_loss_coef: weight of importance_loss + load_loss in `aux_loss` (0: not computed).
        capacity_factor: None for dropless; else each expert keeps ceil(cf * T * K / E) choices.
        drop_policy: "position" or "score", see moe_engine.routing.capacity.
        noise_epsilon: added to softplus(x W_noise^T) so the noise scale stays positive (paper: 1e-2).

    Parameters: `weight` (E, D) is W_g, `noise_weight` (E, D) is W_noise; both start at zero, so at
    first every expert has the same logit and the noise alone picks the experts.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        aux_loss_coef: float = 0.01,
        capacity_factor: float | None = None,
        drop_policy: str = "position",
        noise_epsilon: float = 1e-2,
    ) -> None:
        super().__init__()
        check_routing_args(num_experts, top_k, capacity_factor, drop_policy)
        if aux_loss_coef < 0:
            raise ValueError(f"aux_loss_coef = {aux_loss_coef}: must be >= 0")
        if not noise_epsilon > 0:
            raise ValueError(f"noise_epsilon = {noise_epsilon}: must be > 0 (it keeps the noise scale positive)")
        self.num_experts = num_experts
        self.top_k = top_k
        self.aux_loss_coef = aux_loss_coef
        self.capacity_factor = capacity_factor
        self.drop_policy = drop_policy
        self.noise_epsilon = noise_epsilon
        self.weight = nn.Parameter(torch.zeros(num_experts, d_model))
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, d_model))

    def forward(
        self, x_TD: torch.Tensor, ctx: RoutingContext | None = None, *, noise_TE: torch.Tensor | None = None
    ) -> Routing:
        """x_TD: (T, D) any float dtype. Returns a Routing with float32 weights and scores.

        noise_TE: (T, E) standard normal samples to use in training instead of torch.randn (for tests
        and reproducible experiments); an error in eval, where no noise is added.
        scores_TE is softmax(H) over all E experts, H the noisy logits in training.
        """
        num_tokens = x_TD.shape[0]
        check_noise(noise_TE, (num_tokens, self.num_experts), self.training, type(self).__name__)
        # fp32 even under bf16 autocast: the top-k and the CDF's tails are sensitive to rounding.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            clean_TE = gate_logits(x_TD, self.weight)  # fp32, without keeping an fp32 copy of x
            noisy_TE, noise_std_TE = clean_TE, None
            if self.training:
                raw_noise_TE = gate_logits(x_TD, self.noise_weight)
                noisy_TE, noise_std_TE = noisy_logits(clean_TE, raw_noise_TE, self.noise_epsilon, noise_TE)
            gating = topk_gating(noisy_TE, self.top_k, score_function="softmax", renormalize=True)
            weights_TK, experts_TK = gating.weights_TK, gating.experts_TK
            aux_loss, aux_terms = gating.scores_TE.new_zeros(()), {}
            if self.aux_loss_coef > 0:
                chosen_TE = chosen_mask(experts_TK, self.num_experts)
                if noise_std_TE is not None and self.top_k < self.num_experts:
                    k_T = torch.full((num_tokens,), self.top_k, dtype=torch.int64, device=x_TD.device)
                    load_E = prob_in_top_k(clean_TE, noisy_TE, noise_std_TE, chosen_TE, k_T, self.top_k).sum(0)
                else:
                    load_E = chosen_TE.float().sum(0)
                importance, load = importance_load_losses(dense_gates(weights_TK, experts_TK, self.num_experts), load_E)
                aux_loss = self.aux_loss_coef * (importance + load)
                aux_terms = {"importance_loss": importance.detach(), "load_loss": load.detach()}
            experts_TK, weights_TK, capacity = apply_capacity(
                experts_TK, weights_TK, self.num_experts, self.capacity_factor, self.drop_policy
            )
        return Routing(weights_TK, experts_TK, gating.scores_TE, aux_loss, aux_terms, capacity)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.weight.shape[1]}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"aux_loss_coef={self.aux_loss_coef}, capacity_factor={self.capacity_factor}, "
            f"noise_epsilon={self.noise_epsilon}"
        )
