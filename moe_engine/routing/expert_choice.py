"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").

Instead of every token choosing its K experts, every expert chooses its C tokens:

    S = softmax(x W_g^T) over the E experts         (T, E) token-to-expert affinities, fp32
    C = min(T, ceil(capacity_factor * T * K / E))   K: the average number of experts per token
                                                    (the paper's capacity factor c is K * capacity_factor)
    expert e takes the C tokens of largest S[:, e] (ties: the lower token first), each with weight S[t, e]

Every expert computes exactly C rows, so the load is balanced by construction and there is no
balance loss; a token goes to any number of experts, 0 to E. As a `Routing` (K = E columns):
experts_TK[t, e] = e where expert e chose token t and -1 where it did not, weights_TK[t, e] = S[t, e]
there and 0 elsewhere, capacity = C. An expert's choice depends on the other tokens of the batch
(in a decoder, on later positions too): it fits encoders and whole-batch training, not
token-by-token decoding. Under expert parallelism each rank routes its own tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_engine.routing.capacity import check_routing_args, expert_capacity
from moe_engine.routing.gate import gate_logits
from moe_engine.routing.types import Routing, RoutingContext


class ExpertChoiceRouter(nn.Module):
    """Each of E experts picks its C best tokens (see the module docstring).

    Args:
        d_model: D.
        num_experts: E.
        top_k: K, the average number of experts per token, 1 <= K <= E (sets C with capacity_factor).
        capacity_factor: > 0; None is 1.0 (expert choice always has a capacity).

    Parameter: `weight` (E, D), W_g, as nn.Linear's and TopKRouter's.
    forward(x_TD, ctx) -> Routing with (T, E) float32 weights, int64 experts (-1 where not chosen),
    float32 scores S, aux_loss 0 and capacity C.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, *, capacity_factor: float | None = None) -> None:
        super().__init__()
        check_routing_args(num_experts, top_k, capacity_factor)
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = 1.0 if capacity_factor is None else float(capacity_factor)
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        nn.init.normal_(self.weight, std=d_model**-0.5)

    def capacity(self, num_tokens: int) -> int:
        """C: the tokens each expert takes out of num_tokens (>= 1 when there is any token)."""
        return min(num_tokens, expert_capacity(num_tokens, self.top_k, self.num_experts, self.capacity_factor))

    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext | None = None) -> Routing:
        """x_TD: (T, D) any float dtype; ctx is not read."""
        num_tokens, num_experts = x_TD.shape[0], self.num_experts
        capacity = self.capacity(num_tokens)
        # The choice is made in fp32 even under bf16 autocast, as the token-choice routers do.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            scores_TE = gate_logits(x_TD, self.weight).softmax(dim=-1)
            # Each expert's C best tokens: a stable descending sort, so ties go to the lower token.
            chosen_EC = torch.sort(scores_TE.detach().t(), dim=-1, descending=True, stable=True).indices[:, :capacity]
            taken_TE = torch.zeros(num_tokens, num_experts, dtype=torch.bool, device=x_TD.device)
            taken_TE.scatter_(0, chosen_EC.t(), True)
            experts_E = torch.arange(num_experts, device=x_TD.device)
            experts_TE = torch.where(taken_TE, experts_E, -1)
            weights_TE = torch.where(taken_TE, scores_TE, torch.zeros_like(scores_TE))
        return Routing(weights_TE, experts_TE, scores_TE, scores_TE.new_zeros(()), {}, capacity)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, capacity_factor={self.capacity_factor:g}"
