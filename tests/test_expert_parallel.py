"""Expert parallelism on CPU (gloo): the all-to-all dispatcher against the single-process layer.

Every rank holds the whole router and E/P experts and routes its own slice of the tokens. The
reference is the single-process layer applied to each rank's slice in turn (capacity is per
rank's tokens, as in GShard), so outputs must match per token, the input gradient per token, the
router gradient summed over all ranks, and each expert's gradient summed over its replicas
(the expert-data-parallel group). Aux losses are switched off: they are statistics of the local batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distributed import run_ranks
from moe_engine.config import MoEConfig, RouterConfig
from moe_engine.layer import MoELayer
from moe_engine.parallel import AllToAllDispatcher, build_parallel_groups, check_parallel_sizes
from moe_engine.parallel.runtime import bind_local_device

D, F, E, K, T_PER_RANK = 16, 16, 8, 2, 12


def _config(capacity_factor: float | None, drop_policy: str = "position") -> MoEConfig:
    return MoEConfig(
        num_experts=E, ffn_hidden=F,
        router=RouterConfig(top_k=K, aux_loss_coef=0.0, z_loss_coef=0.0, capacity_factor=capacity_factor, drop_policy=drop_policy),
    )


def _inputs(world_size: int, skew: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(world_size * T_PER_RANK, D, generator=g, dtype=torch.float64)
    if skew == "one_expert":
        # A dominant direction that the router weight below maps to expert 5 for every token.
        x[:, 0] = 50.0
    grad_y = torch.randn(world_size * T_PER_RANK, D, generator=g, dtype=torch.float64)
    return x, grad_y


def _reference_layer(cfg: MoEConfig, skew: str) -> MoELayer:
    torch.manual_seed(3)
    layer = MoELayer.from_config(D, cfg).double()
    if skew == "one_expert":
        with torch.no_grad():
            layer.router.weight[:, 0] = 0.0
            layer.router.weight[5, 0] = 1.0
    return layer


def _sharded_copy(ref: MoELayer, cfg: MoEConfig, dispatcher: AllToAllDispatcher) -> tuple[MoELayer, list[int]]:
    """(the layer of this rank under `dispatcher`, in ref's dtype and with ref's weights; its experts' global ids)."""
    layer = MoELayer.from_config(D, cfg, dispatcher).to(ref.router.weight.dtype)
    local = list(dispatcher.local_expert_ids)
    with torch.no_grad():
        layer.router.weight.copy_(ref.router.weight)
        layer.experts.w_in.copy_(ref.experts.w_in[local])
        layer.experts.w_out.copy_(ref.experts.w_out[local])
    return layer, local


def _check_rank(rank: int, world_size: int, groups, capacity_factor, fixed_splits: bool, skew: str) -> None:
    cfg = _config(capacity_factor)
    ref = _reference_layer(cfg, skew)
    x, grad_y = _inputs(world_size, skew)
    # Reference: each rank's slice through the single-process layer, gradients summed over slices.
    ref_x = x.clone().requires_grad_()
    for r in range(world_size):
        rows = slice(r * T_PER_RANK, (r + 1) * T_PER_RANK)
        (ref(ref_x[rows]).y * grad_y[rows]).sum().backward()

    dispatcher = AllToAllDispatcher(E, groups.ep_group, fixed_splits=fixed_splits)
    layer, local = _sharded_copy(ref, cfg, dispatcher)
    rows = slice(rank * T_PER_RANK, (rank + 1) * T_PER_RANK)
    x_local = x[rows].clone().requires_grad_()
    out = layer(x_local)
    (out.y * grad_y[rows]).sum().backward()

    expected_y = ref(x[rows]).y
    torch.testing.assert_close(out.y, expected_y, rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(x_local.grad, ref_x.grad[rows], rtol=1e-5, atol=1e-10)
    # Replicated router: its gradient is summed over the data-parallel group (all ranks).
    router_grad = layer.router.weight.grad.clone()
    dist.all_reduce(router_grad, group=groups.dp_group)
    torch.testing.assert_close(router_grad, ref.router.weight.grad, rtol=1e-5, atol=1e-10)
    # Sharded experts: summed over the ranks holding the same experts.
    for name in ("w_in", "w_out"):
        grad = getattr(layer.experts, name).grad.clone()
        dist.all_reduce(grad, group=groups.edp_group)
        torch.testing.assert_close(grad, getattr(ref.experts, name).grad[local], rtol=1e-5, atol=1e-10)
    if capacity_factor is None:
        _check_traffic(dispatcher, out.routing.experts_TK, groups)
    if fixed_splits:
        # Evaluation: without grad, ranks may route different token counts (a split's ragged last
        # batch), so their capacities differ: the dispatcher exchanges counts instead of fixed splits.
        ragged = x[rows][: T_PER_RANK - 4 * rank]  # 12, 8, 4, 0 rows: capacities differ
        with torch.no_grad():
            torch.testing.assert_close(layer(ragged).y, ref(ragged).y, rtol=1e-5, atol=1e-10)
        dispatcher.traffic.read_and_reset()
    if skew == "one_expert":
        # Every token chose expert 5 first: dropless, its rank gets all of them; with capacity C it keeps C.
        kept_on_5 = int((out.routing.experts_TK == 5).sum())
        assert kept_on_5 == (T_PER_RANK if capacity_factor is None else min(T_PER_RANK, out.routing.capacity))


def _check_traffic(dispatcher: AllToAllDispatcher, experts_TK: torch.Tensor, groups) -> None:
    """Bytes crossing ranks in forward + backward, from the routing of every rank of the EP group.

    Rows this rank sends off-rank (S) go out in the dispatch and come back in the combine; rows it
    receives from other ranks (R) come in and go back. Backward repeats both, reversed, so each
    direction moves 2 * (S + R) rows of D float64 values.
    """
    all_experts = [torch.empty_like(experts_TK) for _ in range(groups.ep_size)]
    dist.all_gather(all_experts, experts_TK, group=groups.ep_group)
    mine = torch.tensor(list(dispatcher.local_expert_ids))
    sent = int((~torch.isin(experts_TK, mine)).sum())
    received = sum(int(torch.isin(e, mine).sum()) for r, e in enumerate(all_experts) if r != groups.ep_rank)
    stats = dispatcher.traffic.read_and_reset()
    expected = 2 * (sent + received) * D * 8
    assert stats["bytes_sent"] == expected and stats["bytes_received"] == expected, (stats, expected)
    assert stats["calls"] == 4 and stats["seconds"] >= 0.0


def _all_cases(rank: int, world_size: int, ep_sizes: tuple[int, ...]) -> None:
    for ep_size in ep_sizes:
        groups = build_parallel_groups(ep_size, E)  # once per size: every gloo group costs a rendezvous
        for capacity_factor, fixed_splits in ((None, False), (1.0, False), (0.5, True), (1.25, True)):
            for skew in ("none", "one_expert"):
                _check_rank(rank, world_size, groups, capacity_factor, fixed_splits, skew)


@pytest.mark.parametrize(
    "world_size, ep_sizes",
    [
        (2, (1, 2)),  # EP=1 (pure data parallel through the all-to-all path) and EP=2
        (4, (2, 4)),  # EP=2 with two expert-data-parallel replicas, and EP=4
    ],
)
def test_all_to_all_matches_single_process(world_size: int, ep_sizes: tuple[int, ...]) -> None:
    run_ranks(world_size, _all_cases, ep_sizes)


def _triton_case(rank: int, world_size: int) -> None:
    """EP=2 on the Triton kernels (interpreted), fp32: the routing weights with the rows (the experts scale
    their outputs, the weight gradient comes from their backward GEMM) or applied on return; both against
    the single-process layer, and what each keeps for the backward."""
    import os

    from moe_engine.bench.saved import saved_bytes

    os.environ["MOE_ENGINE_KERNELS"] = "triton"
    groups = build_parallel_groups(world_size, E)
    rows = slice(rank * T_PER_RANK, (rank + 1) * T_PER_RANK)
    for capacity_factor, fixed_splits in ((None, False), (1.0, True)):
        cfg = _config(capacity_factor)
        torch.manual_seed(3)  # the same reference layer on every rank
        ref = MoELayer.from_config(D, cfg).float()  # single process, Triton kernels
        x, grad_y = (t.float() for t in _inputs(world_size, "none"))
        ref_x = x.clone().requires_grad_()
        for r in range(world_size):
            part = slice(r * T_PER_RANK, (r + 1) * T_PER_RANK)
            ref_y = ref(ref_x[part]).y
            (ref_y * grad_y[part]).sum().backward()
            if r == rank:
                expected_y = ref_y.detach()
        saved = {}
        for weights_to_experts in (False, True):
            dispatcher = AllToAllDispatcher(E, groups.ep_group, fixed_splits=fixed_splits,
                                            weights_to_experts=weights_to_experts)
            layer, local = _sharded_copy(ref, cfg, dispatcher)
            assert layer.experts.resolve_impl(x.device, torch.float32) == "triton"
            x_local = x[rows].clone().requires_grad_()
            outputs = []
            saved[weights_to_experts], _ = saved_bytes(lambda: outputs.append(layer(x_local)), [x_local, *layer.parameters()])
            (outputs[0].y * grad_y[rows]).sum().backward()
            where = f"capacity {capacity_factor}, weights_to_experts {weights_to_experts}"
            torch.testing.assert_close(outputs[0].y, expected_y, rtol=1e-5, atol=1e-5, msg=where)
            torch.testing.assert_close(x_local.grad, ref_x.grad[rows], rtol=1e-5, atol=1e-5, msg=where)
            router_grad = layer.router.weight.grad.clone()
            dist.all_reduce(router_grad, group=groups.dp_group)
            torch.testing.assert_close(router_grad, ref.router.weight.grad, rtol=1e-4, atol=1e-5, msg=where)
            for name in ("w_in", "w_out"):
                grad = getattr(layer.experts, name).grad
                torch.testing.assert_close(grad, getattr(ref.experts, name).grad[local], rtol=1e-4, atol=1e-5, msg=where)
        # Weighting on return keeps the returned rows (N, D) for the weight gradient; the experts weighting
        # their own outputs keep a float per row instead.
        returned_bytes = T_PER_RANK * K * D * 4
        assert returned_bytes // 2 < saved[False] - saved[True] <= returned_bytes, (saved, capacity_factor)


def test_triton_experts_under_expert_parallelism_take_the_weights_with_the_rows() -> None:
    run_ranks(2, _triton_case)


@pytest.mark.parametrize(
    "world, ep, experts, message",
    [
        (4, 3, 6, r"expert_parallel_size = 3 does not divide the world size 4; .*: \[1, 2\]"),
        (4, 4, 6, r"expert_parallel_size = 4 does not divide num_experts 6; .*: \[1, 2\]"),
        (2, 0, 8, "expert_parallel_size = 0: must be >= 1"),
    ],
)
def test_invalid_parallel_sizes_are_refused(world: int, ep: int, experts: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_parallel_sizes(world, ep, experts)


def test_each_launched_rank_binds_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """NCCL, Triton's launches and CUDA events use the current device: rank k must make it GPU k."""
    bound: list[int] = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert bind_local_device("cuda") == 3 and bound == [3]
    assert bind_local_device("cpu") == 3 and bound == [3]  # CPU ranks bind nothing
    monkeypatch.setenv("LOCAL_RANK", "4")
    with pytest.raises(ValueError, match=r"LOCAL_RANK = 4: this node has 4 CUDA device\(s\), so local ranks 0..3"):
        bind_local_device("cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # train.device = cuda on a machine without one
    with pytest.raises(ValueError, match=r"train.device = 'cuda': no CUDA device is available here; use 'auto' or 'cpu'"):
        bind_local_device("cuda")


def test_rank_imbalance_is_measured_per_replica() -> None:
    from moe_engine.parallel.telemetry import load_imbalance

    # World 4, EP 2, E 4: replica 0 routes its 16 rows to EP rank 0's experts, replica 1 to EP rank 1's.
    # Ranks compute 16, 0, 0, 16 rows (max / mean 2), though the summed counts look balanced.
    counts_RLE = torch.tensor([[[10.0, 6.0, 0.0, 0.0]], [[0.0, 0.0, 8.0, 8.0]]])
    stats = load_imbalance(counts_RLE, ep_size=2)
    assert stats["rank_imbalance"] == pytest.approx(2.0)
    assert stats["expert_imbalance"] == pytest.approx(10.0 / 8.0)  # the whole batch: 10, 6, 8, 8
    # One replica, (L, E) counts: two layers averaged.
    stats = load_imbalance(torch.tensor([[4.0, 4.0, 4.0, 4.0], [8.0, 0.0, 0.0, 8.0]]), ep_size=2)
    assert stats["rank_imbalance"] == pytest.approx(1.0) and stats["expert_imbalance"] == pytest.approx(1.5)
