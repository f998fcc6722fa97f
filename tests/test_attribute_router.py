"""Tests of moe_engine.mtl.attribute_router: Conditional MoE / Uni-Perceiver-MoE attribute routing.

The router (fp32) is compared with a float64 transcription of the paper's gate written here,
g_t = LayerNorm(W_a a_t + b_a), logits_t = W_g g_t (or W_g [g_t ; x_t]), followed by the naive
top-k loop of tests/reference_moe.py; gradients of every parameter and of x come from autograd
through that transcription. Noise is checked exactly (same RNG draws) and statistically.
"""

from __future__ import annotations

import math

import pytest
import torch

import reference_moe as ref
from moe_engine.experts import GroupedExperts
from moe_engine.layer import MoELayer
from moe_engine.mtl.attribute_router import UNI_PERCEIVER_ATTRIBUTES, AttributeRouter, uni_perceiver_attributes
from moe_engine.routing import RoutingContext

FP32_ATOL, FP32_RTOL = 1e-6, 1e-5
PRESETS = tuple(UNI_PERCEIVER_ATTRIBUTES)


@pytest.fixture(autouse=True)
def _torch_reference_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch path of topk_gating on CPU; the Triton kernel has its own tests."""
    monkeypatch.delenv("MOE_ENGINE_KERNELS", raising=False)


def make_router(d_model: int, num_experts: int, num_attributes: int, top_k: int, **kwargs) -> AttributeRouter:
    """A router in eval mode (no noise) with non-trivial LayerNorm affine and clear top-k gaps."""
    router = AttributeRouter(d_model, num_experts, num_attributes, top_k, **kwargs)
    with torch.no_grad():
        router.attribute_proj.weight.normal_()
        router.attribute_proj.bias.normal_()
        router.attribute_norm.weight.normal_(1.0, 0.5)
        router.attribute_norm.bias.normal_(0.0, 0.5)
        router.weight.normal_()
    return router.eval()


def random_attributes(num_tokens: int, num_attributes: int, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(num_tokens, num_attributes) < 0.5
    if not dtype.is_floating_point:
        return torch.randint(0, 2, (num_tokens, num_attributes), dtype=dtype)
    return torch.randn(num_tokens, num_attributes, dtype=dtype)


def router_params(router: AttributeRouter) -> dict[str, torch.Tensor]:
    return {
        "proj_weight": router.attribute_proj.weight,
        "proj_bias": router.attribute_proj.bias,
        "norm_weight": router.attribute_norm.weight,
        "norm_bias": router.attribute_norm.bias,
        "gate": router.weight,
    }


def reference_gate_input(
    params: dict[str, torch.Tensor], attributes_TA: torch.Tensor, x_TD: torch.Tensor, use_tokens: bool, eps: float
) -> torch.Tensor:
    """[LayerNorm(W_a a_t + b_a) ; x_t] (x_t only with use_tokens) in float64, LayerNorm written out."""
    h_TM = attributes_TA.double() @ params["proj_weight"].t() + params["proj_bias"]
    mean_T1 = h_TM.mean(-1, keepdim=True)
    var_T1 = ((h_TM - mean_T1) ** 2).mean(-1, keepdim=True)
    g_TM = (h_TM - mean_T1) / torch.sqrt(var_T1 + eps) * params["norm_weight"] + params["norm_bias"]
    return torch.cat([g_TM, x_TD.double()], dim=-1) if use_tokens else g_TM


def reference_routing(router: AttributeRouter, params, attributes_TA, x_TD) -> ref.ReferenceRouting:
    gate_in = reference_gate_input(params, attributes_TA, x_TD, router.use_tokens, router.attribute_norm.eps)
    return ref.route(
        gate_in, params["gate"], router.top_k, renormalize=router.renormalize,
        capacity_factor=router.capacity_factor, drop_policy=router.drop_policy,
    )


def float64_leaves(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: p.detach().double().requires_grad_() for name, p in params.items()}


# ---------------------------------------------------------------------------------------------
# The router against the transcription
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_tokens, d_model, num_experts, top_k, num_attributes, attribute_dim, use_tokens, attr_dtype",
    [
        (16, 8, 8, 2, 8, None, False, torch.float32),  # the paper's shape: 8 experts, top-2, 8 attribute bits
        (1, 8, 4, 2, 8, None, True, torch.float32),  # T = 1, attributes beside the token
        (9, 5, 7, 3, 3, 6, True, torch.bool),  # prime E, odd D, bool attributes
        (6, 4, 3, 3, 5, 4, False, torch.int64),  # K = E, integer 0/1 attributes
        (11, 6, 6, 1, 8, 3, True, torch.float64),  # E not a power of two, K = 1, fp64 attributes
    ],
)
def test_router_matches_reference(
    num_tokens, d_model, num_experts, top_k, num_attributes, attribute_dim, use_tokens, attr_dtype
):
    torch.manual_seed(0)
    router = make_router(d_model, num_experts, num_attributes, top_k, attribute_dim=attribute_dim, use_tokens=use_tokens)
    x = torch.randn(num_tokens, d_model, requires_grad=True)
    attributes_TA = random_attributes(num_tokens, num_attributes, attr_dtype)
    routing = router(x, RoutingContext(attributes_TA=attributes_TA))

    params64 = float64_leaves(router_params(router))
    x64 = x.detach().double().requires_grad_()
    expected = reference_routing(router, params64, attributes_TA, x64)
    assert routing.experts_TK.dtype == torch.int64 and routing.weights_TK.dtype == torch.float32
    assert routing.capacity is None and routing.aux_loss.item() == 0.0 and dict(routing.aux_terms) == {}
    assert torch.equal(routing.experts_TK, expected.experts_TK)
    torch.testing.assert_close(routing.weights_TK.double(), expected.weights_TK.detach(), atol=FP32_ATOL, rtol=FP32_RTOL)
    torch.testing.assert_close(routing.scores_TE.double(), expected.scores_TE.detach(), atol=FP32_ATOL, rtol=FP32_RTOL)

    grad_w = torch.randn(num_tokens, top_k, dtype=torch.float64)
    grad_s = torch.randn(num_tokens, num_experts, dtype=torch.float64)
    ((routing.weights_TK.double() * grad_w).sum() + (routing.scores_TE.double() * grad_s).sum()).backward()
    ((expected.weights_TK * grad_w).sum() + (expected.scores_TE * grad_s).sum()).backward()
    for name, param in router_params(router).items():
        torch.testing.assert_close(param.grad.double(), params64[name].grad, atol=1e-5, rtol=1e-5, msg=name)
    if use_tokens:
        torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)
    else:
        assert x.grad is None  # the gate never reads the features


def test_bf16_tokens_and_autocast_keep_the_gate_in_fp32():
    torch.manual_seed(1)
    router = make_router(8, 6, 8, 2, use_tokens=True)
    x_bf16 = torch.randn(10, 8).bfloat16().requires_grad_()
    attributes_TA = random_attributes(10, 8, torch.float32)
    ctx = RoutingContext(attributes_TA=attributes_TA)
    routing = router(x_bf16, ctx)
    params64 = float64_leaves(router_params(router))
    x64 = x_bf16.detach().double().requires_grad_()
    expected = reference_routing(router, params64, attributes_TA, x64)
    assert torch.equal(routing.experts_TK, expected.experts_TK)
    torch.testing.assert_close(routing.weights_TK.double(), expected.weights_TK.detach(), atol=FP32_ATOL, rtol=FP32_RTOL)
    routing.weights_TK.sum().backward()
    expected.weights_TK.sum().backward()
    assert x_bf16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x_bf16.grad.double(), x64.grad, atol=2e-2, rtol=2e-2)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = router(x_bf16.detach(), ctx)
    assert under_autocast.scores_TE.dtype == torch.float32
    torch.testing.assert_close(under_autocast.scores_TE, routing.scores_TE, atol=0, rtol=0)


def test_attributes_decide_the_routing_not_the_features():
    torch.manual_seed(2)
    router = make_router(8, 8, 8, 2)
    kinds = [PRESETS[t % len(PRESETS)] for t in range(40)]
    attributes_TA = torch.tensor([uni_perceiver_attributes(k) for k in kinds])
    routing = router(torch.randn(40, 8) * 10, RoutingContext(attributes_TA=attributes_TA))
    by_kind: dict[str, tuple] = {}
    for t, kind in enumerate(kinds):
        row = (tuple(routing.experts_TK[t].tolist()), routing.weights_TK[t])
        if kind in by_kind:
            assert row[0] == by_kind[kind][0], kind
            torch.testing.assert_close(row[1], by_kind[kind][1], atol=0, rtol=0)
        else:
            by_kind[kind] = row
    # The same token features under different attributes go to different experts.
    x_same = torch.randn(1, 8).expand(len(PRESETS), 8)
    presets_TA = torch.tensor([uni_perceiver_attributes(k) for k in PRESETS])
    chosen = router(x_same, RoutingContext(attributes_TA=presets_TA)).experts_TK
    assert len({tuple(row) for row in chosen.tolist()}) >= 3


def test_use_tokens_lets_features_move_the_routing():
    torch.manual_seed(3)
    router = make_router(8, 8, 8, 2, use_tokens=True)
    attributes_TA = torch.tensor([uni_perceiver_attributes("mlm_text")] * 32)
    chosen = router(torch.randn(32, 8) * 3, RoutingContext(attributes_TA=attributes_TA)).experts_TK
    assert len({tuple(row) for row in chosen.tolist()}) > 1


# ---------------------------------------------------------------------------------------------
# Noise: training only, std 1/E by default
# ---------------------------------------------------------------------------------------------


def test_training_noise_is_gaussian_on_the_logits():
    torch.manual_seed(4)
    num_tokens, num_experts = 7, 5
    router = make_router(6, num_experts, 4, 2, use_tokens=True)
    x = torch.randn(num_tokens, 6)
    ctx = RoutingContext(attributes_TA=random_attributes(num_tokens, 4, torch.float32))
    params64 = float64_leaves(router_params(router))
    gate_in = reference_gate_input(params64, ctx.attributes_TA, x, True, router.attribute_norm.eps).detach()
    logits_TE = gate_in @ params64["gate"].detach().t()

    router.train()
    torch.manual_seed(123)
    routing = router(x, ctx)
    torch.manual_seed(123)
    noisy_TE = logits_TE + torch.randn(num_tokens, num_experts).double() / num_experts
    expected = ref.route(noisy_TE, torch.eye(num_experts, dtype=torch.float64), 2)
    assert torch.equal(routing.experts_TK, expected.experts_TK)
    torch.testing.assert_close(routing.scores_TE.double(), expected.scores_TE, atol=FP32_ATOL, rtol=FP32_RTOL)


@pytest.mark.parametrize("noise_std, expected_std", [(None, 1 / 8), (0.5, 0.5)])
def test_training_noise_std(noise_std, expected_std):
    torch.manual_seed(5)
    num_tokens, num_experts = 4000, 8
    router = make_router(8, num_experts, 8, 2, noise_std=noise_std)
    ctx = RoutingContext(attributes_TA=torch.tensor([uni_perceiver_attributes("caption_text")] * num_tokens))
    x = torch.randn(num_tokens, 8)
    clean = router(x, ctx).scores_TE
    noisy = router.train()(x, ctx).scores_TE
    # log softmax(l + n) - log softmax(l) = n - c_t; centring each row over experts leaves n's deviations,
    # whose variance is std^2 (1 - 1/E).
    diff_TE = noisy.double().log() - clean.double().log()
    centred = diff_TE - diff_TE.mean(-1, keepdim=True)
    measured = math.sqrt(centred.square().mean().item() / (1 - 1 / num_experts))
    assert measured == pytest.approx(expected_std, rel=0.03)


def test_no_noise_in_eval_or_with_zero_std():
    torch.manual_seed(6)
    router = make_router(8, 8, 8, 2)
    ctx = RoutingContext(attributes_TA=random_attributes(20, 8, torch.float32))
    x = torch.randn(20, 8)
    first, second = router(x, ctx), router(x, ctx)
    torch.testing.assert_close(first.scores_TE, second.scores_TE, atol=0, rtol=0)
    noiseless = make_router(8, 8, 8, 2, noise_std=0.0)
    noiseless.load_state_dict(router.state_dict())
    torch.testing.assert_close(noiseless.train()(x, ctx).scores_TE, first.scores_TE, atol=0, rtol=0)
    noisy = router.train()(x, ctx).scores_TE
    assert not torch.equal(noisy, first.scores_TE)


# ---------------------------------------------------------------------------------------------
# Balance loss and capacity
# ---------------------------------------------------------------------------------------------


def test_balance_loss_matches_switch_reference():
    torch.manual_seed(7)
    router = make_router(8, 5, 6, 2, use_tokens=True, aux_loss_coef=0.25)
    x = torch.randn(13, 8)
    attributes_TA = random_attributes(13, 6, torch.float32)
    routing = router(x, RoutingContext(attributes_TA=attributes_TA))
    params64 = float64_leaves(router_params(router))
    expected = reference_routing(router, params64, attributes_TA, x)
    balance = ref.switch_loss(expected.scores_TE, expected.experts_before_drop_TK)
    torch.testing.assert_close(routing.aux_terms["balance_loss"].double(), balance.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(routing.aux_loss.double(), 0.25 * balance.detach(), atol=1e-6, rtol=1e-5)
    routing.aux_loss.backward()
    (0.25 * balance).backward()
    for name, param in router_params(router).items():
        torch.testing.assert_close(param.grad.double(), params64[name].grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("drop_policy", ["position", "score"])
def test_capacity_drops_match_reference(drop_policy):
    torch.manual_seed(8)
    router = make_router(8, 4, 8, 2, use_tokens=True, capacity_factor=0.5, drop_policy=drop_policy)
    x = torch.randn(12, 8)
    attributes_TA = random_attributes(12, 8, torch.float32)
    routing = router(x, RoutingContext(attributes_TA=attributes_TA))
    expected = reference_routing(router, float64_leaves(router_params(router)), attributes_TA, x)
    assert routing.capacity == expected.capacity == 3
    assert (routing.experts_TK == -1).any()
    assert torch.equal(routing.experts_TK, expected.experts_TK)
    torch.testing.assert_close(routing.weights_TK.double(), expected.weights_TK.detach(), atol=FP32_ATOL, rtol=FP32_RTOL)


# ---------------------------------------------------------------------------------------------
# Inside an MoELayer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "activation, use_tokens, capacity_factor",
    [("swiglu", False, None), ("gelu", True, None), ("swiglu", True, 1.0)],
)
def test_moe_layer_matches_per_token_loop(activation, use_tokens, capacity_factor):
    torch.manual_seed(9)
    num_tokens, d_model, num_experts, hidden, top_k = 11, 6, 5, 7, 2
    router = make_router(d_model, num_experts, 8, top_k, use_tokens=use_tokens, capacity_factor=capacity_factor)
    experts = GroupedExperts(num_experts, d_model, hidden, activation)
    layer = MoELayer(router, experts)
    x = torch.randn(num_tokens, d_model, requires_grad=True)
    kinds = [PRESETS[t % len(PRESETS)] for t in range(num_tokens)]
    attributes_TA = torch.tensor([uni_perceiver_attributes(k) for k in kinds])
    out = layer(x, RoutingContext(attributes_TA=attributes_TA))

    params = {**router_params(router), "w_in": experts.w_in, "w_out": experts.w_out}
    params64 = float64_leaves(params)
    x64 = x.detach().double().requires_grad_()
    routing = reference_routing(router, params64, attributes_TA, x64)
    rows = []
    for t in range(num_tokens):
        y_D = torch.zeros(d_model, dtype=torch.float64)
        for k in range(top_k):
            e = int(routing.experts_TK[t, k])
            if e >= 0:
                y_D = y_D + routing.weights_TK[t, k] * ref.mlp(x64[t], params64["w_in"][e], params64["w_out"][e], activation)
        rows.append(y_D)
    y64 = torch.stack(rows)
    torch.testing.assert_close(out.y.double(), y64.detach(), atol=1e-5, rtol=1e-5)

    grad_y = torch.randn(num_tokens, d_model, dtype=torch.float64)
    (out.y.double() * grad_y).sum().backward()
    (y64 * grad_y).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)
    for name, param in params.items():
        torch.testing.assert_close(param.grad.double(), params64[name].grad, atol=1e-5, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------
# Presets and errors
# ---------------------------------------------------------------------------------------------


def test_uni_perceiver_presets():
    assert uni_perceiver_attributes("image_classification_input") == (1, 0, 0, 1, 1, 0, 0, 0)
    assert uni_perceiver_attributes("mlm_text") == (0, 1, 0, 1, 0, 1, 0, 0)
    assert uni_perceiver_attributes("caption_image") == (1, 1, 0, 1, 1, 0, 0, 0)
    assert uni_perceiver_attributes("caption_text") == (1, 1, 0, 1, 0, 1, 0, 1)
    assert uni_perceiver_attributes("retrieval_text_target") == (1, 0, 0, 1, 0, 1, 1, 0)
    with pytest.raises(TypeError):
        UNI_PERCEIVER_ATTRIBUTES["mlm_text"] = (0,) * 8  # type: ignore[index]
    with pytest.raises(ValueError, match=r"attribute kind = 'audio': known kinds: image_classification_input, mlm_text"):
        uni_perceiver_attributes("audio")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"d_model": 0}, r"d_model = 0: must be >= 1"),
        ({"num_experts": 0}, r"num_experts = 0: must be >= 1"),
        ({"num_attributes": 0}, r"num_attributes = 0: must be >= 1"),
        ({"top_k": 0}, r"top_k = 0: must be in \[1, num_experts = 4\]"),
        ({"top_k": 5}, r"top_k = 5: must be in \[1, num_experts = 4\]"),
        ({"attribute_dim": 1}, r"attribute_dim = 1: must be >= 2"),
        ({"noise_std": -0.1}, r"noise_std = -0.1: must be a finite number >= 0"),
        ({"noise_std": math.inf}, r"noise_std = inf: must be a finite number >= 0"),
        ({"aux_loss_coef": -1.0}, r"aux_loss_coef = -1.0: must be a finite number >= 0"),
        ({"capacity_factor": 0.0}, r"capacity_factor = 0.0: must be > 0, or None for dropless"),
        ({"drop_policy": "random"}, r"drop_policy = 'random': allowed: position, score"),
    ],
)
def test_constructor_errors(kwargs, match):
    args = {"d_model": 8, "num_experts": 4, "num_attributes": 8, "top_k": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        AttributeRouter(args.pop("d_model"), args.pop("num_experts"), args.pop("num_attributes"), args.pop("top_k"), **args)


@pytest.mark.parametrize(
    "ctx, x_shape, match",
    [
        (None, (5, 8), r"AttributeRouter needs RoutingContext.attributes_TA .*got no RoutingContext"),
        (RoutingContext(), (5, 8), r"AttributeRouter needs RoutingContext.attributes_TA .*got attributes_TA = None"),
        (RoutingContext(attributes_TA=torch.zeros(5)), (5, 8), r"attributes_TA has shape \(5,\): expected 2-D \(T, A\)"),
        (RoutingContext(attributes_TA=torch.zeros(5, 8, 1)), (5, 8), r"shape \(5, 8, 1\): expected 2-D"),
        (RoutingContext(attributes_TA=torch.zeros(4, 8)), (5, 8), r"attributes_TA has 4 rows: expected T = 5"),
        (RoutingContext(attributes_TA=torch.zeros(5, 3)), (5, 8), r"attributes_TA has 3 columns: expected num_attributes = 8"),
        (RoutingContext(attributes_TA=torch.full((5, 8), math.nan)), (5, 8), r"attributes_TA has non-finite values"),
        (RoutingContext(attributes_TA=torch.full((5, 8), -math.inf)), (5, 8), r"attributes_TA has non-finite values"),
        (RoutingContext(attributes_TA=torch.zeros(5, 8, dtype=torch.complex64)), (5, 8), r"dtype torch.complex64"),
        (RoutingContext(attributes_TA=torch.zeros(5, 8)), (5, 7), r"x_TD has width 7: expected d_model = 8"),
        (RoutingContext(attributes_TA=torch.zeros(5, 8)), (5, 8, 1), r"x_TD has shape \(5, 8, 1\): expected \(T, D\)"),
    ],
)
def test_forward_errors(ctx, x_shape, match):
    router = AttributeRouter(8, 4, 8, 2, use_tokens=True)
    with pytest.raises(ValueError, match=match):
        router(torch.randn(x_shape), ctx)
