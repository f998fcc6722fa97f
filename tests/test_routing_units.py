"""Unit tests of the small host-side pieces around routing: the router argument checks, the kernel
backend switch, `build_any_router` / `task_specific_router_parameters` (moe_engine.routers) and
`combine_task_losses` (moe_engine.task_loss) with an absent task."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from moe_engine.config import RouterConfig, TaskRoutingConfig
from moe_engine.kernels.backend import ENV_VAR, requested_backend, select_backend
from moe_engine.parallel.runtime import DistributedRun
from moe_engine.routers import build_any_router, task_specific_router_parameters
from moe_engine.routing import ExpertChoiceRouter, TopKRouter

# ---------------------------------------------------------------------------------------------
# Router arguments
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity_factor", [0.0, -1.0, math.inf, math.nan])
@pytest.mark.parametrize("router_class", [TopKRouter, ExpertChoiceRouter])
def test_routers_refuse_a_capacity_factor_that_is_not_positive_and_finite(router_class, capacity_factor):
    """capacity_factor 0 would give every expert capacity max(1, 0) = 1 (almost everything dropped):
    refused at construction like negative, infinite and NaN factors."""
    with pytest.raises(ValueError, match="capacity_factor = "):
        router_class(4, 4, 2, capacity_factor=capacity_factor)


# ---------------------------------------------------------------------------------------------
# Kernel backend switch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [("Torch", "torch"), (" TRITON ", "triton")])
def test_backend_env_value_is_case_and_space_insensitive(value, expected, monkeypatch):
    monkeypatch.setenv(ENV_VAR, value)
    assert requested_backend() == expected


def test_torch_backend_request_wins_on_cuda(monkeypatch):
    """MOE_ENGINE_KERNELS=torch forces the reference where the default would pick Triton (CUDA);
    a torch.device("cuda") object needs no GPU for this host-side decision."""
    monkeypatch.setenv(ENV_VAR, "torch")
    assert select_backend("op", torch.device("cuda"), has_triton=True) == "torch"


# ---------------------------------------------------------------------------------------------
# build_any_router and task_specific_router_parameters
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("router_type", ["task_gate", "mod_squad", "attribute", "dselect_k", "task_level"])
def test_task_routers_need_at_least_one_task(router_type):
    cfg = RouterConfig(type=router_type, top_k=2, task=TaskRoutingConfig(num_attributes=2))
    with pytest.raises(ValueError, match="num_tasks = 0"):
        build_any_router(8, 4, cfg, num_tasks=0)


def test_attribute_router_count_must_match_the_models():
    cfg = RouterConfig(type="attribute", top_k=2, task=TaskRoutingConfig(num_attributes=3))
    with pytest.raises(ValueError, match="num_attributes = 3: this model gives each token 2 attributes"):
        build_any_router(8, 4, cfg, num_tasks=2, num_attributes=2)
    assert build_any_router(8, 4, cfg, num_tasks=2, num_attributes=3) is not None
    assert build_any_router(8, 4, cfg, num_tasks=2) is not None  # the model supplies no count: the config's


def test_mod_squad_gates_start_at_zero_and_task_gates_do_not():
    torch.manual_seed(0)
    mod_squad = build_any_router(8, 4, RouterConfig(type="mod_squad", top_k=2), num_tasks=3)
    task_gate = build_any_router(8, 4, RouterConfig(type="task_gate", top_k=2), num_tasks=3)
    assert mod_squad.mode == task_gate.mode == "per_task"
    assert torch.count_nonzero(mod_squad.w_XED) == 0
    assert torch.count_nonzero(task_gate.w_XED) == task_gate.w_XED.numel()


def test_task_specific_router_parameters_finds_nested_routers_once():
    """Routers sit deep inside a model (blocks -> layer -> router), and one router can be shared by
    two blocks: every per-task gate is listed, each once."""
    shared = build_any_router(8, 4, RouterConfig(type="task_gate", top_k=2), num_tasks=3)
    other = build_any_router(8, 4, RouterConfig(type="task_gate", top_k=2), num_tasks=3)
    plain = build_any_router(8, 4, RouterConfig(top_k=2))
    model = nn.ModuleDict({
        "blocks": nn.ModuleList([nn.ModuleDict({"router": shared}), nn.ModuleDict({"router": shared}),
                                 nn.ModuleDict({"inner": nn.ModuleDict({"router": other})}),
                                 nn.ModuleDict({"router": plain})]),
    })
    params = task_specific_router_parameters(model)
    assert {id(p) for p in params} == {id(shared.w_XED), id(other.w_XED)} and len(params) == 2


# ---------------------------------------------------------------------------------------------
# combine_task_losses
# ---------------------------------------------------------------------------------------------


def _step(loss_sums: dict[str, torch.Tensor], counts: list[float]):
    from moe_engine.workloads.base import StepForward

    zero = torch.zeros(())
    return StepForward(loss_sums, torch.tensor(counts), zero, (), torch.zeros(0, dtype=torch.int64), 0, zero)


@pytest.mark.parametrize("absent_in_loss_sums", [False, True])
def test_combine_task_losses_with_an_absent_task(absent_in_loss_sums):
    """Task b has no example: it is not present, gets weight 0 and a finite share 0, whether the
    workload leaves it out of loss_sums or keeps it at a zero sum (DeepSpeed keeps every task)."""
    from moe_engine.mtl.weighting import build_weighting
    from moe_engine.task_loss import combine_task_losses

    w = torch.tensor(2.0, requires_grad=True)
    loss_sums = {"a": 6.0 * w, "c": 1.0 * w}
    if absent_in_loss_sums:
        loss_sums["b"] = 0.0 * w
    step = _step(loss_sums, [3.0, 0.0, 4.0])
    out = combine_task_losses(step, ["a", "b", "c"], build_weighting("equal", 3), [w], DistributedRun(0, 1, 0, None))
    assert out.present_T.tolist() == [True, False, True]
    assert out.weights_T[1] == 0 and out.weights_T[0] > 0 and out.weights_T[2] > 0
    torch.testing.assert_close(out.local_losses_T, torch.tensor([4.0, 0.0, 0.5]))
    torch.testing.assert_close(out.global_losses_T, out.local_losses_T)
    assert out.loss.isfinite()
    torch.testing.assert_close(out.loss, (out.weights_T * out.local_losses_T).sum())
