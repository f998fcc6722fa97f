"""Triton permute kernels (expert_order, permute, unpermute) against their torch references.

On CPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
expert_order and permute are exact (a sort and a gather), so they are compared bit for bit;
the combines accumulate in another order than index_add, so they are compared closely, forward
and every gradient. The whole MoELayer under MOE_ENGINE_KERNELS=triton is compared with =torch,
eagerly and under torch.compile.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from functorch.compile import make_boxed_func

from moe_engine.config import MoEConfig, RouterConfig
from moe_engine.kernels import ENV_VAR
from moe_engine.kernels.expert_order import _expert_order_configs, expert_order, expert_order_reference, expert_order_triton
from moe_engine.kernels.permute import (
    _combine_configs,
    _permute_configs,
    _gather_backward_configs,
    _unpermute_backward_configs,
    gather_backward_reference,
    gather_backward_triton,
    permute,
    permute_backward_triton,
    permute_reference,
    permute_triton,
    unpermute,
    unpermute_backward_triton,
    unpermute_reference,
    unpermute_triton,
)
from moe_engine.layer import MoELayer


def random_choices(num_tokens: int, top_k: int, num_experts: int, drop_fraction: float = 0.0,
                   hot_expert: int | None = None) -> torch.Tensor:
    """(T, K) int64: K distinct experts per token (or every choice on `hot_expert`), a fraction dropped (-1)."""
    if hot_expert is not None:
        experts_TK = torch.full((num_tokens, top_k), hot_expert, dtype=torch.int64)
    else:
        rows = [torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)]
        experts_TK = torch.stack(rows) if rows else torch.zeros(0, top_k, dtype=torch.int64)
    return experts_TK.masked_fill(torch.rand(num_tokens, top_k) < drop_fraction, -1)


# (T, K, E, drop fraction, hot expert), each row an edge case of the routing metadata.
ORDER_CASES = [
    (1, 1, 1, 0.0, None),  # T = 1, E = 1
    (5, 2, 4, 0.0, None),  # T*K < BLOCK_C: one partial block
    (64, 8, 16, 0.0, None),  # T*K = 512: several blocks of the default BLOCK_C = 128
    (13, 2, 7, 0.3, None),  # prime E, with dropped choices
    (9, 4, 4, 0.0, None),  # K = E: every expert gets every token
    (11, 1, 6, 0.0, 3),  # all tokens to one expert; the others get none
    (6, 2, 40, 0.0, None),  # most experts with no tokens (E > T*K)
    (6, 2, 4, 1.0, None),  # everything dropped: N = 0
    (0, 2, 4, 0.0, None),  # no tokens
    (24, 8, 256, 0.1, None),  # E = 256: buckets tiled over BLOCK_G, with drops
]


# small_blocks: several blocks of choices and several bucket tiles even at test sizes.
@pytest.mark.parametrize("config", [None, {"BLOCK_C": 32, "BLOCK_G": 16}], ids=["default", "small_blocks"])
@pytest.mark.parametrize("num_tokens, top_k, num_experts, drop_fraction, hot", ORDER_CASES)
def test_expert_order_matches_reference(num_tokens, top_k, num_experts, drop_fraction, hot, config):
    torch.manual_seed(0)
    experts_TK = random_choices(num_tokens, top_k, num_experts, drop_fraction, hot)
    num_choices = num_tokens * top_k
    # None counts the kept rows on the host; T*K is the dropless call (with drops, the reference then
    # keeps dropped choices after every expert, and so must the kernel); more than T*K is clamped.
    for num_rows in (None, num_choices, num_choices + 3):
        choice_N, tokens_per_expert_E, row_of_choice_C = expert_order_triton(experts_TK, num_experts, num_rows, config)
        ref_choice_N, ref_tokens_E = expert_order_reference(experts_TK, num_experts, num_rows)
        assert choice_N.dtype == tokens_per_expert_E.dtype == torch.int64
        assert torch.equal(choice_N, ref_choice_N)
        assert torch.equal(tokens_per_expert_E, ref_tokens_E)
        # Invariants: row_of_choice_C is the inverse permutation; -1 exactly where no row.
        num_rows_N = choice_N.numel()
        assert row_of_choice_C.shape == (num_choices,)
        assert torch.equal(row_of_choice_C[choice_N].long(), torch.arange(num_rows_N))
        assert int((row_of_choice_C >= 0).sum()) == num_rows_N
    kept = int((experts_TK >= 0).sum())
    assert int(tokens_per_expert_E.sum()) == kept
    if drop_fraction == 0.0:
        assert kept == num_choices  # dropless: the offsets sum to T*K


def test_expert_order_public_api_takes_the_triton_path(monkeypatch):
    torch.manual_seed(1)
    experts_TK = random_choices(10, 2, 5, 0.2)
    monkeypatch.setenv(ENV_VAR, "triton")
    got = expert_order(experts_TK, 5)
    monkeypatch.setenv(ENV_VAR, "torch")
    expected = expert_order(experts_TK, 5)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


# (dtype, atol, rtol) of the combines and gradients: fp32 tight, bf16 one rounding of the output.
DTYPE_TOLERANCES = [
    (torch.float32, 1e-6, 1e-5),
    (torch.bfloat16, 1e-2, 1e-2),
]

# (T, K, E, D, drop fraction, hot expert), each row an edge case of the data movement.
MOVE_CASES = [
    (1, 1, 1, 8, 0.0, None),  # T = 1
    (3, 2, 4, 16, 0.0, None),  # T < BLOCK_T of the first config, D < BLOCK_D
    (19, 3, 7, 80, 0.3, None),  # prime E, drops, D not a multiple of BLOCK_D
    (10, 4, 4, 64, 0.0, None),  # K = E
    (12, 1, 5, 24, 0.0, 2),  # all tokens to one expert
    (7, 2, 4, 8, 1.0, None),  # everything dropped: N = 0, the output is 0
    (40, 8, 256, 33, 0.1, None),  # E = 256, K = 8, odd D
]


def _setup(num_tokens, top_k, num_experts, drop_fraction, hot):
    experts_TK = random_choices(num_tokens, top_k, num_experts, drop_fraction, hot)
    choice_N, _ = expert_order_reference(experts_TK, num_experts)
    weights_TK = torch.rand(num_tokens, top_k).masked_fill(experts_TK < 0, 0.0)
    return choice_N, weights_TK


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLERANCES)
@pytest.mark.parametrize("num_tokens, top_k, num_experts, width, drop_fraction, hot", MOVE_CASES)
def test_permute_matches_reference(monkeypatch, num_tokens, top_k, num_experts, width, drop_fraction, hot,
                                   dtype, atol, rtol):
    torch.manual_seed(2)
    choice_N, _ = _setup(num_tokens, top_k, num_experts, drop_fraction, hot)
    x_TD = torch.randn(num_tokens, width).to(dtype)
    grad_ND = torch.randn(choice_N.numel(), width).to(dtype)
    results = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv(ENV_VAR, backend)
        x = x_TD.clone().requires_grad_()
        x_ND = permute(x, choice_N, top_k)
        (x_ND.float() * grad_ND.float()).sum().backward()
        results[backend] = (x_ND.detach(), x.grad)
    assert results["triton"][0].dtype == dtype
    assert torch.equal(results["triton"][0], results["torch"][0])  # a gather is exact
    # index_add sums a token's rows in the gradient's dtype; the kernel in fp32, rounded once.
    torch.testing.assert_close(results["triton"][1], results["torch"][1], atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLERANCES)
@pytest.mark.parametrize("num_tokens, top_k, num_experts, width, drop_fraction, hot", MOVE_CASES)
def test_unpermute_matches_reference(monkeypatch, num_tokens, top_k, num_experts, width, drop_fraction, hot,
                                     dtype, atol, rtol):
    torch.manual_seed(3)
    choice_N, weights_TK = _setup(num_tokens, top_k, num_experts, drop_fraction, hot)
    y_ND = torch.randn(choice_N.numel(), width).to(dtype)
    grad_TD = torch.randn(num_tokens, width).to(dtype)
    results = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv(ENV_VAR, backend)
        y, w = y_ND.clone().requires_grad_(), weights_TK.clone().requires_grad_()
        y_TD = unpermute(y, choice_N, w, num_tokens)
        (y_TD.float() * grad_TD.float()).sum().backward()
        results[backend] = (y_TD.detach(), y.grad, w.grad)
    assert results["triton"][0].dtype == dtype
    for got, expected in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)
    if drop_fraction == 1.0:
        assert not results["triton"][0].any()


def test_unpermute_gradients_only_where_asked(monkeypatch):
    torch.manual_seed(4)
    choice_N, weights_TK = _setup(9, 2, 5, 0.2, None)
    y_ND = torch.randn(choice_N.numel(), 12)
    monkeypatch.setenv(ENV_VAR, "triton")
    for y_grad, w_grad in ((True, False), (False, True)):
        y, w = y_ND.clone().requires_grad_(y_grad), weights_TK.clone().requires_grad_(w_grad)
        unpermute(y, choice_N, w, 9).sum().backward()
        ref_y, ref_w = y_ND.clone().requires_grad_(y_grad), weights_TK.clone().requires_grad_(w_grad)
        unpermute_reference(ref_y, choice_N, ref_w, 9).sum().backward()
        for got, expected in ((y.grad, ref_y.grad), (w.grad, ref_w.grad)):
            assert (got is None) == (expected is None)
            if got is not None:
                torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_float64_stays_float64_and_gradchecks(monkeypatch):
    torch.manual_seed(5)
    choice_N, weights_TK = _setup(6, 2, 3, 0.2, None)
    monkeypatch.setenv(ENV_VAR, "triton")
    x_TD = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y_ND = torch.randn(choice_N.numel(), 3, dtype=torch.float64, requires_grad=True)
    w_TK = weights_TK.double().requires_grad_()
    y_TD = unpermute(y_ND, choice_N, w_TK, 6)
    assert y_TD.dtype == torch.float64
    torch.testing.assert_close(y_TD, unpermute_reference(y_ND, choice_N, w_TK, 6), atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(lambda x: permute(x, choice_N, 2), (x_TD,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda y, w: unpermute(y, choice_N, w, 6), (y_ND, w_TK), fast_mode=True)


def test_bf16_sums_in_fp32_rounded_once_to_nearest():
    # 1 + 3 * 2^-9 is lost when summed in bf16, kept (rounded once to 1.0078125) when summed in fp32.
    y_ND = torch.tensor([[1.0], [2.0**-9], [2.0**-9], [2.0**-9]], dtype=torch.bfloat16)
    assert unpermute_triton(y_ND, torch.arange(4), torch.ones(1, 4), 1).item() == 1.0078125
    assert permute_backward_triton(y_ND, torch.arange(4), 1, 4).item() == 1.0078125

    # Random data: exactly the kernel's fp32 result on the same values, rounded to nearest even once,
    # and the row gradient w * g exactly the reference's (one product, one rounding).
    torch.manual_seed(9)
    choice_N, weights_TK = _setup(17, 3, 5, 0.2, None)
    y_ND = torch.randn(choice_N.numel(), 40, dtype=torch.bfloat16)
    grad_TD = torch.randn(17, 40, dtype=torch.bfloat16)
    y_bf16_TD = unpermute_triton(y_ND, choice_N, weights_TK, 17)
    assert torch.equal(y_bf16_TD, unpermute_triton(y_ND.float(), choice_N, weights_TK, 17).bfloat16())
    y = y_ND.clone().requires_grad_()
    unpermute_reference(y, choice_N, weights_TK, 17).backward(grad_TD)
    grad_y_ND, _ = unpermute_backward_triton(grad_TD, y_ND, choice_N, weights_TK, True, False)
    assert torch.equal(grad_y_ND, y.grad)


# (N rows, M source rows, how the rows index them), each an edge case of a gather's backward.
GATHER_CASES = [
    (1, 1, "sorted"),  # one row
    (12, 4, "routing"),  # the routing gather choice_N // K: K rows per token, expert-grouped order
    (30, 7, "random"),  # unsorted, some source rows gathered many times, some never
    (5, 9, "random"),  # more source rows than rows: most get zeros
    (40, 1, "random"),  # every row reads row 0 (all tokens on one expert, MMoE's shared input)
    (0, 3, "random"),  # no rows: zeros
    (0, 0, "random"),  # no rows, no source rows
]


def _gather_index(num_rows: int, num_sources: int, how: str) -> torch.Tensor:
    if num_sources == 0:
        return torch.zeros(num_rows, dtype=torch.int64)
    if how == "routing":
        top_k = num_rows // num_sources
        experts_TK = random_choices(num_sources, top_k, 2 * top_k)
        choice_N, _ = expert_order_reference(experts_TK, 2 * top_k)
        return choice_N // top_k
    index = torch.randint(0, num_sources, (num_rows,))
    return index.sort().values if how == "sorted" else index


@pytest.mark.parametrize("num_rows, num_sources, how", GATHER_CASES)
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-6, 1e-5), (torch.bfloat16, 8e-3, 8e-3)])
def test_gather_backward_matches_reference(num_rows, num_sources, how, dtype, atol, rtol):
    torch.manual_seed(num_rows + num_sources)
    index_N = _gather_index(num_rows, num_sources, how)
    grad_ND = torch.randn(num_rows, 37, dtype=dtype)
    got = gather_backward_triton(grad_ND, index_N, num_sources)
    assert got.dtype == dtype and got.shape == (num_sources, 37)
    torch.testing.assert_close(got, gather_backward_reference(grad_ND, index_N, num_sources), atol=atol, rtol=rtol)
    # Summed in fp32 and rounded once: exactly the fp32 result rounded to the output dtype.
    assert torch.equal(got, gather_backward_triton(grad_ND.float(), index_N, num_sources).to(dtype))


def test_gather_backward_sums_in_row_order_in_fp32():
    # 1 + 3 * 2^-9 is lost when summed in bf16, kept (rounded once to 1.0078125) in fp32; and the
    # fp32 sum follows row order, whatever order the index lists them in.
    grad_ND = torch.tensor([[2.0**-9], [1.0], [2.0**-9], [2.0**-9]], dtype=torch.bfloat16)
    assert gather_backward_triton(grad_ND, torch.zeros(4, dtype=torch.int64), 1).item() == 1.0078125
    grad_ND = torch.tensor([[1e8], [1.0], [-1e8], [1.0]])
    index_N = torch.tensor([1, 0, 1, 1])
    # Row order for source 1: 1e8 + (-1e8) + 1 = 1 (any other order of the three loses the 1).
    assert gather_backward_triton(grad_ND, index_N, 2).tolist() == [[1.0], [1.0]]


def test_row_strided_operands_are_read_through_their_own_row_stride():
    """x_TD, y_ND, grad_y_TD and grad_x_ND as column slices of wider tensors (unit column stride, so the
    launchers keep the view, row stride > D), and x_TD as one row broadcast to every token (row stride 0):
    every kernel must step rows by the tensor's own stride, not by D or by the output's stride. Permute
    and its backward, unpermute and both of its gradients, and gather_backward, against the references."""
    torch.manual_seed(12)
    num_tokens, top_k, num_experts, width = 9, 3, 5, 20
    choice_N, weights_TK = _setup(num_tokens, top_k, num_experts, 0.2, None)
    num_rows = choice_N.numel()
    x_TD = torch.randn(num_tokens, width + 7)[:, 3:3 + width]
    y_ND = torch.randn(num_rows, width + 5)[:, :width]
    grad_TD = torch.randn(num_tokens, 2 * width)[:, width:]
    grad_ND = torch.randn(num_rows, width + 3)[:, 1:1 + width]
    assert all(t.stride() == (t.stride(0), 1) and t.stride(0) > width for t in (x_TD, y_ND, grad_TD, grad_ND))

    broadcast_TD = torch.randn(1, width).expand(num_tokens, width)
    assert torch.equal(permute_triton(broadcast_TD, choice_N, top_k), broadcast_TD[:1].expand(num_rows, width))
    assert torch.equal(permute_triton(x_TD, choice_N, top_k), permute_reference(x_TD, choice_N, top_k))
    torch.testing.assert_close(permute_backward_triton(grad_ND, choice_N, num_tokens, top_k),
                               gather_backward_reference(grad_ND, choice_N // top_k, num_tokens))
    torch.testing.assert_close(gather_backward_triton(grad_ND, choice_N // top_k, num_tokens),
                               gather_backward_reference(grad_ND, choice_N // top_k, num_tokens))
    torch.testing.assert_close(unpermute_triton(y_ND, choice_N, weights_TK, num_tokens),
                               unpermute_reference(y_ND, choice_N, weights_TK, num_tokens))
    y, w = y_ND.clone().requires_grad_(), weights_TK.clone().requires_grad_()
    unpermute_reference(y, choice_N, w, num_tokens).backward(grad_TD)
    grad_y_ND, grad_w_TK = unpermute_backward_triton(grad_TD, y_ND, choice_N, weights_TK)
    torch.testing.assert_close(grad_y_ND, y.grad)
    torch.testing.assert_close(grad_w_TK, w.grad)


def test_gather_backward_rejects_bad_arguments():
    with pytest.raises(ValueError, match="index_N has 3 rows, grad_ND 4: expected equal"):
        gather_backward_triton(torch.randn(4, 2), torch.arange(3), 4)
    with pytest.raises(ValueError, match="num_rows = -1: expected >= 0"):
        gather_backward_triton(torch.randn(4, 2), torch.arange(4), -1)
    with pytest.raises(ValueError, match="index_N: expected a 1-D int32/int64 tensor"):
        gather_backward_triton(torch.randn(4, 2), torch.arange(4).float(), 4)


@pytest.mark.parametrize("index", range(1, 10))
def test_every_autotune_candidate(index):
    # The interpreter runs only the first candidate through the autotuner; force each of the others.
    torch.manual_seed(6)
    num_tokens, top_k, width = 9, 8, 40
    experts_TK = random_choices(num_tokens, top_k, 16, 0.2)
    choice_N, _ = expert_order_reference(experts_TK, 16)
    weights_TK = torch.rand(num_tokens, top_k)
    x_TD, y_ND = torch.randn(num_tokens, width), torch.randn(choice_N.numel(), width)
    grad_TD = torch.randn(num_tokens, width)

    def pick(configs):
        return configs[min(index, len(configs) - 1)]

    order_config = pick(_expert_order_configs())
    got = expert_order_triton(experts_TK, 16, None, {k: v for k, v in order_config.items()})
    assert torch.equal(got[0], choice_N)
    assert torch.equal(permute_triton(x_TD, choice_N, top_k, pick(_permute_configs())), x_TD[choice_N // top_k])
    combine_config = pick(_combine_configs())
    torch.testing.assert_close(unpermute_triton(y_ND, choice_N, weights_TK, num_tokens, combine_config),
                               unpermute_reference(y_ND, choice_N, weights_TK, num_tokens))
    expected_grad_x = torch.zeros(num_tokens, width).index_add(0, choice_N // top_k, y_ND)
    torch.testing.assert_close(permute_backward_triton(y_ND, choice_N, num_tokens, top_k, combine_config),
                               expected_grad_x)
    y, w = y_ND.clone().requires_grad_(), weights_TK.clone().requires_grad_()
    unpermute_reference(y, choice_N, w, num_tokens).backward(grad_TD)
    grad_y, grad_w = unpermute_backward_triton(grad_TD, y_ND, choice_N, weights_TK, True, True,
                                               pick(_unpermute_backward_configs()))
    torch.testing.assert_close(grad_y, y.grad)
    torch.testing.assert_close(grad_w, w.grad)
    torch.testing.assert_close(gather_backward_triton(y_ND, choice_N // top_k, num_tokens, pick(_gather_backward_configs())),
                               expected_grad_x)


def test_unpermute_backward_candidates_fit_registers_at_any_k():
    # K = 8: every candidate's weight-gradient accumulator fits and all are kept. K = E = 64 (expert
    # choice): none does (the first spilled on sm_90), so they are shrunk to fit; each still computes
    # the right gradients.
    import triton

    from moe_engine.kernels.permute import _UNPERMUTE_BACKWARD_ELEMENTS_PER_THREAD as budget
    from moe_engine.kernels.permute import _prune_unpermute_backward_configs as prune

    candidates = [triton.Config({k: v for k, v in c.items() if k != "num_warps"}, num_warps=c["num_warps"])
                  for c in _unpermute_backward_configs()]
    assert prune(candidates, {}, BLOCK_K=8) == candidates
    shrunk = prune(candidates, {}, BLOCK_K=64)
    assert shrunk and len(shrunk) == len({(c.kwargs["BLOCK_T"], c.kwargs["BLOCK_D"], c.num_warps) for c in shrunk})
    for c in shrunk:
        assert c.kwargs["BLOCK_T"] * 64 * c.kwargs["BLOCK_D"] / (32 * c.num_warps) <= budget
    torch.manual_seed(7)
    num_tokens, top_k, width = 5, 64, 72
    experts_TK = torch.arange(top_k).repeat(num_tokens, 1)
    choice_N, _ = expert_order_reference(experts_TK, top_k)
    weights_TK, y_ND, grad_TD = torch.rand(num_tokens, top_k), torch.randn(choice_N.numel(), width), torch.randn(num_tokens, width)
    y, w = y_ND.clone().requires_grad_(), weights_TK.clone().requires_grad_()
    unpermute_reference(y, choice_N, w, num_tokens).backward(grad_TD)
    for c in shrunk:
        config = {**c.kwargs, "num_warps": c.num_warps}
        grad_y, grad_w = unpermute_backward_triton(grad_TD, y_ND, choice_N, weights_TK, True, True, config)
        torch.testing.assert_close(grad_y, y.grad)
        torch.testing.assert_close(grad_w, w.grad)


def test_launchers_reject_bad_shapes():
    x_TD, choice_N = torch.randn(4, 3), torch.arange(4)
    with pytest.raises(ValueError, match="experts_TK: expected a 2-D int32/int64"):
        expert_order_triton(torch.zeros(4), 2)
    with pytest.raises(ValueError, match="num_experts = 0"):
        expert_order_triton(torch.zeros(4, 1, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="x_TD: expected a 2-D floating"):
        permute_triton(torch.arange(4), choice_N, 1)
    with pytest.raises(ValueError, match="choice_N: expected a 1-D int32/int64 tensor, got 1-D torch.float32"):
        permute_triton(x_TD, choice_N.float(), 1)
    with pytest.raises(ValueError, match="top_k = 0"):
        permute_triton(x_TD, choice_N, 0)
    with pytest.raises(ValueError, match="choice_N has 4 rows, the data 3"):
        unpermute_triton(torch.randn(3, 3), choice_N, torch.ones(4, 1), 4)
    with pytest.raises(ValueError, match=r"weights_TK has shape \(4, 1\): expected \(5, K >= 1\)"):
        unpermute_triton(torch.randn(4, 3), choice_N, torch.ones(4, 1), 5)
    with pytest.raises(ValueError, match="y_ND has width 2, grad_y_TD 3"):
        unpermute_backward_triton(torch.randn(4, 3), torch.randn(4, 2), choice_N, torch.ones(4, 1))


def test_opcheck_custom_ops():
    torch.manual_seed(7)
    experts_TK = random_choices(5, 2, 3, 0.2)
    choice_N, _ = expert_order_reference(experts_TK, 3)
    num_rows = choice_N.numel()
    x_TD = torch.randn(5, 4, requires_grad=True)
    y_ND = torch.randn(num_rows, 4, requires_grad=True)
    w_TK = torch.rand(5, 2, requires_grad=True)
    ops = torch.ops.moe_engine
    cases = [
        (ops.expert_order, (experts_TK, 3, None)),
        (ops.expert_order, (experts_TK, 3, 10)),
        (ops.expert_order, (experts_TK, 3, 13)),  # more rows than the 10 choices: clamped, fake included
        (ops.permute, (x_TD, choice_N, 2)),
        (ops.permute_backward, (torch.randn(num_rows, 4), choice_N, 5, 2)),
        (ops.unpermute, (y_ND, choice_N, w_TK, 5)),
        (ops.unpermute_backward, (torch.randn(5, 4), y_ND.detach(), choice_N, w_TK.detach(), True, True)),
        (ops.unpermute_backward, (torch.randn(5, 4), torch.empty(0, 4), choice_N, w_TK.detach(), True, False)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------------
# The whole layer
# ---------------------------------------------------------------------------------------------


def _layer(capacity_factor: float | None) -> MoELayer:
    torch.manual_seed(8)
    cfg = MoEConfig(num_experts=7, ffn_hidden=16, experts_impl="loop",
                    router=RouterConfig(top_k=3, capacity_factor=capacity_factor))
    return MoELayer.from_config(24, cfg)


def _run_layer(layer, x_TD, grad_TD):
    x = x_TD.clone().requires_grad_()
    out = layer(x)
    ((out.y * grad_TD).sum() + out.aux_loss).backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    return out.y.detach(), x.grad, grads


@pytest.mark.parametrize("capacity_factor", [None, 0.6])  # dropless, and capacity drops (N counted on the host)
def test_layer_triton_matches_torch(monkeypatch, capacity_factor):
    layer = _layer(capacity_factor)
    x_TD, grad_TD = torch.randn(21, 24), torch.randn(21, 24)
    results = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv(ENV_VAR, backend)
        results[backend] = _run_layer(layer, x_TD, grad_TD)
    got, expected = results["triton"], results["torch"]
    torch.testing.assert_close(got[0], expected[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[1], expected[1], atol=1e-6, rtol=1e-5)
    for g, e in zip(got[2], expected[2]):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)


def test_compiled_layer_runs_the_custom_ops(monkeypatch):
    seen: set[str] = set()

    def record(gm, example_inputs):
        seen.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return make_boxed_func(gm.forward)

    layer = _layer(None)
    x_TD, grad_TD = torch.randn(13, 24), torch.randn(13, 24)
    monkeypatch.setenv(ENV_VAR, "torch")
    expected = _run_layer(layer, x_TD, grad_TD)
    monkeypatch.setenv(ENV_VAR, "triton")
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=aot_autograd(fw_compiler=record, bw_compiler=record), fullgraph=False)
    got = _run_layer(compiled, x_TD, grad_TD)
    torch._dynamo.reset()
    for name in ("expert_order", "permute", "unpermute", "permute_backward", "unpermute_backward"):
        assert f"moe_engine.{name}.default" in seen, f"{name} not in the compiled graphs: {sorted(seen)}"
    torch.testing.assert_close(got[0], expected[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[1], expected[1], atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernels_on_cuda_at_model_sizes(dtype):
    # The compiled kernels (every autotune candidate competes) at an OLMoE-like size, with drops.
    torch.manual_seed(10)
    num_tokens, top_k, num_experts, width = 4096, 8, 64, 2048
    experts_TK = random_choices(num_tokens, top_k, num_experts, 0.05).cuda()
    choice_N, tokens_per_expert_E, row_of_choice_C = expert_order_triton(experts_TK, num_experts)
    ref_choice_N, ref_tokens_E = expert_order_reference(experts_TK, num_experts)
    assert torch.equal(choice_N, ref_choice_N) and torch.equal(tokens_per_expert_E, ref_tokens_E)
    assert torch.equal(row_of_choice_C[choice_N].long(), torch.arange(choice_N.numel(), device="cuda"))
    dropless_TK = random_choices(num_tokens, top_k, num_experts).cuda()
    assert torch.equal(expert_order_triton(dropless_TK, num_experts, num_tokens * top_k)[0],
                       expert_order_reference(dropless_TK, num_experts, num_tokens * top_k)[0])

    x_TD = torch.randn(num_tokens, width, device="cuda", dtype=dtype)
    assert torch.equal(permute_triton(x_TD, choice_N, top_k), permute_reference(x_TD, choice_N, top_k))
    weights_TK = torch.rand(num_tokens, top_k, device="cuda").masked_fill(experts_TK < 0, 0.0)
    y_ND = torch.randn(choice_N.numel(), width, device="cuda", dtype=dtype)
    grad_TD = torch.randn(num_tokens, width, device="cuda", dtype=dtype)
    # Same fp32 sums in another order: bf16 results at most one rounding step apart.
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 1e-2}
    y_TD = unpermute_triton(y_ND, choice_N, weights_TK, num_tokens)
    torch.testing.assert_close(y_TD.float(), unpermute_reference(y_ND.float(), choice_N, weights_TK, num_tokens), **tol)
    y, w = y_ND.float().requires_grad_(), weights_TK.clone().requires_grad_()
    unpermute_reference(y, choice_N, w, num_tokens).backward(grad_TD.float())
    grad_y_ND, grad_w_TK = unpermute_backward_triton(grad_TD, y_ND, choice_N, weights_TK)
    torch.testing.assert_close(grad_y_ND, y.grad.to(dtype), atol=0, rtol=0)
    torch.testing.assert_close(grad_w_TK, w.grad, atol=1e-3, rtol=1e-4)
    expected_grad_x = torch.zeros(num_tokens, width, device="cuda").index_add(0, choice_N // top_k, y_ND.float())
    grad_x_TD = permute_backward_triton(y_ND, choice_N, num_tokens, top_k)
    torch.testing.assert_close(grad_x_TD.float(), expected_grad_x, **tol)
