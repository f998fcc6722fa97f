"""Tests of moe_engine.mtl.adaptive_k.AdaptiveTopK: the per-task k schedule of AdaMV-MoE.

Each trajectory below is worked out by hand from the rule in the module docstring (first loss: the
baseline; an improvement beyond the tolerance lowers k by 1; `patience` validations without one
raise it by 1; k stays in [k_min, k_max]).
"""

from __future__ import annotations

import math

import pytest
import torch

from moe_engine.mtl.adaptive_k import AdaptiveTopK
from moe_engine.mtl.gates import TaskGateRouter
from moe_engine.routing import RoutingContext


def make(num_tasks=1, top_k=4, num_experts=6, **kwargs):
    router = TaskGateRouter(8, num_experts, top_k, num_tasks)
    return router, AdaptiveTopK(router, **kwargs)


def trajectory(controller, losses, task=0):
    return [controller.update({task: loss})[task] for loss in losses]


def test_documented_example():
    router, controller = make(patience=2)
    ks = trajectory(controller, [1.0, 0.9, 0.8, 0.85, 0.84, 0.83, 0.7])
    assert ks == [4, 3, 2, 2, 3, 3, 2]
    assert router.task_top_k_X.tolist() == [2]


@pytest.mark.parametrize(
    "kwargs, losses, expected",
    [
        # Steady improvement walks k down to k_min and holds it there.
        ({}, [5.0, 4.0, 3.0, 2.0, 1.0, 0.5], [4, 3, 2, 1, 1, 1]),
        ({"k_min": 2}, [5.0, 4.0, 3.0, 2.0, 1.0], [4, 3, 2, 2, 2]),
        # patience 1: every stalled validation raises k, up to k_max.
        ({}, [1.0, 0.5, 0.4, 0.6, 0.6, 0.6, 0.6], [4, 3, 2, 3, 4, 4, 4]),
        ({"k_max": 3}, [1.0, 0.5, 0.4, 0.6, 0.6, 0.6], [3, 2, 1, 2, 3, 3]),
        # patience 3: a rise needs three stalls in a row; an improvement resets the count.
        ({"patience": 3}, [1.0, 0.9, 0.95, 0.95, 0.8, 0.9, 0.9, 0.9, 0.9], [4, 3, 3, 3, 2, 2, 2, 3, 3]),
        # A loss equal to the best is no improvement; best stays at the lowest improving loss.
        ({}, [1.0, 1.0, 0.99, 0.995], [4, 4, 3, 4]),
        # Relative tolerance 0.1: 0.95 is within 10% of 1.0 (a stall), 0.85 beats it.
        ({"tolerance": 0.1}, [1.0, 0.95, 0.85, 0.8, 0.76], [4, 4, 3, 4, 3]),
        # Negative losses: the margin is relative to |best|.
        ({"tolerance": 0.1}, [-1.0, -1.05, -1.2], [4, 4, 3]),
    ],
)
def test_trajectories(kwargs, losses, expected):
    router, controller = make(**kwargs)
    assert trajectory(controller, losses) == expected
    assert router.task_top_k_X.tolist() == [expected[-1]]


def test_non_finite_losses_stall_and_never_become_the_baseline():
    _, controller = make(patience=1)
    # NaN first: a stall, raising nothing past k_max; then 1.0 is the baseline, inf a stall.
    assert trajectory(controller, [math.nan, 1.0, 0.5, math.inf, math.nan, 0.4]) == [4, 4, 3, 4, 4, 3]
    assert controller.best == [0.4]


def test_tasks_move_independently_and_router_follows():
    router, controller = make(num_tasks=3, top_k=3, patience=1)
    assert controller.update([1.0, 1.0, 1.0]) == {0: 3, 1: 3, 2: 3}
    assert controller.update([0.5, 1.5, 0.9]) == {0: 2, 1: 3, 2: 2}
    assert controller.update({0: 0.4, 2: 0.95}) == {0: 1, 1: 3, 2: 3}  # task 1 not validated: unchanged
    assert controller.update((0.45, 0.9, 0.8)) == {0: 2, 1: 2, 2: 2}
    assert router.task_top_k_X.tolist() == [2, 2, 2] and controller.k == {0: 2, 1: 2, 2: 2}
    assert controller.num_stalled == [0, 0, 0] and controller.best == [0.4, 0.9, 0.8]


def test_construction_clamps_the_router_into_bounds():
    router = TaskGateRouter(8, 6, 4, 2)
    router.set_task_top_k(1, 1)
    controller = AdaptiveTopK(router, k_min=2, k_max=3)
    assert router.task_top_k_X.tolist() == [3, 2] and controller.k == {0: 3, 1: 2}


def test_router_routes_with_the_new_k():
    torch.manual_seed(0)
    router, controller = make(num_tasks=2, top_k=3, num_experts=5)
    controller.update([1.0, 1.0])
    controller.update([0.5, 2.0])  # task 0 improves: k 3 -> 2; task 1 stalls at k_max
    task_ids_T = torch.tensor([0, 1, 0, 1, 1])
    routing = router(torch.randn(5, 8), RoutingContext(task_ids_T=task_ids_T))
    assert (routing.experts_TK >= 0).sum(-1).tolist() == [2, 3, 2, 3, 3]
    assert routing.capacity == 5


def test_state_dict_resumes_the_same_schedule():
    losses = [[1.0, 2.0], [0.9, 2.1], [0.95, 2.2], [0.96, 1.9], [0.8, 1.95], [0.85, 1.9], [0.7, 1.8]]
    _, straight = make(num_tasks=2, patience=2, tolerance=0.01)
    expected = [straight.update(step) for step in losses]

    router, first = make(num_tasks=2, patience=2, tolerance=0.01)
    got = [first.update(step) for step in losses[:3]]
    state = first.state_dict()
    model_state = router.state_dict()
    resumed_router = TaskGateRouter(8, 6, 4, 2)
    resumed_router.load_state_dict(model_state)
    resumed = AdaptiveTopK(resumed_router, patience=2, tolerance=0.01)
    resumed.load_state_dict(state)
    got += [resumed.update(step) for step in losses[3:]]
    assert got == expected
    assert resumed_router.task_top_k_X.tolist() == list(expected[-1].values())
    # The controller's own state wins over the router's buffer it is handed.
    fresh_router = TaskGateRouter(8, 6, 4, 2)
    AdaptiveTopK(fresh_router, patience=2).load_state_dict(state)
    assert fresh_router.task_top_k_X.tolist() == state["task_k"]


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k_min": 0}, r"k_min = 0: must be in \[1, router.top_k = 4\]"),
        ({"k_min": 5}, r"k_min = 5"),
        ({"k_max": 5}, r"k_max = 5: must be in \[k_min = 1, router.top_k = 4\]"),
        ({"k_min": 3, "k_max": 2}, r"k_max = 2: must be in \[k_min = 3"),
        ({"patience": 0}, r"patience = 0: must be >= 1"),
        ({"tolerance": -0.1}, r"tolerance = -0.1: must be >= 0"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveTopK(TaskGateRouter(8, 6, 4, 2), **kwargs)


def test_router_type_error():
    with pytest.raises(ValueError, match="router = Linear: expected a TaskGateRouter"):
        AdaptiveTopK(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "losses, match",
    [
        ([1.0], r"val_losses has 1 losses: expected one per task \(2\)"),
        ({2: 1.0}, r"val_losses has task 2: tasks are ints in \[0, 1\]"),
        ({"a": 1.0}, r"val_losses has task 'a'"),
        ({True: 1.0}, r"val_losses has task True"),
        ("12", r"val_losses = str: expected a mapping"),
    ],
)
def test_update_errors_change_nothing(losses, match):
    router, controller = make(num_tasks=2)
    controller.update([1.0, 1.0])
    before = controller.state_dict()
    with pytest.raises(ValueError, match=match):
        controller.update(losses)
    assert controller.state_dict() == before and router.task_top_k_X.tolist() == [4, 4]


@pytest.mark.parametrize(
    "state, match",
    [
        ({"best": [None, None], "task_k": [1, 1]}, r"AdaptiveTopK state lacks num_stalled"),
        ({"best": [None], "num_stalled": [0], "task_k": [1]}, r"state 'best' has 1 entries: expected 2"),
        (
            {"best": [None, None], "num_stalled": [0, 0], "task_k": [1, 5]},
            r"task_k = \[1, 5\]: each must be in \[k_min = 1, k_max = 4\]",
        ),
    ],
)
def test_load_state_dict_errors(state, match):
    _, controller = make(num_tasks=2)
    with pytest.raises(ValueError, match=match):
        controller.load_state_dict(state)
