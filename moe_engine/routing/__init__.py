"""Routers: who computes which experts each token goes to, with what weight, and the aux losses."""

from __future__ import annotations

from typing import TYPE_CHECKING

from moe_engine.routing.capacity import DROP_POLICIES, drop_over_capacity, expert_capacity
from moe_engine.routing.losses import (
    importance_cv_squared,
    load_cv_squared,
    router_z_loss,
    sequence_load_balancing_loss,
    switch_load_balancing_loss,
)
from moe_engine.routing.expert_choice import ExpertChoiceRouter
from moe_engine.routing.noisy import NoisyTopKRouter
from moe_engine.routing.router import TopKRouter
from moe_engine.routing.types import Routing, RoutingContext

if TYPE_CHECKING:
    from torch import nn

    from moe_engine.config import RouterConfig

# The routers of this package, which need nothing but the tokens.
PLAIN_ROUTER_TYPES = ("softmax_topk", "sigmoid_topk", "noisy_topk", "expert_choice")
# The task-conditional routers of moe_engine.mtl (built by moe_engine.routers.build_any_router).
TASK_ROUTER_TYPES = ("task_gate", "mod_squad", "attribute", "dselect_k", "task_level")
# The names `moe.router.type` accepts.
ROUTER_TYPES = PLAIN_ROUTER_TYPES + TASK_ROUTER_TYPES


def build_router(d_model: int, num_experts: int, cfg: RouterConfig) -> nn.Module:
    """The plain router named by `cfg.type`; its forward is (x_TD, ctx) -> Routing."""
    if cfg.type in ("softmax_topk", "sigmoid_topk"):
        return TopKRouter.from_config(d_model, num_experts, cfg)
    if cfg.type == "noisy_topk":
        return NoisyTopKRouter(
            d_model, num_experts, cfg.top_k, aux_loss_coef=cfg.aux_loss_coef if cfg.aux_loss_type != "none" else 0.0,
            capacity_factor=cfg.capacity_factor, drop_policy=cfg.drop_policy,
        )
    if cfg.type == "expert_choice":
        return ExpertChoiceRouter(d_model, num_experts, cfg.top_k, capacity_factor=cfg.capacity_factor)
    raise ValueError(f"moe.router.type = {cfg.type!r}: allowed here: {', '.join(PLAIN_ROUTER_TYPES)}")


__all__ = [
    "DROP_POLICIES",
    "ExpertChoiceRouter",
    "NoisyTopKRouter",
    "PLAIN_ROUTER_TYPES",
    "ROUTER_TYPES",
    "TASK_ROUTER_TYPES",
    "Routing",
    "RoutingContext",
    "TopKRouter",
    "build_router",
    "drop_over_capacity",
    "expert_capacity",
    "importance_cv_squared",
    "load_cv_squared",
    "router_z_loss",
    "sequence_load_balancing_loss",
    "switch_load_balancing_loss",
]
