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
from moe_engine.routing.router import TopKRouter
from moe_engine.routing.types import Routing, RoutingContext

if TYPE_CHECKING:
    from torch import nn

    from moe_engine.config import RouterConfig

# The names `moe.router.type` accepts. Task-conditional routers (moe_engine.mtl) extend this.
ROUTER_TYPES = ("softmax_topk", "sigmoid_topk")


def build_router(d_model: int, num_experts: int, cfg: RouterConfig) -> nn.Module:
    """The router named by `cfg.type`; its forward is (x_TD, ctx) -> Routing."""
    if cfg.type in ("softmax_topk", "sigmoid_topk"):
        return TopKRouter.from_config(d_model, num_experts, cfg)
    raise ValueError(f"moe.router.type = {cfg.type!r}: allowed: {', '.join(ROUTER_TYPES)}")


__all__ = [
    "DROP_POLICIES",
    "ROUTER_TYPES",
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
