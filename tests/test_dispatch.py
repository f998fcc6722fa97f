"""Tests of the dispatch data movement: expert_order / permute / unpermute and LocalDispatcher.

Routing metadata is tested by its invariants (a permutation of the kept choices, grouped by
expert, stable, counts that sum to N); the data movement against naive per-choice loops,
forward and gradients; the kernel backend switch through MOE_ENGINE_KERNELS.
"""

from __future__ import annotations

import pytest
import torch

from moe_engine.kernels import ENV_VAR, expert_order, permute, requested_backend, select_backend, unpermute
from moe_engine.parallel import LocalDispatcher
from moe_engine.routing import Routing


def random_choices(num_tokens: int, top_k: int, num_experts: int, drop_fraction: float = 0.0) -> torch.Tensor:
    """(T, K) int64: K distinct experts per token, a random `drop_fraction` of the choices set to -1."""
    rows = [torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)]
    experts_TK = torch.stack(rows) if rows else torch.zeros(0, top_k, dtype=torch.int64)
    dropped_TK = torch.rand(num_tokens, top_k) < drop_fraction
    return experts_TK.masked_fill(dropped_TK, -1)


def make_routing(experts_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int, capacity: int | None) -> Routing:
    num_tokens = experts_TK.shape[0]
    return Routing(
        weights_TK=weights_TK,
        experts_TK=experts_TK,
        scores_TE=torch.zeros(num_tokens, num_experts),
        aux_loss=torch.zeros(()),
        capacity=capacity,
    )


# (T, K, E, drop fraction), each row an edge case of the metadata.
ORDER_CASES = [
    (8, 2, 4, 0.0),  # typical dropless
    (1, 1, 1, 0.0),  # T = 1, E = 1
    (7, 3, 3, 0.0),  # K = E: every expert gets every token
    (13, 2, 7, 0.3),  # prime E, with drops
    (12, 1, 5, 0.0),  # K = 1
    (6, 2, 4, 1.0),  # everything dropped: N = 0
    (0, 2, 4, 0.0),  # no tokens
]


@pytest.mark.parametrize("num_tokens, top_k, num_experts, drop_fraction", ORDER_CASES)
def test_expert_order_invariants(num_tokens, top_k, num_experts, drop_fraction):
    torch.manual_seed(0)
    experts_TK = random_choices(num_tokens, top_k, num_experts, drop_fraction)
    choice_N, tokens_per_expert_E = expert_order(experts_TK, num_experts)
    flat_C = experts_TK.flatten().tolist()
    kept = [c for c, e in enumerate(flat_C) if e >= 0]

    # A permutation of exactly the kept choices.
    assert choice_N.dtype == torch.int64
    assert sorted(choice_N.tolist()) == kept
    # Grouped by expert in non-decreasing expert order, token order kept within an expert (stable).
    row_experts = [flat_C[c] for c in choice_N.tolist()]
    assert row_experts == sorted(row_experts)
    for n in range(1, len(row_experts)):
        if row_experts[n] == row_experts[n - 1]:
            assert choice_N[n] > choice_N[n - 1]
    # Counts: per expert, summing to N.
    expected_E = [sum(1 for e in flat_C if e == i) for i in range(num_experts)]
    assert tokens_per_expert_E.tolist() == expected_E
    assert int(tokens_per_expert_E.sum()) == choice_N.numel() == len(kept)
    if kept:
        assert torch.equal(tokens_per_expert_E, torch.bincount(experts_TK[experts_TK >= 0], minlength=num_experts))

    if drop_fraction == 0.0:
        # Dropless callers pass N = T*K and skip the host sync; the result is the same.
        choice_given_N, tokens_given_E = expert_order(experts_TK, num_experts, num_rows=num_tokens * top_k)
        assert torch.equal(choice_given_N, choice_N)
        assert torch.equal(tokens_given_E, tokens_per_expert_E)


def test_expert_order_all_on_one_expert():
    experts_TK = torch.full((5, 1), 3)
    choice_N, tokens_per_expert_E = expert_order(experts_TK, 6)
    assert choice_N.tolist() == [0, 1, 2, 3, 4]
    assert tokens_per_expert_E.tolist() == [0, 0, 0, 5, 0, 0]


@pytest.mark.parametrize("num_tokens, top_k, num_experts, drop_fraction", ORDER_CASES)
def test_permute_gathers_token_rows(num_tokens, top_k, num_experts, drop_fraction):
    torch.manual_seed(1)
    experts_TK = random_choices(num_tokens, top_k, num_experts, drop_fraction)
    x_TD = torch.randn(num_tokens, 5)
    choice_N, _ = expert_order(experts_TK, num_experts)
    x_ND = permute(x_TD, choice_N, top_k)
    assert x_ND.shape == (choice_N.numel(), 5)
    for n, c in enumerate(choice_N.tolist()):
        assert torch.equal(x_ND[n], x_TD[c // top_k])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permute_then_unpermute_with_unit_weights_is_identity(dtype):
    torch.manual_seed(2)
    num_tokens, num_experts = 11, 5
    experts_TK = random_choices(num_tokens, 1, num_experts)
    x_TD = torch.randn(num_tokens, 6).to(dtype)
    choice_N, _ = expert_order(experts_TK, num_experts)
    y_TD = unpermute(permute(x_TD, choice_N, 1), choice_N, torch.ones(num_tokens, 1), num_tokens)
    assert y_TD.dtype == dtype
    assert torch.equal(y_TD, x_TD)


@pytest.mark.parametrize("num_tokens, top_k, num_experts, drop_fraction", ORDER_CASES)
def test_unpermute_matches_naive_loop(num_tokens, top_k, num_experts, drop_fraction):
    torch.manual_seed(3)
    experts_TK = random_choices(num_tokens, top_k, num_experts, drop_fraction)
    weights_TK = torch.rand(num_tokens, top_k).masked_fill(experts_TK < 0, 0.0)
    choice_N, _ = expert_order(experts_TK, num_experts)
    y_ND = torch.randn(choice_N.numel(), 4)
    y_TD = unpermute(y_ND, choice_N, weights_TK, num_tokens)

    expected_TD = torch.zeros(num_tokens, 4)
    for n, c in enumerate(choice_N.tolist()):
        t, k = divmod(c, top_k)
        expected_TD[t] += weights_TK[t, k] * y_ND[n]
    torch.testing.assert_close(y_TD, expected_TD, atol=1e-6, rtol=1e-6)


def test_unpermute_accumulates_bf16_in_fp32():
    # One token, K = 4 rows: 1 and three times 2^-9. Summed in bf16 (8-bit mantissa, spacing 2^-7
    # at 1.0) each 2^-9 is lost and the result is 1.0; summed in fp32, 1 + 3 * 2^-9 = 1.00586
    # rounds once to the bf16 value 1.0078125.
    y_ND = torch.tensor([[1.0], [2.0**-9], [2.0**-9], [2.0**-9]], dtype=torch.bfloat16)
    choice_N = torch.arange(4)
    y_TD = unpermute(y_ND, choice_N, torch.ones(1, 4), 1)
    assert y_TD.dtype == torch.bfloat16
    assert y_TD.item() == 1.0078125

    # Random data: exactly the fp32 computation on the same values, rounded once.
    torch.manual_seed(4)
    experts_TK = random_choices(9, 3, 5)
    choice_N, _ = expert_order(experts_TK, 5)
    y_ND = torch.randn(choice_N.numel(), 7, dtype=torch.bfloat16)
    weights_TK = torch.rand(9, 3)
    y_bf16_TD = unpermute(y_ND, choice_N, weights_TK, 9)
    y_fp32_TD = unpermute(y_ND.float(), choice_N, weights_TK, 9)
    assert torch.equal(y_bf16_TD, y_fp32_TD.bfloat16())


def test_unpermute_keeps_float64_precision():
    # The fp32 accumulation exists for bf16; it must not lower float64 inputs to fp32.
    torch.manual_seed(5)
    experts_TK = random_choices(6, 2, 3)
    choice_N, _ = expert_order(experts_TK, 3)
    y_ND = torch.randn(choice_N.numel(), 4, dtype=torch.float64, requires_grad=True)
    weights_TK = torch.rand(6, 2, dtype=torch.float64, requires_grad=True)

    expected_TD = torch.zeros(6, 4, dtype=torch.float64)
    for n, c in enumerate(choice_N.tolist()):
        t, k = divmod(c, 2)
        expected_TD[t] += weights_TK[t, k].detach() * y_ND[n].detach()
    y_TD = unpermute(y_ND, choice_N, weights_TK, 6)
    assert y_TD.dtype == torch.float64
    torch.testing.assert_close(y_TD.detach(), expected_TD, atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(lambda y, w: unpermute(y, choice_N, w, 6), (y_ND, weights_TK))


def test_permute_gradcheck():
    torch.manual_seed(6)
    experts_TK = random_choices(5, 2, 3, drop_fraction=0.3)
    choice_N, _ = expert_order(experts_TK, 3)
    x_TD = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: permute(x, choice_N, 2), (x_TD,))


# ---------------------------------------------------------------------------------------------
# LocalDispatcher
# ---------------------------------------------------------------------------------------------


def _per_expert_function(x_ND: torch.Tensor, tokens_per_expert_E: torch.Tensor, a_EDD: torch.Tensor) -> torch.Tensor:
    """A stand-in for the experts that depends on which expert a row went to: tanh(x @ A_e)."""
    parts = torch.split(x_ND, tokens_per_expert_E.tolist())
    outputs = [torch.tanh(part @ a_EDD[e]) for e, part in enumerate(parts)]
    return torch.cat(outputs) if outputs else x_ND.new_zeros(0, a_EDD.shape[-1])


@pytest.mark.parametrize(
    "num_tokens, top_k, num_experts, drop_fraction, capacity",
    [
        (10, 2, 4, 0.0, None),  # dropless: N = T*K without a host sync
        (10, 2, 4, 0.3, 3),  # capacity routing with drops: N counted on the host
        (1, 1, 1, 0.0, None),  # T = 1, E = 1
        (9, 3, 7, 0.0, None),  # prime E
        (4, 2, 3, 1.0, 1),  # every choice dropped: the output is all zeros
    ],
)
def test_local_dispatcher_matches_naive_loop(num_tokens, top_k, num_experts, drop_fraction, capacity):
    torch.manual_seed(7)
    d_model = 5
    experts_TK = random_choices(num_tokens, top_k, num_experts, drop_fraction)
    x_TD = torch.randn(num_tokens, d_model, requires_grad=True)
    weights_TK = torch.rand(num_tokens, top_k).masked_fill(experts_TK < 0, 0.0).requires_grad_()
    a_EDD = torch.randn(num_experts, d_model, d_model)
    grad_TD = torch.randn(num_tokens, d_model)

    dispatcher = LocalDispatcher(num_experts)
    routing = make_routing(experts_TK, weights_TK, num_experts, capacity)
    x_ND, tokens_per_expert_E, meta = dispatcher.dispatch(x_TD, routing)
    assert int(tokens_per_expert_E.sum()) == x_ND.shape[0] == int((experts_TK >= 0).sum())
    y_TD = dispatcher.combine(_per_expert_function(x_ND, tokens_per_expert_E, a_EDD), meta)
    dx_TD, dw_TK = torch.autograd.grad((y_TD * grad_TD).sum(), (x_TD, weights_TK))

    x_ref = x_TD.detach().clone().requires_grad_()
    w_ref = weights_TK.detach().clone().requires_grad_()
    rows = []
    for t in range(num_tokens):
        y_D = 0.0 * x_ref[t]  # a zero that stays in the graph when every choice is dropped
        for k in range(top_k):
            e = int(experts_TK[t, k])
            if e >= 0:
                y_D = y_D + w_ref[t, k] * torch.tanh(x_ref[t] @ a_EDD[e])
        rows.append(y_D)
    y_ref_TD = torch.stack(rows)
    # With every choice dropped the reference does not depend on its inputs: zero gradients.
    dx_ref_TD, dw_ref_TK = torch.autograd.grad(
        (y_ref_TD * grad_TD).sum(), (x_ref, w_ref), allow_unused=True, materialize_grads=True
    )

    torch.testing.assert_close(y_TD.detach(), y_ref_TD.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dx_TD, dx_ref_TD, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dw_TK, dw_ref_TK, atol=1e-6, rtol=1e-5)


def test_local_dispatcher_round_trip_with_identity_experts():
    # combine(dispatch(x)) with identity experts: sum_k w[t,k] x[t] = x[t] when the weights sum to 1.
    torch.manual_seed(8)
    experts_TK = random_choices(7, 3, 5)
    weights_TK = torch.softmax(torch.randn(7, 3), dim=-1)
    x_TD = torch.randn(7, 4)
    dispatcher = LocalDispatcher(5)
    x_ND, _, meta = dispatcher.dispatch(x_TD, make_routing(experts_TK, weights_TK, 5, None))
    assert meta.choice_N.numel() == 21
    torch.testing.assert_close(dispatcher.combine(x_ND, meta), x_TD)


def test_local_dispatcher_rejects_other_expert_count():
    experts_TK = torch.zeros(3, 1, dtype=torch.int64)
    routing = make_routing(experts_TK, torch.ones(3, 1), 4, None)
    with pytest.raises(ValueError, match="4 experts.*dispatcher of 8"):
        LocalDispatcher(8).dispatch(torch.randn(3, 2), routing)


# ---------------------------------------------------------------------------------------------
# MOE_ENGINE_KERNELS
# ---------------------------------------------------------------------------------------------


def _run_all_ops() -> torch.Tensor:
    experts_TK = torch.tensor([[1, 0], [0, 2]])
    choice_N, _ = expert_order(experts_TK, 3)
    x_ND = permute(torch.arange(4.0).view(2, 2), choice_N, 2)
    return unpermute(x_ND, choice_N, torch.ones(2, 2), 2)


@pytest.mark.parametrize("value", ["cuda", "pytorch", "triton,torch"])
def test_bad_backend_value_raises_naming_it(monkeypatch, value):
    monkeypatch.setenv(ENV_VAR, value)
    with pytest.raises(ValueError, match=f"{ENV_VAR}='{value}'"):
        requested_backend()
    with pytest.raises(ValueError, match=value):
        _run_all_ops()


_OPS = [
    lambda device: expert_order(torch.zeros(2, 1, dtype=torch.int64, device=device), 2),
    lambda device: permute(torch.zeros(2, 3, device=device), torch.arange(2, device=device), 1),
    lambda device: unpermute(torch.zeros(2, 3, device=device), torch.arange(2, device=device),
                             torch.ones(2, 1, device=device), 2),
]


@pytest.mark.parametrize("op", _OPS, ids=["expert_order", "permute", "unpermute"])
def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch, op):
    # Asking for Triton where it cannot run is an error, never a silent fallback to the reference.
    monkeypatch.setenv(ENV_VAR, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=f"{ENV_VAR}=triton on cpu: Triton kernels run on CUDA"):
        op("cpu")


@pytest.mark.parametrize("op", _OPS, ids=["expert_order", "permute", "unpermute"])
def test_triton_backend_runs_the_custom_ops(monkeypatch, op):
    # CUDA, or the CPU under Triton's interpreter (which tests/conftest.py turns on without CUDA).
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.namespace)
            return func(*args, **(kwargs or {}))

    monkeypatch.setenv(ENV_VAR, "triton")
    with RecordOps() as record:
        op("cuda" if torch.cuda.is_available() else "cpu")
    assert "moe_engine" in record.names
    monkeypatch.setenv(ENV_VAR, "torch")
    with RecordOps() as record:
        op("cuda" if torch.cuda.is_available() else "cpu")
    assert "moe_engine" not in record.names


@pytest.mark.parametrize("value", ["torch", ""])
def test_torch_backend_and_unset_run_the_reference(monkeypatch, value):
    monkeypatch.delenv(ENV_VAR, raising=False)
    unset = _run_all_ops()
    monkeypatch.setenv(ENV_VAR, value)
    assert requested_backend() == (value or None)
    assert select_backend("permute", torch.device("cpu"), has_triton=True) == "torch"
    assert torch.equal(_run_all_ops(), unset)
    torch.testing.assert_close(unset, torch.tensor([[0.0, 2.0], [4.0, 6.0]]))  # each token's row, once per choice


def test_unset_backend_picks_triton_only_on_cuda(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert select_backend("op", torch.device("cpu"), has_triton=True) == "torch"
    assert select_backend("op", torch.device("cuda"), has_triton=True) == "triton"
    assert select_backend("op", torch.device("cuda"), has_triton=False) == "torch"


def test_fused_gather_dispatch_hands_over_rows_equal_to_the_permuted_copy() -> None:
    from moe_engine.kernels.permute import GatheredRows
    from moe_engine.parallel import LocalDispatcher
    from moe_engine.routing import Routing

    torch.manual_seed(0)
    x_TD = torch.randn(6, 4)
    experts_TK = torch.tensor([[0, 2], [2, 1], [1, 0], [2, 0], [0, 1], [1, 2]])
    routing = Routing(torch.rand(6, 2), experts_TK, torch.rand(6, 3), torch.zeros(()))
    rows, tokens_fused, _ = LocalDispatcher(3, fuse_gather=True).dispatch(x_TD, routing)
    x_ND, tokens, _ = LocalDispatcher(3).dispatch(x_TD, routing)
    assert isinstance(rows, GatheredRows) and torch.equal(tokens_fused, tokens)
    assert torch.equal(rows.materialize(), x_ND)
    assert torch.equal(x_TD[rows.index_N], x_ND)
