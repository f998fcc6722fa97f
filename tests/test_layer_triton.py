"""The whole MoE layer on the Triton kernels (router gating, expert order, permute, grouped MLP,
unpermute) against the naive per-token reference, and through torch.compile.

On CPU the kernels run under Triton's interpreter (tests/conftest.py), so shapes stay small.
"""

from __future__ import annotations

import pytest
import torch

import reference_moe as ref
from moe_engine.config import MoEConfig, RouterConfig
from moe_engine.layer import MoELayer


@pytest.fixture(autouse=True)
def _triton_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_ENGINE_KERNELS", "triton")


def _layer(D: int, F: int, E: int, K: int, dtype: torch.dtype, **router) -> MoELayer:
    cfg = MoEConfig(num_experts=E, ffn_hidden=F, experts_impl="auto",
                    router=RouterConfig(top_k=K, aux_loss_coef=0.01, z_loss_coef=0.001, **router))
    return MoELayer.from_config(D, cfg).to(dtype)


def _reference(layer: MoELayer, x: torch.Tensor, K: int, **router) -> tuple[ref.ReferenceOutput, list[torch.Tensor], torch.Tensor]:
    params = [p.detach().double().requires_grad_() for p in (layer.router.weight, layer.experts.w_in, layer.experts.w_out)]
    x_ref = x.detach().double().requires_grad_()
    out = ref.moe_forward(x_ref, *params, top_k=K, aux_loss_coef=0.01, z_loss_coef=0.001, **router)
    return out, params, x_ref


@pytest.mark.parametrize(
    "T, D, F, E, K",
    [
        (1, 16, 16, 4, 2),   # T = 1
        (9, 16, 32, 7, 3),   # prime E, T below every block size
        (12, 16, 16, 4, 4),  # K = E
    ],
)
@pytest.mark.parametrize(
    "dtype, atol, rtol",
    [
        (torch.float32, 1e-5, 1e-5),
        (torch.bfloat16, 3e-2, 3e-2),  # bf16 inputs and weights, compared with fp64 on the same rounded values
    ],
)
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_triton_layer_matches_reference(T, D, F, E, K, dtype, atol, rtol, capacity_factor) -> None:
    torch.manual_seed(T * 100 + E)
    router = {"capacity_factor": capacity_factor}
    layer = _layer(D, F, E, K, dtype, **router)
    assert layer.experts.resolve_impl(torch.device("cpu"), dtype) == "triton"
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    out = layer(x)
    grad_y = torch.randn_like(out.y)
    loss = (out.y.float() * grad_y.float()).sum() + out.aux_loss
    grads = torch.autograd.grad(loss, [x, layer.router.weight, layer.experts.w_in, layer.experts.w_out])

    expected, params, x_ref = _reference(layer, x, K, **router)
    ref_loss = (expected.y_TD * grad_y.double()).sum() + expected.aux_loss
    ref_grads = torch.autograd.grad(ref_loss, [x_ref, *params])

    assert torch.equal(out.routing.experts_TK, expected.routing.experts_TK)
    scale = max(1.0, expected.y_TD.abs().max().item()) if dtype == torch.bfloat16 else 1.0
    torch.testing.assert_close(out.y.double(), expected.y_TD, atol=atol * scale, rtol=rtol)
    torch.testing.assert_close(out.aux_loss.double(), expected.aux_loss, atol=1e-5, rtol=1e-5)
    for name, got, want in zip(("x", "router", "w_in", "w_out"), grads, ref_grads):
        g_scale = max(1.0, want.abs().max().item()) if dtype == torch.bfloat16 else 1.0
        torch.testing.assert_close(got.double(), want, atol=atol * g_scale, rtol=rtol, msg=name)


@pytest.mark.parametrize("recompute", [False, True], ids=["saved_h", "recompute_experts"])
def test_compiled_triton_layer_matches_eager(recompute: bool) -> None:
    torch.manual_seed(0)
    layer = _layer(16, 16, 4, 2, torch.float32)
    layer.experts.recompute = recompute  # the backward's extra up-projection GEMM traces too
    x = torch.randn(2, 5, 16, requires_grad=True)
    eager = layer(x)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out.y, eager.y)
    torch.testing.assert_close(out.aux_loss, eager.aux_loss)
    # Every input: the router's weight gradient comes from the fused MLP-and-combine op's backward GEMM.
    params = [x, layer.router.weight, layer.experts.w_in, layer.experts.w_out]
    g_eager = torch.autograd.grad(eager.y.sum() + eager.aux_loss, params)
    g_compiled = torch.autograd.grad(out.y.sum() + out.aux_loss, params)
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b)


def test_triton_layer_reads_tokens_through_the_index_without_the_permuted_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    # The default local dispatcher hands GatheredRows over; the Triton experts must never copy them out.
    from moe_engine.kernels.permute import GatheredRows

    def refuse(self):
        raise AssertionError("the fused path materialised x_ND")

    monkeypatch.setattr(GatheredRows, "materialize", refuse)
    torch.manual_seed(1)
    layer = _layer(16, 16, 5, 2, torch.float32)
    x = torch.randn(7, 16, requires_grad=True)
    out = layer(x)
    out.y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_triton_layer_keeps_no_expert_outputs_for_the_backward_and_with_recompute_no_h() -> None:
    # The local layer runs its experts and combine as one op (moe_engine.kernels.mlp_combine): nothing
    # of shape (T*K, D) is saved for the backward, though the router still gets its gradient.
    torch.manual_seed(2)
    T, D, F, E, K = 9, 40, 16, 4, 2
    layer = _layer(D, F, E, K, torch.float32)
    x = torch.randn(T, D, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    assert (T * K, 2 * F) in saved  # the pre-activation h is what the experts keep
    assert (T * K, D) not in saved
    out.y.sum().backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0

    # moe.recompute_experts: not h either (the backward recomputes it), and the same gradients.
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    layer.experts.recompute = True
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out_rc = layer(x)
    assert (T * K, 2 * F) not in saved and (T * K, D) not in saved
    torch.testing.assert_close(out_rc.y, out.y, rtol=0, atol=0)
    out_rc.y.sum().backward()
    for got, expected in zip((p.grad for p in layer.parameters()), grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
