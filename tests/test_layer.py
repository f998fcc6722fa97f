"""Tests of the whole MoELayer (router -> dispatch -> experts -> combine (+ shared experts)).

Every test builds the layer with `MoELayer.from_config` and compares it with the naive
per-token, per-choice loop of tests/reference_moe.py, run in float64 on the same (for bf16:
the same bf16-rounded) parameters and inputs: the output y, the aux loss, the rows per expert,
and the gradients of the input and of every parameter, for the loss sum(y * G) + aux_loss.
"""

from __future__ import annotations

import math

import pytest
import torch

import reference_moe as ref
from moe_engine.config import MoEConfig, RouterConfig
from moe_engine.layer import MoELayer, MoEOutput
from moe_engine.routing import RoutingContext


@pytest.fixture(autouse=True)
def _torch_reference_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests pin down the torch paths (and what "auto" picks on CPU); the Triton kernels
    have their own tests (tests/test_kernel_*.py, tests/test_layer_triton.py)."""
    monkeypatch.delenv("MOE_ENGINE_KERNELS", raising=False)


# (dtype, atol, rtol): fp32 against the float64 reference; bf16 parameters and inputs against the
# reference computed from the same bf16-rounded values. For bf16, atol is relative to the scale of
# the compared tensor (see `assert_close`).
DTYPE_TOLERANCES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.bfloat16, 2e-2, 2e-2),
]


def build_layer(d_model: int, cfg: MoEConfig, dtype: torch.dtype) -> MoELayer:
    """The layer of `cfg`, with router and expert weights of unit-ish scale (clear top-k gaps, O(1) outputs)."""
    layer = MoELayer.from_config(d_model, cfg)
    with torch.no_grad():
        layer.router.weight.normal_(std=d_model**-0.5 * 4)
        layer.experts.w_in.normal_(std=d_model**-0.5)
        layer.experts.w_out.normal_(std=cfg.ffn_hidden**-0.5)
    return layer.to(dtype)


def named_parameters(layer: MoELayer) -> dict[str, torch.Tensor]:
    """The parameters the reference reads, by name (the shared ones only where the layer has them)."""
    params = {
        "router": layer.router.weight,
        "w_in": layer.experts.w_in,
        "w_out": layer.experts.w_out,
    }
    if layer.shared_experts is not None:
        params["shared_w_in"] = layer.shared_experts.w_in.weight
        params["shared_w_out"] = layer.shared_experts.w_out.weight
    if layer.shared_expert_gate is not None:
        params["shared_gate"] = layer.shared_expert_gate.weight
    return params


def run_reference(
    cfg: MoEConfig, x_TD: torch.Tensor, params: dict[str, torch.Tensor], sequence_ids_T: torch.Tensor | None
) -> ref.ReferenceOutput:
    router = cfg.router
    shared = None
    if "shared_w_in" in params:
        shared = ref.SharedExpertWeights(params["shared_w_in"], params["shared_w_out"], params.get("shared_gate"))
    return ref.moe_forward(
        x_TD,
        params["router"],
        params["w_in"],
        params["w_out"],
        top_k=router.top_k,
        activation=cfg.activation,
        score_function="sigmoid" if router.type == "sigmoid_topk" else "softmax",
        renormalize=router.renormalize,
        scaling_factor=router.scaling_factor,
        capacity_factor=router.capacity_factor,
        drop_policy=router.drop_policy,
        aux_loss_type=router.aux_loss_type,
        aux_loss_coef=router.aux_loss_coef,
        z_loss_coef=router.z_loss_coef,
        sequence_ids_T=sequence_ids_T,
        shared=shared,
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str) -> None:
    """assert_close with, for bf16 results, atol times the reference tensor's largest magnitude (if above 1).

    A bf16 GEMM rounds each output to 8 bits of its own size, and an entry of a gradient is a sum
    of such rounded terms: its absolute error follows the size of the terms (the tensor's scale),
    not the size of the entry, which cancellation can make small. A wrong result (a missing
    weight, a swapped gate) is off by the order of the scale itself, far beyond 2e-2 of it.
    """
    if actual.dtype == torch.bfloat16:
        atol = atol * max(1.0, expected.abs().max().item()) if expected.numel() else atol
    torch.testing.assert_close(
        actual.double(), expected.detach(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )


def check_layer(
    layer: MoELayer,
    cfg: MoEConfig,
    x: torch.Tensor,
    atol: float,
    rtol: float,
    sequence_ids_T: torch.Tensor | None = None,
) -> tuple[MoEOutput, dict[str, torch.Tensor], ref.ReferenceOutput]:
    """Compare forward and every gradient of `layer` on `x` (any leading shape) with the reference.

    Returns the layer's output, its gradients by name ("x" and the parameter names) and the
    reference output, for the callers' own checks.
    """
    d_model = x.shape[-1]
    x = x.detach().requires_grad_()
    grad_y = torch.randn(x.shape, dtype=torch.float64)
    ctx = RoutingContext(sequence_ids_T=sequence_ids_T) if sequence_ids_T is not None else None

    out = layer(x, ctx)
    params = named_parameters(layer)
    loss = (out.y.float() * grad_y.float()).sum() + out.aux_loss
    grads = dict(zip(["x", *params], torch.autograd.grad(loss, [x, *params.values()])))

    x_ref = x.detach().double().requires_grad_()
    params_ref = {name: p.detach().double().requires_grad_() for name, p in params.items()}
    expected = run_reference(cfg, x_ref.reshape(-1, d_model), params_ref, sequence_ids_T)
    ref_loss = (expected.y_TD * grad_y.reshape(-1, d_model)).sum() + expected.aux_loss
    ref_grads = dict(zip(["x", *params_ref], torch.autograd.grad(ref_loss, [x_ref, *params_ref.values()])))

    # Routing is computed in fp32 from the same values: the same experts must be picked.
    assert torch.equal(out.routing.experts_TK, expected.routing.experts_TK)
    assert out.y.shape == x.shape and out.y.dtype == x.dtype
    assert_close(out.y.reshape(-1, d_model), expected.y_TD, atol, rtol, "y")
    assert out.aux_loss.dtype == torch.float32
    assert_close(out.aux_loss, expected.aux_loss, atol, rtol, "aux_loss")
    assert out.tokens_per_expert_E.dtype == torch.int64 and not out.tokens_per_expert_E.requires_grad
    assert out.tokens_per_expert_E.tolist() == expected.tokens_per_expert
    for name, got in grads.items():
        assert got.dtype == (x.dtype if name == "x" else params[name].dtype), name
        assert_close(got, ref_grads[name], atol, rtol, f"grad of {name}")
    return out, grads, expected


def moe_config(
    num_experts: int, ffn_hidden: int, top_k: int, activation: str = "swiglu", **router_and_moe
) -> MoEConfig:
    """An MoEConfig with visible aux-loss coefficients; keys of RouterConfig go to the router."""
    router_fields = set(RouterConfig.__dataclass_fields__)
    router_kwargs = {"aux_loss_coef": 0.1, "z_loss_coef": 0.01}
    router_kwargs |= {k: v for k, v in router_and_moe.items() if k in router_fields}
    moe_kwargs = {k: v for k, v in router_and_moe.items() if k not in router_fields}
    return MoEConfig(
        num_experts=num_experts,
        ffn_hidden=ffn_hidden,
        activation=activation,
        router=RouterConfig(top_k=top_k, **router_kwargs),
        **moe_kwargs,
    )


# ---------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLERANCES)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize(
    "num_tokens, d_model, ffn_hidden, num_experts, top_k, impl",
    [
        (8, 16, 8, 4, 2, "grouped_mm"),  # typical
        (1, 16, 8, 4, 2, "grouped_mm"),  # T = 1: most experts get no token
        (6, 16, 8, 4, 4, "grouped_mm"),  # K = E: every token on every expert
        (10, 16, 8, 7, 3, "grouped_mm"),  # prime E
        (5, 16, 8, 1, 1, "grouped_mm"),  # E = 1, K = 1: a dense MLP with weight 1
        (9, 13, 8, 4, 2, "loop"),  # odd D = 13: torch._grouped_mm cannot run, the loop path does
    ],
)
def test_layer_matches_reference(
    num_tokens, d_model, ffn_hidden, num_experts, top_k, impl, activation, dtype, atol, rtol
):
    torch.manual_seed(0)
    cfg = moe_config(num_experts, ffn_hidden, top_k, activation)
    layer = build_layer(d_model, cfg, dtype)
    assert layer.experts.resolve_impl(torch.device("cpu"), dtype) == impl
    x_TD = torch.randn(num_tokens, d_model).to(dtype)
    out, _, _ = check_layer(layer, cfg, x_TD, atol, rtol)
    assert int(out.tokens_per_expert_E.sum()) == num_tokens * top_k  # dropless: every choice computed


# ---------------------------------------------------------------------------------------------
# Routing extremes
# ---------------------------------------------------------------------------------------------


def _force_logit(layer: MoELayer, x_TD: torch.Tensor, experts: list[int], value: float) -> torch.Tensor:
    """Make feature 0 of every token 3 and the router's feature-0 weight of `experts` `value`:
    their logits move by 3 * value for every token. Returns the new x."""
    with torch.no_grad():
        layer.router.weight[:, 0] = 0.0
        layer.router.weight[experts, 0] = value
    x_TD = x_TD.clone()
    x_TD[:, 0] = 3.0
    return x_TD


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLERANCES)
def test_all_tokens_forced_to_one_expert(dtype, atol, rtol):
    torch.manual_seed(1)
    num_tokens, d_model = 12, 16
    cfg = moe_config(4, 8, 1)
    layer = build_layer(d_model, cfg, dtype)
    x_TD = _force_logit(layer, torch.randn(num_tokens, d_model), [2], 10.0).to(dtype)
    out, grads, _ = check_layer(layer, cfg, x_TD, atol, rtol)
    assert out.tokens_per_expert_E.tolist() == [0, 0, num_tokens, 0]
    # The idle experts' weights get exactly zero gradient.
    assert (grads["w_in"][[0, 1, 3]] == 0).all() and (grads["w_out"][[0, 1, 3]] == 0).all()
    assert (grads["w_in"][2] != 0).any()


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLERANCES)
def test_experts_with_no_tokens(dtype, atol, rtol):
    torch.manual_seed(2)
    num_tokens, d_model = 10, 16
    cfg = moe_config(6, 8, 2)
    layer = build_layer(d_model, cfg, dtype)
    # Experts 1 and 4 (between and among busy ones) are pushed 30 logits below the rest.
    x_TD = _force_logit(layer, torch.randn(num_tokens, d_model), [1, 4], -10.0).to(dtype)
    out, grads, _ = check_layer(layer, cfg, x_TD, atol, rtol)
    counts = out.tokens_per_expert_E.tolist()
    assert counts[1] == counts[4] == 0 and sum(counts) == num_tokens * 2
    assert (grads["w_in"][[1, 4]] == 0).all() and (grads["w_out"][[1, 4]] == 0).all()


# ---------------------------------------------------------------------------------------------
# Capacity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLERANCES)
@pytest.mark.parametrize("drop_policy", ["position", "score"])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
def test_capacity_drops(capacity_factor, drop_policy, dtype, atol, rtol):
    torch.manual_seed(3)
    num_tokens, d_model, num_experts, top_k = 12, 16, 4, 2
    cfg = moe_config(num_experts, 8, top_k, capacity_factor=capacity_factor, drop_policy=drop_policy)
    layer = build_layer(d_model, cfg, dtype)
    # Expert 0's logit raised by 3 for every token: it is over capacity at both factors.
    with torch.no_grad():
        layer.router.weight[0, 0] = 3.0
    x_TD = torch.randn(num_tokens, d_model)
    x_TD[:, 0] = 1.0
    x_TD = x_TD.to(dtype)
    out, _, expected = check_layer(layer, cfg, x_TD, atol, rtol)

    capacity = expected.routing.capacity
    assert out.routing.capacity == capacity == max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))
    counts = out.tokens_per_expert_E.tolist()
    assert max(counts) <= capacity
    num_dropped = int((out.routing.experts_TK < 0).sum())
    assert num_dropped > 0 and sum(counts) == num_tokens * top_k - num_dropped
    assert (out.routing.weights_TK[out.routing.experts_TK < 0] == 0).all()


@pytest.mark.parametrize("drop_policy", ["position", "score"])
def test_dropless_equals_large_capacity(drop_policy):
    # capacity_factor = E gives C = T*K: nothing can be dropped, the results must be identical.
    torch.manual_seed(4)
    num_tokens, d_model, num_experts, top_k = 10, 16, 4, 2
    dropless_cfg = moe_config(num_experts, 8, top_k)
    capped_cfg = moe_config(num_experts, 8, top_k, capacity_factor=float(num_experts), drop_policy=drop_policy)
    dropless = build_layer(d_model, dropless_cfg, torch.float32)
    capped = build_layer(d_model, capped_cfg, torch.float32)
    capped.load_state_dict(dropless.state_dict())
    x_TD = torch.randn(num_tokens, d_model)

    results = []
    for layer in (dropless, capped):
        x = x_TD.clone().requires_grad_()
        out = layer(x)
        params = list(named_parameters(layer).values())
        grads = torch.autograd.grad(out.y.sum() + out.aux_loss, [x, *params])
        results.append((out, grads))
    (a, grads_a), (b, grads_b) = results
    assert b.routing.capacity == num_tokens * top_k and a.routing.capacity is None
    assert torch.equal(a.y, b.y) and torch.equal(a.aux_loss, b.aux_loss)
    assert torch.equal(a.tokens_per_expert_E, b.tokens_per_expert_E)
    for ga, gb in zip(grads_a, grads_b):
        assert torch.equal(ga, gb)


# ---------------------------------------------------------------------------------------------
# Router variants, shared experts, shapes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLERANCES)
@pytest.mark.parametrize("renormalize", [True, False])
def test_sigmoid_router_with_scaling_factor(renormalize, dtype, atol, rtol):
    # DeepSeek-V3 style: sigmoid scores, top-k, (renormalise), times routed_scaling_factor 2.5.
    torch.manual_seed(5)
    cfg = moe_config(6, 8, 2, type="sigmoid_topk", scaling_factor=2.5, renormalize=renormalize)
    layer = build_layer(16, cfg, dtype)
    x_TD = torch.randn(9, 16).to(dtype)
    out, _, _ = check_layer(layer, cfg, x_TD, atol, rtol)
    if renormalize:
        torch.testing.assert_close(out.routing.weights_TK.sum(-1), torch.full((9,), 2.5))


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLERANCES)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("shared_expert_gate", [False, True])
def test_shared_experts(shared_expert_gate, activation, dtype, atol, rtol):
    torch.manual_seed(6)
    cfg = moe_config(4, 8, 2, activation, num_shared_experts=2, shared_expert_gate=shared_expert_gate)
    layer = build_layer(16, cfg, dtype)
    # Two shared experts are one dense MLP of width 2F.
    assert layer.shared_experts.w_out.weight.shape == (16, 16)
    assert (layer.shared_expert_gate is not None) == shared_expert_gate
    x_TD = torch.randn(7, 16).to(dtype)
    _, grads, _ = check_layer(layer, cfg, x_TD, atol, rtol)
    assert (grads["shared_w_in"] != 0).any()


def test_bf16_tokens_with_fp32_parameters_including_shared_experts():
    # The router and the routed experts cast their weights to the tokens' dtype; the shared experts
    # and their gate must too (no autocast here), and the output keeps the input's dtype.
    torch.manual_seed(16)
    cfg = moe_config(4, 8, 2, num_shared_experts=1, shared_expert_gate=True)
    layer = build_layer(16, cfg, torch.float32)
    x_TD = torch.randn(7, 16)
    out = layer(x_TD.bfloat16())
    assert out.y.dtype == torch.bfloat16
    torch.testing.assert_close(out.y.float(), layer(x_TD).y, atol=5e-2, rtol=5e-2)
    out.y.float().sum().backward()
    assert layer.shared_experts.w_in.weight.grad.dtype == torch.float32
    assert layer.shared_expert_gate.weight.grad.abs().sum() > 0


def test_default_layer_compiles_on_cpu_in_fp32():
    # experts_impl auto takes torch._grouped_mm in eager fp32 on CPU, whose traced (meta) kernel is
    # bf16-only: under torch.compile auto takes the loop instead, with the same numbers.
    torch.manual_seed(17)
    layer = MoELayer.from_config(16, MoEConfig(num_experts=4, ffn_hidden=16))
    x_TD = torch.randn(6, 16)
    eager = layer(x_TD).y
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager")(x_TD).y
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPE_TOLERANCES)
def test_leading_shape_preserved(dtype, atol, rtol):
    torch.manual_seed(7)
    batch, seq, d_model = 3, 5, 16
    cfg = moe_config(4, 8, 2, aux_loss_type="seq_switch")
    layer = build_layer(d_model, cfg, dtype)
    # A non-contiguous (B, S, D) view, and one sequence per batch row for the sequence-level loss.
    x_BSD = torch.randn(seq, batch, d_model).to(dtype).transpose(0, 1)
    sequence_ids_T = torch.arange(batch).repeat_interleave(seq)
    out, _, _ = check_layer(layer, cfg, x_BSD, atol, rtol, sequence_ids_T=sequence_ids_T)
    assert out.y.shape == (batch, seq, d_model)
    flat = layer(x_BSD.reshape(-1, d_model), RoutingContext(sequence_ids_T=sequence_ids_T))
    assert torch.equal(out.y.reshape(-1, d_model), flat.y)


def test_tokens_per_expert_counts():
    torch.manual_seed(8)
    num_tokens, num_experts, top_k = 11, 5, 2
    cfg = moe_config(num_experts, 8, top_k)
    layer = build_layer(16, cfg, torch.float32)
    out = layer(torch.randn(num_tokens, 16))
    expected = torch.bincount(out.routing.experts_TK.flatten(), minlength=num_experts)
    assert torch.equal(out.tokens_per_expert_E, expected)
    assert out.tokens_per_expert_E.shape == (num_experts,)
    assert int(out.tokens_per_expert_E.sum()) == num_tokens * top_k


def test_shared_expert_gate_bias_is_used() -> None:
    # A gate built with a bias (e.g. by a user, from_config builds none) must apply it.
    from torch import nn

    from moe_engine.experts import MLP, GroupedExperts
    from moe_engine.routing.router import TopKRouter

    torch.manual_seed(0)
    router, experts, shared = TopKRouter(8, 4, 2), GroupedExperts(4, 8, 16), MLP(8, 16)
    gate = nn.Linear(8, 1, bias=True)
    with torch.no_grad():
        gate.bias.fill_(2.0)
    x = torch.randn(6, 8)
    y = MoELayer(router, experts, shared_experts=shared, shared_expert_gate=gate)(x).y
    y0 = MoELayer(router, experts)(x).y
    torch.testing.assert_close(y - y0, torch.sigmoid(gate(x)) * shared(x), rtol=1e-5, atol=1e-5)
