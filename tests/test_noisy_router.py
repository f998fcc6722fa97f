"""Tests of moe_engine.routing.noisy: Shazeer et al.'s noisy top-k gating and its importance/load losses.

The router runs in fp32; it is compared with a literal float64 transcription of the paper's equations
and of its official code's load estimator (tensor2tensor `noisy_top_k_gating` / `_prob_in_top_k`),
written below one token and one expert at a time, given the same noise draw. Gradients are compared
with the transcription's autograd gradients; gradcheck validates the transcription itself.
"""

from __future__ import annotations

import math

import pytest
import torch

import reference_moe as ref
from moe_engine.experts import GroupedExperts
from moe_engine.kernels.router import topk_gating
from moe_engine.layer import MoELayer
from moe_engine.routing.noisy import NoisyTopKRouter, prob_in_top_k

FP32_ATOL, FP32_RTOL = 1e-6, 1e-5
GRAD_ATOL, GRAD_RTOL = 1e-5, 1e-4


# ---------------------------------------------------------------------------------------------
# The paper's equations, transcribed
# ---------------------------------------------------------------------------------------------


def phi(z: torch.Tensor) -> torch.Tensor:
    """The standard normal CDF."""
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


def cv_squared(v_E: torch.Tensor) -> torch.Tensor:
    """var / mean^2 with the biased variance, as tensor2tensor's cv_squared (plus its 1e-10)."""
    mean = v_E.mean()
    return ((v_E - mean) ** 2).mean() / (mean**2 + 1e-10)


def keep_top_k(h_E: torch.Tensor, k: int) -> tuple[torch.Tensor, list[int]]:
    """KeepTopK: h where h is among the k largest (ties to the lower index), -inf elsewhere."""
    order = sorted(range(h_E.shape[0]), key=lambda e: (-float(h_E[e].detach()), e))
    kept = order[:k]
    return torch.stack([h_E[e] if e in kept else h_E.new_tensor(float("-inf")) for e in range(h_E.shape[0])]), kept


def shazeer_reference(x_TD, w_g_ED, w_noise_ED, noise_TE, top_k, noise_epsilon, training):
    """G (T, E), the top-k lists, importance and load losses, in the dtype of the inputs (float64).

    H = x W_g + N * softplus(x W_noise + eps) in training (else x W_g); G = softmax(KeepTopK(H, k)).
    Load_i = sum_t Phi((clean_ti - threshold) / std_ti), threshold = the (k+1)-th largest H_t if i
    is in t's top k, else the k-th largest (official code); counts of G > 0 without noise or k = E.
    """
    num_tokens, num_experts = x_TD.shape[0], w_g_ED.shape[0]
    gate_rows, chosen_rows, load_terms = [], [], []
    for t in range(num_tokens):
        clean_E = torch.stack([torch.dot(x_TD[t], w_g_ED[e]) for e in range(num_experts)])
        if training:
            raw_E = torch.stack([torch.dot(x_TD[t], w_noise_ED[e]) for e in range(num_experts)])
            std_E = torch.log1p(torch.exp(raw_E)) + noise_epsilon
            h_E = clean_E + noise_TE[t] * std_E
        else:
            h_E = clean_E
        kept_E, chosen = keep_top_k(h_E, top_k)
        exp_E = torch.exp(kept_E - kept_E.max())
        gate_rows.append(exp_E / exp_E.sum())
        chosen_rows.append(chosen)
        if training and top_k < num_experts:
            descending = sorted((h_E[e] for e in range(num_experts)), key=lambda v: -float(v.detach()))
            row = []
            for i in range(num_experts):
                threshold = descending[top_k] if i in chosen else descending[top_k - 1]
                row.append(phi((clean_E[i] - threshold) / std_E[i]))
            load_terms.append(torch.stack(row))
        else:
            load_terms.append(torch.stack([(gate_rows[-1][i] > 0).to(x_TD.dtype) for i in range(num_experts)]))
    gates_TE = torch.stack(gate_rows)
    load_E = torch.stack(load_terms).sum(0)
    return gates_TE, chosen_rows, cv_squared(gates_TE.sum(0)), cv_squared(load_E)


def make_router(d_model, num_experts, top_k, **kwargs) -> NoisyTopKRouter:
    router = NoisyTopKRouter(d_model, num_experts, top_k, **kwargs)
    with torch.no_grad():  # away from the zero init, so both gates matter
        router.weight.normal_()
        router.noise_weight.normal_(std=0.5)
    return router


def routing_and_reference(router, x_TD, training, seed=0):
    """The router's Routing and the transcription's outputs on float64 copies, with the same noise."""
    router.train(training)
    noise_TE = torch.randn(x_TD.shape[0], router.num_experts, generator=torch.Generator().manual_seed(seed))
    routing = router(x_TD, noise_TE=noise_TE if training else None)
    expected = shazeer_reference(
        x_TD.detach().double(), router.weight.detach().double(), router.noise_weight.detach().double(),
        noise_TE.double(), router.top_k, router.noise_epsilon, training,
    )
    return routing, expected


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "num_tokens, d_model, num_experts, top_k",
    [
        (16, 8, 4, 2),  # typical
        (1, 8, 4, 2),  # T = 1
        (9, 5, 7, 3),  # prime E, odd D
        (11, 6, 6, 1),  # top-1, E not a power of two
        (6, 4, 3, 3),  # K = E: the load is the routed counts, its loss 0
    ],
)
def test_router_matches_transcription(num_tokens, d_model, num_experts, top_k, training):
    torch.manual_seed(0)
    router = make_router(d_model, num_experts, top_k, aux_loss_coef=0.1)
    x_TD = torch.randn(num_tokens, d_model)
    routing, (gates_TE, chosen, importance, load) = routing_and_reference(router, x_TD, training)

    assert routing.experts_TK.tolist() == chosen
    assert routing.weights_TK.dtype == torch.float32 and routing.scores_TE.dtype == torch.float32
    torch.testing.assert_close(
        routing.weights_TK, gates_TE.gather(1, routing.experts_TK).float(), atol=FP32_ATOL, rtol=FP32_RTOL
    )
    torch.testing.assert_close(routing.aux_terms["importance_loss"], importance.float(), atol=FP32_ATOL, rtol=FP32_RTOL)
    torch.testing.assert_close(routing.aux_terms["load_loss"], load.float(), atol=FP32_ATOL, rtol=FP32_RTOL)
    torch.testing.assert_close(routing.aux_loss, (0.1 * (importance + load)).float(), atol=FP32_ATOL, rtol=FP32_RTOL)
    if top_k == num_experts:
        assert routing.aux_terms["load_loss"] == 0
    assert routing.capacity is None and (routing.experts_TK >= 0).all()


def test_softmax_of_keep_top_k_is_topk_gating():
    """G = softmax(KeepTopK(H, k)) equals topk_gating's renormalised softmax weights."""
    torch.manual_seed(1)
    for num_experts, top_k in [(5, 2), (7, 7), (8, 1), (13, 4)]:
        h_TE = torch.randn(10, num_experts, dtype=torch.float64) * 3
        gating = topk_gating(h_TE.float(), top_k, score_function="softmax", renormalize=True)
        expected_TE = torch.stack([keep_top_k(h_E, top_k)[0].softmax(-1) for h_E in h_TE])
        torch.testing.assert_close(
            gating.weights_TK, expected_TE.gather(1, gating.experts_TK).float(), atol=FP32_ATOL, rtol=FP32_RTOL
        )
        assert torch.equal(expected_TE.gt(0).sum(1), torch.full((10,), top_k))


def test_noise_comes_from_global_rng_in_training_only():
    torch.manual_seed(2)
    router = make_router(6, 5, 2)
    x_TD = torch.randn(12, 6)
    torch.manual_seed(7)
    drawn = router(x_TD)
    torch.manual_seed(7)
    injected = router(x_TD, noise_TE=torch.randn(12, 5))
    assert torch.equal(drawn.weights_TK, injected.weights_TK) and torch.equal(drawn.experts_TK, injected.experts_TK)
    assert not torch.equal(router(x_TD).scores_TE, drawn.scores_TE)  # a fresh draw differs

    router.eval()
    clean_TE = (x_TD @ router.weight.t()).softmax(-1)
    torch.testing.assert_close(router(x_TD).scores_TE, clean_TE)
    assert torch.equal(router(x_TD).weights_TK, router(x_TD).weights_TK)


def test_zero_init_routes_by_noise_alone():
    router = NoisyTopKRouter(4, 6, 2)
    assert (router.weight == 0).all() and (router.noise_weight == 0).all()
    x_TD = torch.randn(5, 4)
    router.eval()  # all logits 0: the lowest expert ids win the ties, equal weights
    routing = router(x_TD)
    assert routing.experts_TK.tolist() == [[0, 1]] * 5
    torch.testing.assert_close(routing.weights_TK, torch.full((5, 2), 0.5))
    router.train()  # noise std softplus(0) + eps picks the experts
    noise_TE = torch.randn(5, 6)
    routing = router(x_TD, noise_TE=noise_TE)
    assert torch.equal(routing.experts_TK, noise_TE.topk(2, dim=-1).indices)


def test_bf16_input_routes_like_its_fp32_values():
    torch.manual_seed(3)
    router = make_router(8, 5, 2, aux_loss_coef=0.1)
    x_TD = torch.randn(10, 8).bfloat16()
    routing, (gates_TE, chosen, importance, load) = routing_and_reference(router, x_TD, True)
    assert routing.experts_TK.tolist() == chosen and routing.weights_TK.dtype == torch.float32
    torch.testing.assert_close(
        routing.weights_TK, gates_TE.gather(1, routing.experts_TK).float(), atol=FP32_ATOL, rtol=FP32_RTOL
    )
    torch.testing.assert_close(routing.aux_terms["load_loss"], load.float(), atol=FP32_ATOL, rtol=FP32_RTOL)


def test_prob_in_top_k_by_hand():
    """One token, E = 3, k = 1, std 1: H = (2, 1, 0), clean = (1.5, 1, 0.5)."""
    clean_TE = torch.tensor([[1.5, 1.0, 0.5]])
    noisy_TE = torch.tensor([[2.0, 1.0, 0.0]])
    chosen_TE = torch.tensor([[True, False, False]])
    prob = prob_in_top_k(clean_TE, noisy_TE, torch.ones(1, 3), chosen_TE, torch.tensor([1]), 1)
    # Expert 0 (in) must beat the 2nd value 1.0; the others (out) must beat the 1st value 2.0.
    expected = phi(torch.tensor([[0.5, -1.0, -1.5]], dtype=torch.float64))
    torch.testing.assert_close(prob, expected.float())


def test_capacity_drops_after_the_losses():
    torch.manual_seed(4)
    router = make_router(6, 4, 2, capacity_factor=0.5, drop_policy="score", aux_loss_coef=0.1)
    x_TD = torch.randn(16, 6)
    routing, (gates_TE, chosen, importance, load) = routing_and_reference(router, x_TD, True)
    expert_rows = [list(row) for row in chosen]
    weight_rows = [[gates_TE[t, e] for e in row] for t, row in enumerate(chosen)]
    ref.drop_choices(expert_rows, weight_rows, 4, ref.capacity_of(16, 2, 4, 0.5), "score")
    assert routing.capacity == ref.capacity_of(16, 2, 4, 0.5)
    assert routing.experts_TK.tolist() == expert_rows and (routing.experts_TK == -1).any()
    torch.testing.assert_close(routing.weights_TK, torch.stack([torch.stack(r) for r in weight_rows]).float())
    torch.testing.assert_close(routing.aux_terms["importance_loss"], importance.float(), atol=FP32_ATOL, rtol=FP32_RTOL)


def test_no_aux_terms_when_coef_is_zero():
    routing = make_router(4, 4, 2, aux_loss_coef=0.0)(torch.randn(3, 4))
    assert routing.aux_terms == {} and routing.aux_loss == 0


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("num_tokens, num_experts, top_k", [(12, 5, 2), (7, 7, 3), (1, 4, 2), (5, 3, 3)])
def test_gradients_match_transcription(num_tokens, num_experts, top_k, training):
    torch.manual_seed(5)
    d_model = 6
    router = make_router(d_model, num_experts, top_k, aux_loss_coef=0.3)
    x_TD = torch.randn(num_tokens, d_model, requires_grad=True)
    routing, _ = routing_and_reference(router, x_TD, training, seed=3)
    coef_TK = torch.randn(num_tokens, top_k, dtype=torch.float64)
    loss = (routing.weights_TK * coef_TK.float()).sum() + routing.aux_loss
    params = [x_TD, router.weight, router.noise_weight]
    grads = torch.autograd.grad(loss, params, allow_unused=True)

    x_ref, wg_ref, wn_ref = (p.detach().double().requires_grad_() for p in params)
    noise_TE = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(3)).double()
    gates_TE, chosen, importance, load = shazeer_reference(
        x_ref, wg_ref, wn_ref, noise_TE, top_k, router.noise_epsilon, training
    )
    ref_loss = (gates_TE.gather(1, torch.tensor(chosen)) * coef_TK).sum() + 0.3 * (importance + load)
    ref_grads = torch.autograd.grad(ref_loss, [x_ref, wg_ref, wn_ref], allow_unused=True)
    for name, grad, expected in zip(["x", "weight", "noise_weight"], grads, ref_grads):
        if expected is None or (not training and name == "noise_weight"):
            assert grad is None or (grad == 0).all(), name  # no noise in eval: W_noise is unused
            continue
        assert (expected != 0).any(), name
        torch.testing.assert_close(grad, expected.float(), atol=GRAD_ATOL, rtol=GRAD_RTOL, msg=lambda m: f"{name}: {m}")


def test_transcription_passes_gradcheck():
    torch.manual_seed(7)
    x_TD = torch.randn(5, 3, dtype=torch.float64)
    noise_TE = torch.randn(5, 4, dtype=torch.float64)
    w_g = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w_noise = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)

    def losses(w_g, w_noise):
        _, _, importance, load = shazeer_reference(x_TD, w_g, w_noise, noise_TE, 2, 1e-2, True)
        return importance + load

    assert torch.autograd.gradcheck(losses, (w_g, w_noise))


# ---------------------------------------------------------------------------------------------
# In the layer
# ---------------------------------------------------------------------------------------------


def test_in_moe_layer_matches_token_loop():
    torch.manual_seed(8)
    num_tokens, d_model, num_experts, top_k, ffn_hidden = 10, 8, 5, 2, 6
    router = make_router(d_model, num_experts, top_k, aux_loss_coef=0.1)
    layer = MoELayer(router, GroupedExperts(num_experts, d_model, ffn_hidden))
    x_TD = torch.randn(num_tokens, d_model, requires_grad=True)
    torch.manual_seed(11)
    out = layer(x_TD)
    grad_y = torch.randn(num_tokens, d_model, dtype=torch.float64)
    params = {"x": x_TD, "weight": router.weight, "noise_weight": router.noise_weight,
              "w_in": layer.experts.w_in, "w_out": layer.experts.w_out}
    grads = torch.autograd.grad((out.y * grad_y.float()).sum() + out.aux_loss, list(params.values()))

    torch.manual_seed(11)
    noise_TE = torch.randn(num_tokens, num_experts).double()
    p = {name: t.detach().double().requires_grad_() for name, t in params.items()}
    gates_TE, chosen, importance, load = shazeer_reference(
        p["x"], p["weight"], p["noise_weight"], noise_TE, top_k, router.noise_epsilon, True
    )
    rows = []
    for t in range(num_tokens):
        y_D = torch.zeros(d_model, dtype=torch.float64)
        for e in chosen[t]:
            y_D = y_D + gates_TE[t, e] * ref.mlp(p["x"][t], p["w_in"][e], p["w_out"][e], "swiglu")
        rows.append(y_D)
    y_ref = torch.stack(rows)
    ref_loss = (y_ref * grad_y).sum() + 0.1 * (importance + load)
    ref_grads = torch.autograd.grad(ref_loss, list(p.values()))

    assert out.routing.experts_TK.tolist() == chosen
    torch.testing.assert_close(out.y, y_ref.float(), atol=1e-5, rtol=1e-4)
    for name, grad, expected in zip(params, grads, ref_grads):
        torch.testing.assert_close(grad, expected.float(), atol=GRAD_ATOL, rtol=GRAD_RTOL, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"top_k": 0}, r"top_k = 0: must be in \[1, num_experts = 4\]"),
        ({"top_k": 5}, r"top_k = 5"),
        ({"drop_policy": "random"}, r"drop_policy = 'random': allowed: position, score"),
        ({"aux_loss_coef": -1.0}, r"aux_loss_coef = -1.0: must be >= 0"),
        ({"capacity_factor": 0.0}, r"capacity_factor = 0.0: must be > 0"),
        ({"noise_epsilon": 0.0}, r"noise_epsilon = 0.0: must be > 0"),
    ],
)
def test_constructor_errors(kwargs, match):
    args = {"top_k": 2, **kwargs}
    top_k = args.pop("top_k")
    with pytest.raises(ValueError, match=match):
        NoisyTopKRouter(8, 4, top_k, **args)


def test_noise_argument_errors():
    router = NoisyTopKRouter(8, 4, 2)
    match = r"noise_TE has shape \(3, 5\) torch.float32: expected a float tensor \(3, 4\)"
    with pytest.raises(ValueError, match=match):
        router(torch.randn(3, 8), noise_TE=torch.randn(3, 5))
    router.eval()
    with pytest.raises(ValueError, match="noise_TE was given in eval mode"):
        router(torch.randn(3, 8), noise_TE=torch.randn(3, 4))
