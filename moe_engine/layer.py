"""`MoELayer`: router -> dispatcher.dispatch -> experts -> dispatcher.combine (+ shared experts).

The layer composes its three parts and does nothing else; where experts live is the
dispatcher's business (see moe_engine.parallel), how tokens choose is the router's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from moe_engine.experts import MLP, GroupedExperts
from moe_engine.parallel import LocalDispatcher, TokenDispatcher
from moe_engine.parallel.dispatcher import experts_then_combine
from moe_engine.routers import build_any_router
from moe_engine.routing import Routing, RoutingContext

if TYPE_CHECKING:
    from moe_engine.config import MoEConfig


@dataclass(frozen=True)
class MoEOutput:
    """y: same shape and dtype as the layer's input. aux_loss: () float32, already weighted,
    to be added to the training loss. tokens_per_expert_E: (E,) int64 rows each local expert got
    (detached). routing: the router's full decision, for telemetry."""

    y: torch.Tensor
    aux_loss: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    routing: Routing



def shared_expert_gate_logits(gate: nn.Module, x_TD: torch.Tensor) -> torch.Tensor:
    """The shared-expert gate's (T, 1) logits in x_TD's dtype: an nn.Linear's weights are cast to it,
    as the experts' are, so bf16 tokens meet fp32 parameters without autocast."""
    if isinstance(gate, nn.Linear):
        bias = gate.bias.to(x_TD.dtype) if gate.bias is not None else None
        return F.linear(x_TD, gate.weight.to(x_TD.dtype), bias)
    return gate(x_TD)

class MoELayer(nn.Module):
    """A Mixture-of-Experts feed-forward layer over tokens of width D.

    Args:
        router: (x_TD, ctx) -> Routing.
        experts: (x_ND, tokens_per_expert_E) -> y_ND, e.g. GroupedExperts.
        dispatcher: moves rows to experts and back; defaults to LocalDispatcher (all experts here),
            which lets experts that can fuse the row gather into their up-projection do so.
        shared_experts: a dense MLP every token also passes through, added to the routed output.
        shared_expert_gate: (D -> 1) whose sigmoid scales the shared output per token (Qwen2-MoE).
    """

    def __init__(
        self,
        router: nn.Module,
        experts: nn.Module,
        dispatcher: TokenDispatcher | None = None,
        shared_experts: nn.Module | None = None,
        shared_expert_gate: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.router = router
        self.experts = experts
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatcher(experts.num_experts, fuse_gather=True)
        self.shared_experts = shared_experts
        self.shared_expert_gate = shared_expert_gate

    @classmethod
    def from_config(
        cls, d_model: int, cfg: MoEConfig, dispatcher: TokenDispatcher | None = None, *, num_tasks: int = 1,
        num_attributes: int | None = None,
    ) -> MoELayer:
        """The layer `cfg` describes. num_tasks, num_attributes: what task-conditional routers gate
        over (see moe_engine.routers.build_any_router); plain routers ignore them."""
        shared = gate = None
        if cfg.num_shared_experts:
            shared = MLP(d_model, cfg.num_shared_experts * cfg.ffn_hidden, cfg.activation)
            gate = nn.Linear(d_model, 1, bias=False) if cfg.shared_expert_gate else None
        # Under expert parallelism this process builds only the experts its dispatcher routes to it.
        num_local = dispatcher.num_local_experts if dispatcher is not None else cfg.num_experts
        return cls(
            router=build_any_router(d_model, cfg.num_experts, cfg.router, num_tasks=num_tasks, num_attributes=num_attributes),
            experts=GroupedExperts(num_local, d_model, cfg.ffn_hidden, cfg.activation, cfg.experts_impl,
                                   recompute=cfg.recompute_experts),
            dispatcher=dispatcher,
            shared_experts=shared,
            shared_expert_gate=gate,
        )

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None, routing: Routing | None = None) -> MoEOutput:
        """x: (..., D), any leading shape; ctx fields are per token of the flattened input.

        routing: a decision made elsewhere for these tokens (e.g. Conditional MoE's FFN reusing the
        attention MoE's routing); the layer's own router is then skipped and the returned aux_loss
        is 0, since the routing's own was counted where it was made.
        """
        x_TD = x.reshape(-1, x.shape[-1])
        own_routing = routing is None
        # The record_function ranges name the MoE phases for `moe-engine profile` (inert without a profiler).
        if own_routing:
            with record_function("moe::router"):
                routing = self.router(x_TD, ctx)
        elif routing.experts_TK.shape[0] != x_TD.shape[0] or routing.num_experts != self.dispatcher.num_experts:
            raise ValueError(
                f"routing for {routing.experts_TK.shape[0]} tokens over {routing.num_experts} experts given to a "
                f"layer of {self.dispatcher.num_experts} experts with {x_TD.shape[0]} tokens"
            )
        if getattr(self.dispatcher, "num_chunks", 1) > 1:
            # The dispatcher overlaps its exchanges with the experts' compute, chunk by chunk.
            y_TD, tokens_per_expert_E = self.dispatcher.dispatch_compute_combine(x_TD, routing, self.experts)
        else:
            with record_function("moe::permute"):
                x_ND, tokens_per_expert_E, meta = self.dispatcher.dispatch(x_TD, routing)
            # Dispatchers that can fuse the experts with their combine say so with `experts_and_combine`.
            run = getattr(self.dispatcher, "experts_and_combine", None)
            if run is None:
                run = functools.partial(experts_then_combine, self.dispatcher)
            y_TD = run(self.experts, x_ND, tokens_per_expert_E, meta)
        if self.shared_experts is not None:
            shared_TD = self.shared_experts(x_TD)
            if self.shared_expert_gate is not None:
                shared_TD = torch.sigmoid(shared_expert_gate_logits(self.shared_expert_gate, x_TD)) * shared_TD
            y_TD = y_TD + shared_TD
        aux_loss = routing.aux_loss if own_routing else torch.zeros_like(routing.aux_loss)
        return MoEOutput(y_TD.view(x.shape).to(x.dtype), aux_loss, tokens_per_expert_E.detach(), routing)
