"""Build any router named by `moe.router.type`: the plain ones of moe_engine.routing and the
task-conditional ones of moe_engine.mtl.

This sits at the top of the package because it is the one place that knows both: routing/ may
not import mtl/ (mtl builds on routing), and the MoE layer should not care which family a router
comes from. Every router's forward is (x_TD, ctx) -> Routing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from moe_engine.routing import PLAIN_ROUTER_TYPES, ROUTER_TYPES, TASK_ROUTER_TYPES, build_router

if TYPE_CHECKING:
    from moe_engine.config import RouterConfig


def task_specific_router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The router parameters of `model` that serve one task each (per-task gates, task-level tables):
    those of every module with a `task_specific_parameters()` method, each once.

    Gradient-based loss weighting (PCGrad, MGDA, ...) compares the tasks' gradients on the parameters
    the tasks share; on these, task t's gradient lies in task t's rows only, which would add to the
    diagonal of the gradient Gram and to nothing else.
    """
    params: dict[int, nn.Parameter] = {}
    for module in model.modules():
        method = getattr(module, "task_specific_parameters", None)
        if callable(method):
            params.update((id(p), p) for p in method())
    return list(params.values())


def build_any_router(
    d_model: int, num_experts: int, cfg: RouterConfig, *, num_tasks: int = 1, num_attributes: int | None = None
) -> nn.Module:
    """The router `cfg.type` names.

    num_tasks: how many tasks task-conditional routers gate over (from the data).
    num_attributes: attributes per token that the model supplies in RoutingContext.attributes_TA
        (the attribute router); cfg.task.num_attributes, when set, must agree with it.
    """
    if cfg.type in PLAIN_ROUTER_TYPES:
        return build_router(d_model, num_experts, cfg)
    if cfg.type not in TASK_ROUTER_TYPES:
        raise ValueError(f"moe.router.type = {cfg.type!r}: allowed: {', '.join(ROUTER_TYPES)}")
    if num_tasks < 1:
        raise ValueError(f"num_tasks = {num_tasks}: task-conditional routers need >= 1 task")
    # Imported here: these modules build on moe_engine.layer, which imports this one.
    from moe_engine.mtl.attribute_router import AttributeRouter
    from moe_engine.mtl.dselect_k import DSelectKRouter
    from moe_engine.mtl.gates import TaskGateRouter
    from moe_engine.mtl.task_level import TaskLevelRouter

    task = cfg.task
    balance = cfg.aux_loss_type if cfg.aux_loss_coef > 0 else "none"
    if cfg.type in ("task_gate", "mod_squad"):
        mod_squad = cfg.type == "mod_squad"
        return TaskGateRouter(
            d_model, num_experts, cfg.top_k, num_tasks,
            mode="per_task" if mod_squad else task.gate_mode,
            noise=task.noise,
            zero_init=mod_squad,
            score_epsilon=task.score_epsilon if mod_squad else 0.0,
            renormalize=cfg.renormalize,
            aux_loss=balance,
            aux_loss_coef=cfg.aux_loss_coef,
            mi_loss_coef=task.mi_loss_coef,
            capacity_factor=cfg.capacity_factor,
            drop_policy=cfg.drop_policy,
        )
    if cfg.type == "attribute":
        count = task.num_attributes if task.num_attributes is not None else num_attributes
        if count is None:
            raise ValueError("moe.router.type = 'attribute' needs moe.router.task.num_attributes (this model supplies none)")
        if num_attributes is not None and count != num_attributes:
            raise ValueError(
                f"moe.router.task.num_attributes = {count}: this model gives each token {num_attributes} attributes; "
                "set it to that, or null"
            )
        return AttributeRouter(
            d_model, num_experts, count, cfg.top_k,
            attribute_dim=task.attribute_dim,
            use_tokens=task.attribute_with_tokens,
            noise_std=1.0 / num_experts if task.noise == "fixed" else 0.0,
            renormalize=cfg.renormalize,
            aux_loss_coef=cfg.aux_loss_coef if balance == "switch" else 0.0,
            capacity_factor=cfg.capacity_factor,
            drop_policy=cfg.drop_policy,
        )
    if cfg.type == "dselect_k":
        return DSelectKRouter(
            d_model, num_experts, cfg.top_k, num_tasks, gamma=task.gamma, entropy_coef=task.entropy_coef,
            gate=task.dselect_gate,
        )
    return TaskLevelRouter(d_model, num_experts, cfg.top_k, num_tasks, gate=task.task_level_gate,
                           renormalize=cfg.renormalize)
