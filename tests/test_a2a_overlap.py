"""Chunked, overlapped all-to-all (`AllToAllDispatcher(num_chunks=n).dispatch_compute_combine`) on CPU
ranks (gloo) against the one-exchange dispatcher (num_chunks=1) on the same ranks and tokens.

In fp64 the outputs and the gradients of the input, the router and the experts must agree to
rtol 1e-12: chunking changes only the order in which expert weight gradients are summed. The byte
count of the exchanges must be the same, in 4 * n exchanges instead of 4. Edge cases: T smaller
than n (empty chunks), T = 0 on one rank, every token on one expert (the other experts get no rows
anywhere), capacity with uneven and with fixed splits, two chunked layers in a row (the backward
exchanges of both must pair up across ranks), and a forward without autograd. By default the routing
weights travel with each chunk's rows and the experts apply them (`weights_to_experts`); the cases
with weights_to_experts=False weight the returned rows in the combine instead.
"""

from __future__ import annotations

import pytest
import torch

from distributed import run_ranks
from moe_engine.config import MoEConfig, RouterConfig
from moe_engine.layer import MoELayer
from moe_engine.parallel import AllToAllDispatcher, build_parallel_groups

D, F, E, K, T_PER_RANK = 16, 16, 8, 2, 12
TIGHT = dict(rtol=1e-12, atol=1e-13)


def _layer(capacity_factor: float | None, skew: str, dispatcher: AllToAllDispatcher) -> MoELayer:
    router = RouterConfig(top_k=K, aux_loss_coef=0.0, z_loss_coef=0.0, capacity_factor=capacity_factor)
    torch.manual_seed(3)  # the same router and experts on every rank; each rank keeps its experts
    layer = MoELayer.from_config(D, MoEConfig(num_experts=E, ffn_hidden=F, router=router), dispatcher).double()
    if skew == "one_expert":
        with torch.no_grad():
            layer.router.weight[:, 0] = 0.0
            layer.router.weight[5, 0] = 1.0
    return layer


def _tokens(rank: int, num_tokens: int, skew: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(num_tokens, D, generator=g, dtype=torch.float64)
    if skew == "one_expert":
        x[:, 0] = 50.0  # with the router weight above, expert 5 is every token's first choice
    return x, torch.randn(num_tokens, D, generator=g, dtype=torch.float64)


def _forward_backward(layers: list[MoELayer], dispatcher: AllToAllDispatcher, x: torch.Tensor, grad_y: torch.Tensor):
    """y, tokens per local expert (of the first layer) and the gradients of x and every parameter."""
    x = x.clone().requires_grad_()
    h, tokens_L = x, None
    for layer in layers:
        h, counts_L = dispatcher.dispatch_compute_combine(h, layer.router(h, None), layer.experts)
        tokens_L = counts_L if tokens_L is None else tokens_L
    params = [x, *(p for layer in layers for p in (layer.router.weight, layer.experts.w_in, layer.experts.w_out))]
    grads = torch.autograd.grad((h * grad_y).sum(), params)
    return h.detach(), tokens_L, grads


def _counted(fn, calls: list):
    def counted(*args):
        calls.append(1)
        return fn(*args)
    return counted


def _check_case(rank: int, groups, num_chunks: int, case: dict) -> None:
    capacity_factor, fixed, skew = case.get("capacity"), case.get("fixed", False), case.get("skew", "none")
    num_tokens = case.get("tokens", {}).get(rank, T_PER_RANK)
    to_experts = case.get("weights_to_experts", True)
    one = AllToAllDispatcher(E, groups.ep_group, fixed_splits=fixed, weights_to_experts=to_experts)
    chunked = AllToAllDispatcher(E, groups.ep_group, fixed_splits=fixed, num_chunks=num_chunks,
                                 weights_to_experts=to_experts)
    layers = [_layer(capacity_factor, skew, one) for _ in range(case.get("layers", 1))]
    x, grad_y = _tokens(rank, num_tokens, skew)

    y_one, tokens_one, grads_one = _forward_backward(layers, one, x, grad_y)
    scored_calls = []
    for layer in layers:  # count the chunks whose experts applied the routing weights themselves
        layer.experts.forward_scored = _counted(layer.experts.forward_scored, scored_calls)
    y, tokens_L, grads = _forward_backward(layers, chunked, x, grad_y)
    for layer in layers:
        del layer.experts.forward_scored
    where = f"rank {rank}, EP {groups.ep_size}, num_chunks {num_chunks}, {case}"
    assert len(scored_calls) == (num_chunks * len(layers) if to_experts else 0), where
    torch.testing.assert_close(y, y_one, **TIGHT, msg=lambda m: f"{where}: y\n{m}")
    assert torch.equal(tokens_L, tokens_one), where
    names = ["x", *(f"layer {i} {n}" for i in range(len(layers)) for n in ("router", "w_in", "w_out"))]
    for name, got, expected in zip(names, grads, grads_one, strict=True):
        torch.testing.assert_close(got, expected, **TIGHT, msg=lambda m: f"{where}: grad of {name}\n{m}")
    # Every rank meters its exchanges, one sending no rows too (offrank_bytes sizes rows from the shape).
    stats, reference = chunked.traffic.read_and_reset(), one.traffic.read_and_reset()
    assert (stats["bytes_sent"], stats["bytes_received"]) == (reference["bytes_sent"], reference["bytes_received"]), where
    assert stats["calls"] == num_chunks * reference["calls"] == 4 * num_chunks * len(layers), where
    with torch.no_grad():  # no autograd graph: the waits happen in the forward alone
        y_no_grad, _ = chunked.dispatch_compute_combine(x, layers[0].router(x, None), layers[0].experts)
        expected, _ = one.dispatch_compute_combine(x, layers[0].router(x, None), layers[0].experts)
    torch.testing.assert_close(y_no_grad, expected, **TIGHT)


CASES = [
    {},  # dropless, T = 12 per rank: chunks of 6 / 4
    {"skew": "one_expert"},  # all tokens on one expert: most (rank, chunk, expert) blocks are empty
    {"tokens": {0: 2, 1: 1}},  # T < num_chunks: some chunks hold no tokens
    {"tokens": {1: 0}},  # a rank without tokens still takes part in every exchange
    {"capacity": 1.0},  # capacity drops choices; uneven splits
    {"capacity": 0.5, "fixed": True},  # fixed splits: chunks of capacity slots
    {"layers": 2},  # two chunked layers: their backward exchanges pair up in order on every rank
    {"weights_to_experts": False},  # the rows come back unweighted and the combine weights them
    {"capacity": 0.5, "fixed": True, "weights_to_experts": False},
]


def _all_cases(rank: int, world_size: int, ep_size: int) -> None:
    torch.set_num_threads(1)  # tiny shapes: more threads per rank only contend
    groups = build_parallel_groups(ep_size, E)
    for num_chunks in (2, 3):
        for case in CASES:
            _check_case(rank, groups, num_chunks, case)


@pytest.mark.parametrize("world_size, ep_size", [(2, 2), (4, 4)], ids=["ep2", "ep4"])
def test_chunked_exchange_matches_one_exchange(world_size: int, ep_size: int) -> None:
    run_ranks(world_size, _all_cases, ep_size)


@pytest.mark.parametrize("num_chunks", [0, -1, 1.5, True])
def test_num_chunks_must_be_a_positive_int(num_chunks) -> None:
    with pytest.raises(ValueError, match=r"num_chunks = .*: must be an int >= 1"):
        AllToAllDispatcher(E, None, num_chunks=num_chunks)
