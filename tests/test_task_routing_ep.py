"""Every router type through the all-to-all dispatcher (gloo, CPU) equals the single-process layer.

Each rank holds the whole (replicated) router and E/P experts and routes its own slice of the
tokens, with that slice's task ids and token attributes. The reference is the single-process
layer on each slice in turn. Routers run in eval mode (their training noise would draw different
random numbers per rank) and with their batch-statistic losses off (those are per-rank statistics
by design); everything else, including the sparse DSelect-k routing with dropped choices, must
match in outputs and in the gradients of the input, the router and the experts.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distributed import run_ranks
from moe_engine.config import MoEConfig, RouterConfig, TaskRoutingConfig
from moe_engine.layer import MoELayer
from moe_engine.parallel import AllToAllDispatcher, build_parallel_groups
from moe_engine.routing import ROUTER_TYPES, RoutingContext

D, F, E, K, T_PER_RANK, NUM_TASKS, NUM_ATTRIBUTES = 12, 10, 8, 2, 11, 3, 5


def _config(router_type: str) -> MoEConfig:
    task = TaskRoutingConfig(score_epsilon=1e-3, mi_loss_coef=0.0, entropy_coef=0.0, attribute_with_tokens=True)
    router = RouterConfig(type=router_type, top_k=K, aux_loss_coef=0.0, z_loss_coef=0.0, task=task)
    return MoEConfig(num_experts=E, ffn_hidden=F, router=router)


def _inputs(world_size: int):
    g = torch.Generator().manual_seed(11)
    T = world_size * T_PER_RANK
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    grad_y = torch.randn(T, D, generator=g, dtype=torch.float64)
    task_ids = torch.randint(0, NUM_TASKS, (T,), generator=g)
    attributes = (torch.rand(T, NUM_ATTRIBUTES, generator=g) < 0.5).double()
    return x, grad_y, task_ids, attributes


def _randomize(router: torch.nn.Module) -> None:
    # Zero-initialised gates (Mod-Squad, noisy top-k) would route every token alike: give them values.
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def _check_router(rank: int, world_size: int, ep_size: int, router_type: str) -> None:
    cfg = _config(router_type)
    groups = build_parallel_groups(ep_size, E)
    torch.manual_seed(3)
    ref = MoELayer.from_config(D, cfg, num_tasks=NUM_TASKS, num_attributes=NUM_ATTRIBUTES).double().eval()
    _randomize(ref.router)
    x, grad_y, task_ids, attributes = _inputs(world_size)

    def ctx(rows: slice) -> RoutingContext:
        return RoutingContext(task_ids_T=task_ids[rows], attributes_TA=attributes[rows])

    ref_x = x.clone().requires_grad_()
    expected = {}
    for r in range(world_size):
        rows = slice(r * T_PER_RANK, (r + 1) * T_PER_RANK)
        out = ref(ref_x[rows], ctx(rows))
        (out.y * grad_y[rows]).sum().backward()
        expected[r] = out.y.detach()

    dispatcher = AllToAllDispatcher(E, groups.ep_group)
    layer = MoELayer.from_config(D, cfg, dispatcher, num_tasks=NUM_TASKS, num_attributes=NUM_ATTRIBUTES).double().eval()
    local = list(dispatcher.local_expert_ids)
    with torch.no_grad():
        layer.router.load_state_dict(ref.router.state_dict())
        layer.experts.w_in.copy_(ref.experts.w_in[local])
        layer.experts.w_out.copy_(ref.experts.w_out[local])
    rows = slice(rank * T_PER_RANK, (rank + 1) * T_PER_RANK)
    x_local = x[rows].clone().requires_grad_()
    out = layer(x_local, ctx(rows))
    (out.y * grad_y[rows]).sum().backward()

    tol = dict(rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(out.y, expected[rank], **tol, msg=lambda m: f"{router_type}: output: {m}")
    torch.testing.assert_close(x_local.grad, ref_x.grad[rows], **tol, msg=lambda m: f"{router_type}: grad x: {m}")
    for (name, p), ref_p in zip(layer.router.named_parameters(), ref.router.parameters()):
        grad = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(grad, group=groups.dp_group)
        expected_grad = ref_p.grad if ref_p.grad is not None else torch.zeros_like(ref_p)
        torch.testing.assert_close(grad, expected_grad, **tol, msg=lambda m: f"{router_type}: grad router.{name}: {m}")
    for name in ("w_in", "w_out"):
        grad = getattr(layer.experts, name).grad.clone()
        dist.all_reduce(grad, group=groups.edp_group)
        expected_grad = getattr(ref.experts, name).grad[local]
        torch.testing.assert_close(grad, expected_grad, **tol, msg=lambda m: f"{router_type}: grad experts.{name}: {m}")


def _check_all_routers(rank: int, world_size: int, ep_size: int) -> None:
    for router_type in ROUTER_TYPES:
        _check_router(rank, world_size, ep_size, router_type)


# World 4 with EP = 2 (two expert-data-parallel replicas) is slow here (about 25 s on 2 cores); the
# replica gradient reduction it adds is the generic one, which test_expert_parallel.py and
# test_distributed_training.py[ep2x2] check in CI.
@pytest.mark.parametrize("world_size, ep_size", [(2, 2), pytest.param(4, 2, marks=pytest.mark.slow)])
def test_every_router_type_matches_single_process_under_expert_parallelism(world_size: int, ep_size: int) -> None:
    run_ranks(world_size, _check_all_routers, ep_size)
