"""Tests of moe_engine.experts: GroupedExperts (loop and torch._grouped_mm paths) and MLP.

Both implementations are compared with a per-row loop (tests/reference_moe.py's `mlp`) run in
float64 on the same values, forward and the gradients of x, w_in and w_out. bf16 runs are
compared with that reference computed from the same bf16-rounded inputs.
"""

from __future__ import annotations

import pytest
import torch

import reference_moe as ref
from moe_engine.experts import MLP, GroupedExperts


@pytest.fixture(autouse=True)
def _torch_reference_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests pin down the torch paths (and what "auto" picks on CPU); the Triton kernels
    have their own tests (tests/test_kernel_*.py, tests/test_layer_triton.py)."""
    monkeypatch.delenv("MOE_ENGINE_KERNELS", raising=False)


# (dtype, atol, rtol): fp32 tight; bf16 as vLLM/SonicMoE test their bf16 kernels.
DTYPE_TOLERANCES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.bfloat16, 2e-2, 2e-2),
]
ACTIVATIONS = ["swiglu", "gelu"]
IMPLS = ["loop", "grouped_mm"]


def make_experts(num_experts: int, d_model: int, ffn_hidden: int, activation: str, impl: str, dtype) -> GroupedExperts:
    experts = GroupedExperts(num_experts, d_model, ffn_hidden, activation, impl)
    with torch.no_grad():  # weights of unit-ish scale so that the outputs are O(1), not O(1e-2)
        experts.w_in.normal_(std=d_model**-0.5)
        experts.w_out.normal_(std=ffn_hidden**-0.5)
    return experts.to(dtype)


def reference_rows(
    x_ND: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, tokens_per_expert: list[int], activation: str
) -> torch.Tensor:
    """Row n goes to the expert whose block of `tokens_per_expert` contains n."""
    row_experts = [e for e, count in enumerate(tokens_per_expert) for _ in range(count)]
    rows = [ref.mlp(x_ND[n], w_in[e], w_out[e], activation) for n, e in enumerate(row_experts)]
    return torch.stack(rows) if rows else x_ND.new_zeros(0, w_out.shape[1])


def check_against_reference(
    experts: GroupedExperts, tokens_per_expert: list[int], dtype, atol: float, rtol: float
) -> None:
    """Forward and all three gradients of `experts` against the float64 per-row loop."""
    num_rows = sum(tokens_per_expert)
    x_ND = torch.randn(num_rows, experts.d_model).to(dtype).requires_grad_()
    grad_ND = torch.randn(num_rows, experts.d_model).to(dtype)
    y_ND = experts(x_ND, torch.tensor(tokens_per_expert))
    assert y_ND.dtype == dtype and y_ND.shape == x_ND.shape
    dx, dw_in, dw_out = torch.autograd.grad((y_ND * grad_ND).sum(), (x_ND, experts.w_in, experts.w_out))

    leaves = [t.detach().double().requires_grad_() for t in (x_ND, experts.w_in, experts.w_out)]
    y_ref = reference_rows(*leaves, tokens_per_expert, experts.activation)
    if num_rows:
        ref_grads = torch.autograd.grad((y_ref * grad_ND.double()).sum(), leaves)
    else:  # no rows: the reference is an empty constant, every gradient is zero
        ref_grads = [torch.zeros_like(leaf) for leaf in leaves]

    torch.testing.assert_close(y_ND.double(), y_ref.detach(), atol=atol, rtol=rtol)
    for name, got, expected in zip(("x", "w_in", "w_out"), (dx, dw_in, dw_out), ref_grads):
        assert got.dtype == dtype, name
        torch.testing.assert_close(got.double(), expected, atol=atol, rtol=rtol, msg=lambda m: f"d{name}: {m}")


# Rows per expert (its length is E). D = 16 and F = 8 are aligned for torch._grouped_mm in fp32 and bf16.
EDGE_CASES = [
    [3, 1, 4, 2],  # typical, uneven
    [0, 1, 0, 0],  # T = 1: a single row
    [3, 0, 2, 0],  # experts with no tokens between and after busy ones
    [0, 0, 6, 0],  # all rows on one expert
    [2, 0, 3, 1, 0, 4, 1],  # prime E = 7
    [0, 0, 0, 0],  # N = 0: nothing to compute, weights get zero gradients
]


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLERANCES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("tokens_per_expert", EDGE_CASES)
def test_grouped_experts_match_per_row_loop(tokens_per_expert, activation, impl, dtype, atol, rtol):
    torch.manual_seed(0)
    experts = make_experts(len(tokens_per_expert), 16, 8, activation, impl, dtype)
    assert experts.resolve_impl(torch.device("cpu"), dtype) == impl
    check_against_reference(experts, tokens_per_expert, dtype, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLERANCES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_loop_and_grouped_mm_agree(activation, dtype, atol, rtol):
    torch.manual_seed(1)
    tokens_per_expert_E = torch.tensor([4, 0, 7, 1, 3])
    loop = make_experts(5, 16, 8, activation, "loop", dtype)
    grouped = make_experts(5, 16, 8, activation, "grouped_mm", dtype)
    grouped.load_state_dict(loop.state_dict())
    x_ND = torch.randn(15, 16).to(dtype)
    grad_ND = torch.randn(15, 16).to(dtype)
    results = []
    for experts in (loop, grouped):
        x = x_ND.clone().requires_grad_()
        y = experts(x, tokens_per_expert_E)
        results.append((y, *torch.autograd.grad((y * grad_ND).sum(), (x, experts.w_in, experts.w_out))))
    for name, a, b in zip(("y", "dx", "dw_in", "dw_out"), *results):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("impl", IMPLS)
def test_grouped_experts_backward_from_sum(impl):
    # `.sum()` hands backward a gradient with zero strides (an expanded scalar); every path must take it.
    torch.manual_seed(2)
    experts = make_experts(3, 16, 8, "swiglu", impl, torch.float32)
    x_ND = torch.randn(6, 16, requires_grad=True)
    experts(x_ND, torch.tensor([2, 0, 4])).sum().backward()
    ones_ND = torch.ones(6, 16)
    x_ref = x_ND.detach().clone().requires_grad_()
    (experts(x_ref, torch.tensor([2, 0, 4])) * ones_ND).sum().backward()
    torch.testing.assert_close(x_ND.grad, x_ref.grad)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_loop_at_odd_widths(activation):
    # D = 13, F = 7: no width is 16-byte aligned, only the loop can run; it must still be exact.
    torch.manual_seed(3)
    experts = make_experts(3, 13, 7, activation, "auto", torch.float32)
    assert experts.resolve_impl(torch.device("cpu"), torch.float32) == "loop"
    check_against_reference(experts, [2, 0, 3], torch.float32, 1e-5, 1e-5)


@pytest.mark.parametrize(
    "d_model, ffn_hidden, activation, dtype, expected",
    [
        (16, 8, "swiglu", torch.float32, "grouped_mm"),  # 64, 32, 64 bytes
        (12, 4, "gelu", torch.float32, "grouped_mm"),  # 48, 16 bytes: multiples of 16 suffice
        (16, 8, "swiglu", torch.bfloat16, "grouped_mm"),  # 32, 16, 32 bytes
        (13, 8, "swiglu", torch.float32, "loop"),  # D = 13: 52-byte rows
        (16, 6, "gelu", torch.float32, "loop"),  # F = 6: 24-byte rows
        (12, 8, "swiglu", torch.bfloat16, "loop"),  # D = 12 in bf16: 24-byte rows
        (16, 8, "swiglu", torch.float64, "loop"),  # _grouped_mm has no float64 on CPU
    ],
)
def test_auto_picks_grouped_mm_only_where_it_can_run(d_model, ffn_hidden, activation, dtype, expected):
    experts = GroupedExperts(4, d_model, ffn_hidden, activation, "auto")
    assert experts.resolve_impl(torch.device("cpu"), dtype) == expected


@pytest.mark.parametrize(
    "d_model, ffn_hidden, dtype, reason",
    [
        (13, 8, torch.float32, r"widths \[13\].*16 bytes"),
        (16, 6, torch.float32, r"widths \[6\].*16 bytes"),  # H = 2F = 12 is aligned, F = 6 is not
        (16, 8, torch.float64, "float64"),
    ],
)
def test_grouped_mm_where_it_cannot_run_raises(d_model, ffn_hidden, dtype, reason):
    experts = GroupedExperts(2, d_model, ffn_hidden, "swiglu", "grouped_mm").to(dtype)
    with pytest.raises(ValueError, match=f"'grouped_mm' cannot run here: .*{reason}"):
        experts(torch.randn(3, d_model, dtype=dtype), torch.tensor([1, 2]))


@pytest.mark.parametrize("impl", IMPLS)
def test_grouped_experts_under_bf16_autocast_compute_in_bf16(impl):
    # torch._grouped_mm is not on autocast's lists; the module casts to the autocast dtype itself.
    torch.manual_seed(4)
    experts = make_experts(3, 16, 8, "swiglu", impl, torch.float32)
    x_ND = torch.randn(5, 16)
    tokens_per_expert_E = torch.tensor([1, 3, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ND = experts(x_ND, tokens_per_expert_E)
    assert y_ND.dtype == torch.bfloat16
    w_in, w_out = experts.w_in.detach().double(), experts.w_out.detach().double()
    expected = reference_rows(x_ND.double(), w_in, w_out, [1, 3, 1], "swiglu")
    torch.testing.assert_close(y_ND.double(), expected, atol=2e-2, rtol=2e-2)


def test_grouped_experts_parameter_shapes_and_bad_arguments():
    assert GroupedExperts(5, 12, 7, "swiglu").w_in.shape == (5, 14, 12)  # H = 2F: gate rows, then up rows
    assert GroupedExperts(5, 12, 7, "gelu").w_in.shape == (5, 7, 12)
    assert GroupedExperts(5, 12, 7, "gelu").w_out.shape == (5, 12, 7)
    with pytest.raises(ValueError, match="'relu'"):
        GroupedExperts(2, 4, 4, "relu")
    with pytest.raises(ValueError, match="'cutlass'"):
        GroupedExperts(2, 4, 4, "swiglu", "cutlass")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_grouped_experts_init_bounds_are_nn_linears_per_expert(activation):
    """Each expert starts as nn.Linear would: w_in ~ U(+-1/sqrt(D)), w_out ~ U(+-1/sqrt(F)), with D != F (64 vs 16)
    so that a bound taken from the wrong width shows (a dense MLP and an expert start alike)."""
    torch.manual_seed(6)
    d_model, ffn_hidden = 64, 16
    experts = GroupedExperts(4, d_model, ffn_hidden, activation)
    mlp = MLP(d_model, ffn_hidden, activation)
    for name, w, dense, fan_in in (("w_in", experts.w_in, mlp.w_in.weight, d_model),
                                   ("w_out", experts.w_out, mlp.w_out.weight, ffn_hidden)):
        bound = fan_in**-0.5
        # Thousands of uniform draws: the largest lies within 10% of the bound with certainty (0.9^4096).
        assert 0.9 * bound < w.abs().max() <= bound, name
        assert 0.9 * bound < dense.abs().max() <= bound, name


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_mlp_shape_and_values(activation):
    torch.manual_seed(5)
    mlp = MLP(13, 7, activation)
    assert mlp.w_in.weight.shape == ((14 if activation == "swiglu" else 7), 13)
    assert mlp.w_out.weight.shape == (13, 7)
    x = torch.randn(2, 3, 13)  # any leading shape
    y = mlp(x)
    assert y.shape == x.shape
    w_in, w_out = mlp.w_in.weight.detach().double(), mlp.w_out.weight.detach().double()
    expected = torch.stack([ref.mlp(row, w_in, w_out, activation) for row in x.reshape(-1, 13).double()])
    torch.testing.assert_close(y.reshape(-1, 13).double(), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="'tanh'"):
        MLP(4, 4, "tanh")


@pytest.mark.parametrize("impl", IMPLS)
def test_recompute_checkpoints_the_torch_paths_with_the_same_gradients(impl):
    # recompute=True: the torch paths run their MLP under activation checkpointing, keeping only the
    # input rows (not h (N, H) or the activation (N, F)); values and gradients are unchanged.
    torch.manual_seed(5)
    tokens_E = torch.tensor([3, 0, 4, 2])
    x = torch.randn(9, 16)
    grad_y = torch.randn(9, 16)
    experts = make_experts(4, 16, 24, "swiglu", impl, torch.float32)
    results = []
    for recompute in (False, True):
        experts.recompute = recompute
        x_leaf = x.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            y = experts(x_leaf, tokens_E)
        grads = torch.autograd.grad((y * grad_y).sum(), (x_leaf, experts.w_in, experts.w_out))
        results.append((saved, y.detach(), grads))
    (saved, y, grads), (saved_rc, y_rc, grads_rc) = results
    inputs = {(9, 16), (4, 48, 16), (4, 16, 24), (4,)}  # x, w_in, w_out, the counts
    assert set(saved_rc) <= inputs and not set(saved) <= inputs, (saved, saved_rc)
    torch.testing.assert_close(y_rc, y, rtol=0, atol=0)
    for a, b in zip(grads_rc, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # no autograd: no checkpoint either
        torch.testing.assert_close(experts(x, tokens_E), y, rtol=0, atol=0)


def test_recompute_comes_from_the_config_and_must_be_a_bool():
    from moe_engine.config import MoEConfig
    from moe_engine.layer import MoELayer

    layer = MoELayer.from_config(16, MoEConfig(num_experts=4, ffn_hidden=8, recompute_experts=True))
    assert layer.experts.recompute and "recompute=True" in repr(layer.experts)
    with pytest.raises(ValueError, match="recompute = 1: must be True or False"):
        GroupedExperts(4, 16, 8, recompute=1)
