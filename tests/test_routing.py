"""Tests of moe_engine.routing: TopKRouter, the auxiliary losses and expert capacity.

The router runs in fp32; its results are compared with the naive loop reference of
tests/reference_moe.py run in float64 on the same parameters, so the only error left is the
library's fp32 rounding. Gradients are compared with the reference's autograd gradients (the
router casts to fp32 internally, so gradcheck cannot run on it directly; gradcheck validates the
reference instead).
"""

from __future__ import annotations

import math

import pytest
import torch

import reference_moe as ref
from moe_engine.routing import (
    RoutingContext,
    TopKRouter,
    drop_over_capacity,
    expert_capacity,
    router_z_loss,
    sequence_load_balancing_loss,
    switch_load_balancing_loss,
)

# fp32 library vs float64 reference.
FP32_ATOL, FP32_RTOL = 1e-6, 1e-5


def make_router(d_model: int, num_experts: int, top_k: int, **kwargs) -> TopKRouter:
    router = TopKRouter(d_model, num_experts, top_k, **kwargs)
    with torch.no_grad():
        router.weight.normal_()  # larger logits than the default init: clear top-k gaps
    return router


def reference_routing(router: TopKRouter, x_TD: torch.Tensor) -> ref.ReferenceRouting:
    return ref.route(
        x_TD.double(),
        router.weight.detach().double(),
        router.top_k,
        score_function=router.score_function,
        renormalize=router.renormalize,
        scaling_factor=router.scaling_factor,
        capacity_factor=router.capacity_factor,
        drop_policy=router.drop_policy,
    )


# ---------------------------------------------------------------------------------------------
# Router against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "score_function, renormalize, scaling_factor",
    [
        ("softmax", True, 1.0),  # Mixtral / Qwen3-MoE
        ("softmax", False, 1.0),  # Qwen2-MoE: raw top-k probabilities
        ("sigmoid", True, 2.5),  # DeepSeek-V3: renormalised, then routed_scaling_factor
        ("sigmoid", False, 1.0),  # raw sigmoid affinities
        ("softmax", True, 0.5),  # scaling applies after renormalisation
    ],
)
@pytest.mark.parametrize(
    "num_tokens, d_model, num_experts, top_k",
    [
        (16, 8, 4, 2),  # typical
        (1, 8, 4, 2),  # T = 1
        (9, 5, 7, 3),  # prime E, odd D
        (6, 4, 3, 3),  # K = E: every expert chosen, in score order
        (5, 4, 1, 1),  # E = 1: a softmax weight is exactly 1
    ],
)
def test_router_matches_reference(num_tokens, d_model, num_experts, top_k, score_function, renormalize, scaling_factor):
    torch.manual_seed(0)
    router = make_router(
        d_model, num_experts, top_k, score_function=score_function, renormalize=renormalize,
        scaling_factor=scaling_factor, aux_loss_coef=0.1, z_loss_coef=0.01,
    )
    x_TD = torch.randn(num_tokens, d_model)
    routing = router(x_TD)
    expected = reference_routing(router, x_TD)

    assert torch.equal(routing.experts_TK, expected.experts_TK)
    torch.testing.assert_close(routing.weights_TK, expected.weights_TK.float(), atol=FP32_ATOL, rtol=FP32_RTOL)
    torch.testing.assert_close(routing.scores_TE, expected.scores_TE.float(), atol=FP32_ATOL, rtol=FP32_RTOL)
    if renormalize:
        sums_T = routing.weights_TK.sum(-1)
        torch.testing.assert_close(sums_T, torch.full_like(sums_T, scaling_factor))

    probs_TE = ref.balance_probs(expected.scores_TE, score_function)
    balance = ref.switch_loss(probs_TE, expected.experts_TK)
    z = ref.z_loss(expected.logits_TE)
    torch.testing.assert_close(routing.aux_terms["balance_loss"], balance.float(), atol=FP32_ATOL, rtol=FP32_RTOL)
    torch.testing.assert_close(routing.aux_terms["z_loss"], z.float(), atol=FP32_ATOL, rtol=FP32_RTOL)
    torch.testing.assert_close(routing.aux_loss, (0.1 * balance + 0.01 * z).float(), atol=FP32_ATOL, rtol=FP32_RTOL)
    assert routing.capacity is None
    assert routing.num_experts == num_experts and routing.top_k == top_k


@pytest.mark.parametrize(
    "score_function, renormalize, capacity_factor",
    [
        ("softmax", True, None),
        ("softmax", False, None),
        ("sigmoid", True, None),
        ("sigmoid", False, None),
        ("softmax", True, 0.5),  # dropped choices pass no gradient
    ],
)
def test_router_gradients_match_reference(score_function, renormalize, capacity_factor):
    torch.manual_seed(1)
    num_tokens, d_model, num_experts, top_k = 12, 6, 5, 2
    router = make_router(
        d_model, num_experts, top_k, score_function=score_function, renormalize=renormalize, scaling_factor=1.5,
        aux_loss_coef=0.1, z_loss_coef=0.01, capacity_factor=capacity_factor,
    )
    x_TD = torch.randn(num_tokens, d_model, requires_grad=True)
    grad_TK = torch.randn(num_tokens, top_k, dtype=torch.float64)

    routing = router(x_TD)
    loss = (routing.weights_TK * grad_TK.float()).sum() + routing.aux_loss
    loss.backward()

    x_ref = x_TD.detach().double().requires_grad_()
    w_ref = router.weight.detach().double().requires_grad_()
    expected = ref.moe_forward(  # experts of width 0: only the routing and its losses matter here
        x_ref, w_ref, torch.zeros(num_experts, 0, d_model), torch.zeros(num_experts, d_model, 0),
        top_k=top_k, activation="gelu", score_function=score_function, renormalize=renormalize,
        scaling_factor=1.5, capacity_factor=capacity_factor, aux_loss_coef=0.1, z_loss_coef=0.01,
    )
    ref_loss = (expected.routing.weights_TK * grad_TK).sum() + expected.aux_loss
    ref_loss.backward()

    assert torch.equal(routing.experts_TK, expected.routing.experts_TK)
    torch.testing.assert_close(x_TD.grad, x_ref.grad.float(), atol=FP32_ATOL, rtol=FP32_RTOL)
    torch.testing.assert_close(router.weight.grad, w_ref.grad.float(), atol=FP32_ATOL, rtol=FP32_RTOL)


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_reference_router_gradients_pass_gradcheck(score_function):
    """The reference's own autograd gradients (which the tests above trust) match finite differences."""
    torch.manual_seed(2)
    x_TD = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w_ED = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)

    def weights_and_aux(x, w):
        out = ref.moe_forward(
            x, w, torch.zeros(3, 0, 4, dtype=torch.float64), torch.zeros(3, 4, 0, dtype=torch.float64),
            top_k=2, activation="gelu", score_function=score_function, aux_loss_coef=0.1, z_loss_coef=0.01,
        )
        return out.routing.weights_TK, out.aux_loss

    assert torch.autograd.gradcheck(weights_and_aux, (x_TD, w_ED))


# ---------------------------------------------------------------------------------------------
# Auxiliary losses
# ---------------------------------------------------------------------------------------------


def _hand_router(score_function: str, **kwargs) -> tuple[TopKRouter, torch.Tensor]:
    """T=4, E=2, K=1, D=2. Tokens of kind A = [1, 0] get logits [ln 3, 0]; kind B = [0, 1] get [0, ln 3].

    Tokens: A, A, B, A -> first choices: expert 0, 0, 1, 0.
    """
    router = TopKRouter(2, 2, 1, score_function=score_function, aux_loss_coef=1.0, z_loss_coef=1.0, **kwargs)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)]]))
    x_TD = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    return router, x_TD


def test_softmax_losses_by_hand():
    # softmax([ln 3, 0]) = [3/4, 1/4]. Choices: experts 0, 0, 1, 0 -> f = [3/4, 1/4].
    # P_0 = (3/4 + 3/4 + 1/4 + 3/4) / 4 = 5/8,  P_1 = 3/8.
    # Switch = E * sum f_i P_i = 2 * (3/4 * 5/8 + 1/4 * 3/8) = 2 * 18/32 = 1.125.
    # z-loss: logsumexp([ln 3, 0]) = ln 4 for every token -> (ln 4)^2.
    # Sequences {0, 1}, {2, 3}: seq 0: f = [1, 0], P = [3/4, 1/4] -> 2 * 3/4 = 1.5;
    #                           seq 1: f = [1/2, 1/2], P = [1/2, 1/2] -> 2 * 1/2 = 1.0;  mean 1.25.
    router, x_TD = _hand_router("softmax")
    routing = router(x_TD)
    assert routing.experts_TK.flatten().tolist() == [0, 0, 1, 0]
    torch.testing.assert_close(routing.weights_TK, torch.ones(4, 1))  # renormalised K=1 -> 1
    torch.testing.assert_close(routing.aux_terms["balance_loss"], torch.tensor(1.125))
    torch.testing.assert_close(routing.aux_terms["z_loss"], torch.tensor(math.log(4.0) ** 2))
    torch.testing.assert_close(routing.aux_loss, torch.tensor(1.125 + math.log(4.0) ** 2))

    seq_router, _ = _hand_router("softmax", aux_loss_type="seq_switch")
    seq_routing = seq_router(x_TD, RoutingContext(sequence_ids_T=torch.tensor([0, 0, 1, 1])))
    torch.testing.assert_close(seq_routing.aux_terms["balance_loss"], torch.tensor(1.25))


def test_sigmoid_losses_by_hand():
    # sigmoid([ln 3, 0]) = [3/4, 1/2]; per-token normalised for P: [3/5, 2/5].
    # Choices: experts 0, 0, 1, 0 -> f = [3/4, 1/4]; P_0 = (3 * 3/5 + 2/5) / 4 = 11/20, P_1 = 9/20.
    # Switch = 2 * (3/4 * 11/20 + 1/4 * 9/20) = 2 * 42/80 = 1.05.
    # Without renormalisation the weight of each choice is its sigmoid score, 3/4.
    router, x_TD = _hand_router("sigmoid", renormalize=False)
    routing = router(x_TD)
    assert routing.experts_TK.flatten().tolist() == [0, 0, 1, 0]
    torch.testing.assert_close(routing.weights_TK, torch.full((4, 1), 0.75))
    torch.testing.assert_close(routing.scores_TE[0], torch.tensor([0.75, 0.5]))
    torch.testing.assert_close(routing.aux_terms["balance_loss"], torch.tensor(1.05))


@pytest.mark.parametrize("top_k", [1, 2])
def test_uniform_router_has_balance_loss_one(top_k):
    # All logits 0: P_i = 1/E for every expert, so E * sum f_i / E = sum f_i = 1 whatever top-k picks.
    router = TopKRouter(4, 4, top_k)
    with torch.no_grad():
        router.weight.zero_()
    routing = router(torch.randn(10, 4))
    torch.testing.assert_close(routing.aux_terms["balance_loss"], torch.tensor(1.0))


def test_all_tokens_on_one_expert_has_balance_loss_e():
    # Expert 2's logit exceeds the others' by 100: P = f = one-hot(2) -> E * 1 * 1 = E.
    num_experts = 5
    router = TopKRouter(3, num_experts, 1)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[2, 0] = 100.0
    x_TD = torch.cat([torch.ones(8, 1), torch.randn(8, 2)], dim=1)
    routing = router(x_TD)
    assert (routing.experts_TK == 2).all()
    torch.testing.assert_close(routing.aux_terms["balance_loss"], torch.tensor(float(num_experts)))


def test_z_loss_matches_reference_and_zero_logits():
    torch.manual_seed(3)
    logits_TE = torch.randn(7, 5) * 3
    torch.testing.assert_close(router_z_loss(logits_TE), ref.z_loss(logits_TE.double()).float())
    # Zero logits: logsumexp = ln E for every token.
    torch.testing.assert_close(router_z_loss(torch.zeros(3, 6)), torch.tensor(math.log(6.0) ** 2))
    # bf16 logits are upcast before the logsumexp.
    assert router_z_loss(logits_TE.bfloat16()).dtype == torch.float32


def test_no_aux_terms_when_disabled():
    router = make_router(4, 3, 2, aux_loss_type="none", z_loss_coef=0.0)
    routing = router(torch.randn(5, 4))
    assert dict(routing.aux_terms) == {}
    assert routing.aux_loss.item() == 0.0


@pytest.mark.parametrize("aux_loss_type", ["switch", "seq_switch"])
def test_a_zero_aux_loss_coef_disables_the_balance_loss(aux_loss_type):
    """aux_loss_coef = 0 switches the balance loss off like aux_loss_type = "none": no term is
    computed or logged, and seq_switch then needs no sequence ids."""
    router = make_router(4, 3, 2, aux_loss_type=aux_loss_type, aux_loss_coef=0.0, z_loss_coef=0.0)
    routing = router(torch.randn(5, 4))
    assert dict(routing.aux_terms) == {}
    assert routing.aux_loss.item() == 0.0


@pytest.mark.parametrize("rate, has_bias", [(0.0, False), (1e-3, True)])
def test_from_config_keeps_an_expert_bias_only_with_a_positive_rate(rate, has_bias):
    """A router built from a config with expert_bias_rate = 0 has no bias buffer (nothing in its
    state dict, update_expert_bias refused); a positive rate gives a zero bias."""
    from moe_engine.config import RouterConfig

    router = TopKRouter.from_config(4, 3, RouterConfig(top_k=2, expert_bias_rate=rate))
    assert ("expert_bias" in router.state_dict()) == has_bias
    if has_bias:
        assert torch.equal(router.expert_bias, torch.zeros(3))
    else:
        assert router.expert_bias is None
        with pytest.raises(ValueError, match="expert_bias=False"):
            router.update_expert_bias(torch.ones(3), 0.1)


@pytest.mark.parametrize("ctx", [None, RoutingContext(task_ids_T=torch.zeros(6, dtype=torch.int64))])
def test_seq_switch_needs_sequence_ids(ctx):
    router = make_router(4, 3, 2, aux_loss_type="seq_switch")
    with pytest.raises(ValueError, match="sequence_ids_T"):
        router(torch.randn(6, 4), ctx)


def test_seq_switch_is_mean_of_per_sequence_switch_losses():
    torch.manual_seed(4)
    num_tokens, num_experts, top_k = 14, 4, 2
    router = make_router(6, num_experts, top_k, aux_loss_type="seq_switch", aux_loss_coef=1.0)
    x_TD = torch.randn(num_tokens, 6)
    # Sequence 2 has no tokens and must not count in the mean; sequences need not be contiguous.
    sequence_ids_T = torch.tensor([0, 0, 1, 3, 1, 0, 3, 3, 1, 0, 3, 1, 1, 0])
    routing = router(x_TD, RoutingContext(sequence_ids_T=sequence_ids_T))

    probs_TE = routing.scores_TE
    per_sequence = [
        switch_load_balancing_loss(probs_TE[sequence_ids_T == s], routing.experts_TK[sequence_ids_T == s])
        for s in (0, 1, 3)
    ]
    torch.testing.assert_close(routing.aux_terms["balance_loss"], torch.stack(per_sequence).mean())
    expected = ref.sequence_switch_loss(probs_TE.double(), routing.experts_TK, sequence_ids_T)
    torch.testing.assert_close(routing.aux_terms["balance_loss"], expected.float())
    # It differs from the batch-level loss (otherwise the test above proves nothing).
    batch = switch_load_balancing_loss(probs_TE, routing.experts_TK)
    assert not torch.allclose(batch, routing.aux_terms["balance_loss"])


def test_sequence_loss_with_sigmoid_uses_normalised_scores():
    torch.manual_seed(5)
    router = make_router(5, 4, 2, score_function="sigmoid", aux_loss_type="seq_switch", aux_loss_coef=1.0)
    x_TD = torch.randn(8, 5)
    sequence_ids_T = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    routing = router(x_TD, RoutingContext(sequence_ids_T=sequence_ids_T))
    expected = reference_routing(router, x_TD)
    probs_TE = ref.balance_probs(expected.scores_TE, "sigmoid")
    loss = ref.sequence_switch_loss(probs_TE, expected.experts_TK, sequence_ids_T)
    torch.testing.assert_close(routing.aux_terms["balance_loss"], loss.float(), atol=FP32_ATOL, rtol=FP32_RTOL)
    torch.testing.assert_close(
        sequence_load_balancing_loss(probs_TE.float(), routing.experts_TK, sequence_ids_T), loss.float(),
        atol=FP32_ATOL, rtol=FP32_RTOL,
    )


@pytest.mark.parametrize("aux_loss_type", ["switch", "seq_switch"])
def test_sigmoid_balance_of_a_token_whose_scores_all_underflow_is_finite(aux_loss_type):
    # Token 0's logits all below -104: its fp32 sigmoid scores are exactly 0, their sum too (clamped, not 0/0).
    router = make_router(4, 4, 2, score_function="sigmoid", aux_loss_type=aux_loss_type, aux_loss_coef=1.0)
    with torch.no_grad():
        router.weight.copy_(torch.ones(4, 4))
    x_TD = torch.randn(5, 4)
    x_TD[0] = -40.0
    routing = router(x_TD, RoutingContext(sequence_ids_T=torch.tensor([0, 0, 0, 1, 1])))
    assert routing.scores_TE[0].eq(0).all()
    routing.aux_loss.backward()
    assert routing.aux_loss.isfinite() and router.weight.grad.isfinite().all()


# ---------------------------------------------------------------------------------------------
# Capacity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_tokens, top_k, num_experts, capacity_factor, expected",
    [
        (10, 2, 4, 1.0, 5),  # exactly T*K/E
        (10, 1, 4, 1.0, 3),  # ceil(2.5)
        (10, 2, 4, 0.01, 1),  # never below 1
        (7, 3, 7, 1.25, 4),  # ceil(3.75)
        (0, 2, 4, 1.0, 1),  # no tokens: still 1
    ],
)
def test_expert_capacity(num_tokens, top_k, num_experts, capacity_factor, expected):
    assert expert_capacity(num_tokens, top_k, num_experts, capacity_factor) == expected


# T=4, K=2, E=2, capacity 2. Choices (token, k, expert, weight):
#   expert 0: (0,0,.60) (1,0,.55) (2,1,.30) (3,0,.80)
#   expert 1: (0,1,.40) (1,1,.45) (2,0,.70) (3,1,.20)
# "position" visits first choices in token order, then second choices:
#   expert 0 keeps (0,0) (1,0), drops (3,0) although its weight is the highest, and (2,1);
#   expert 1 keeps (2,0) (the only first choice), then (0,1); drops (1,1) (3,1).
# "score" keeps the highest weights: expert 0 keeps (3,0) .80, (0,0) .60; expert 1 keeps (2,0) .70, (1,1) .45.
CAPACITY_EXPERTS_TK = [[0, 1], [0, 1], [1, 0], [0, 1]]
CAPACITY_WEIGHTS_TK = [[0.60, 0.40], [0.55, 0.45], [0.70, 0.30], [0.80, 0.20]]


@pytest.mark.parametrize(
    "policy, kept_experts_TK",
    [
        ("position", [[0, 1], [0, -1], [1, -1], [-1, -1]]),
        ("score", [[0, -1], [-1, 1], [1, -1], [0, -1]]),
    ],
)
def test_drop_policies_keep_documented_survivors(policy, kept_experts_TK):
    experts_TK = torch.tensor(CAPACITY_EXPERTS_TK)
    weights_TK = torch.tensor(CAPACITY_WEIGHTS_TK, requires_grad=True)
    kept_TK, kept_weights_TK = drop_over_capacity(experts_TK, weights_TK, 2, 2, policy)
    assert kept_TK.tolist() == kept_experts_TK
    dropped = torch.tensor(kept_experts_TK) < 0
    torch.testing.assert_close(kept_weights_TK, torch.where(dropped, 0.0, weights_TK.detach()))
    # The dropped weights carry no gradient; the kept ones carry it unchanged.
    kept_weights_TK.sum().backward()
    torch.testing.assert_close(weights_TK.grad, (~dropped).float())
    # The reference's capacity rule picks the same survivors.
    ref_experts = [list(row) for row in CAPACITY_EXPERTS_TK]
    ref_weights = [[torch.tensor(w) for w in row] for row in CAPACITY_WEIGHTS_TK]
    ref.drop_choices(ref_experts, ref_weights, 2, 2, policy)
    assert ref_experts == kept_experts_TK


def test_drop_over_capacity_rejects_unknown_policy():
    with pytest.raises(ValueError, match="'random'"):
        drop_over_capacity(torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, 1), 2, 1, "random")


@pytest.mark.parametrize("policy", ["position", "score"])
@pytest.mark.parametrize(
    "num_tokens, num_experts, top_k, capacity_factor",
    [
        (16, 4, 2, 0.5),  # C = 4 for 32 choices: at least 16 dropped
        (16, 4, 2, 1.0),  # C = 8: drops only where routing is unbalanced
        (9, 7, 3, 0.75),  # prime E, C = ceil(2.89) = 3
        (1, 4, 2, 0.1),  # T = 1, C = 1: one token never over capacity
    ],
)
def test_router_capacity_matches_reference(num_tokens, num_experts, top_k, capacity_factor, policy):
    torch.manual_seed(6)
    router = make_router(6, num_experts, top_k, capacity_factor=capacity_factor, drop_policy=policy, aux_loss_coef=1.0)
    # Skew routing towards expert 0 (its logit raised by 2 for every token) so that it overflows.
    with torch.no_grad():
        router.weight[0, 0] = 2.0
    x_TD = torch.randn(num_tokens, 6)
    x_TD[:, 0] = 1.0
    routing = router(x_TD)
    expected = reference_routing(router, x_TD)

    capacity = expert_capacity(num_tokens, top_k, num_experts, capacity_factor)
    assert routing.capacity == capacity == expected.capacity
    assert torch.equal(routing.experts_TK, expected.experts_TK)
    torch.testing.assert_close(routing.weights_TK, expected.weights_TK.float(), atol=FP32_ATOL, rtol=FP32_RTOL)

    dropped_TK = routing.experts_TK < 0
    assert (routing.weights_TK[dropped_TK] == 0).all()
    kept_E = torch.bincount(routing.experts_TK[~dropped_TK], minlength=num_experts)
    assert (kept_E <= capacity).all()
    # Drop count: every choice above an expert's capacity, and nothing else.
    before_E = torch.bincount(expected.experts_before_drop_TK.flatten(), minlength=num_experts)
    assert int(dropped_TK.sum()) == int((before_E - capacity).clamp_min(0).sum())
    if capacity_factor == 0.5:
        assert int(dropped_TK.sum()) >= num_tokens * top_k - num_experts * capacity > 0
    # The balance loss counts the choices before the drops.
    probs_TE = ref.balance_probs(expected.scores_TE, "softmax")
    balance = ref.switch_loss(probs_TE, expected.experts_before_drop_TK)
    torch.testing.assert_close(routing.aux_terms["balance_loss"], balance.float(), atol=FP32_ATOL, rtol=FP32_RTOL)


@pytest.mark.parametrize("policy", ["position", "score"])
def test_capacity_of_t_times_k_drops_nothing(policy):
    torch.manual_seed(7)
    num_tokens, num_experts, top_k = 10, 4, 2
    dropless = make_router(5, num_experts, top_k)
    # cf = E gives C = T*K: even all choices on one expert fit.
    capped = make_router(5, num_experts, top_k, capacity_factor=float(num_experts), drop_policy=policy)
    capped.load_state_dict(dropless.state_dict())
    with torch.no_grad():
        capped.weight[1, 0] = dropless.weight[1, 0] = 50.0  # route every token's first choice to expert 1
    x_TD = torch.randn(num_tokens, 5).abs() + 0.5
    a, b = dropless(x_TD), capped(x_TD)
    assert b.capacity == num_tokens * top_k
    assert (a.experts_TK[:, 0] == 1).all()
    assert torch.equal(a.experts_TK, b.experts_TK)
    assert torch.equal(a.weights_TK, b.weights_TK)
    assert (b.experts_TK >= 0).all()


def test_unknown_drop_policy_is_refused_at_construction():
    with pytest.raises(ValueError, match="drop_policy = 'random': allowed: position, score"):
        make_router(4, 3, 1, capacity_factor=1.0, drop_policy="random")


# ---------------------------------------------------------------------------------------------
# Precision and construction
# ---------------------------------------------------------------------------------------------


def test_router_computes_in_fp32_under_bf16_autocast():
    torch.manual_seed(8)
    router = make_router(8, 6, 2, z_loss_coef=0.01)
    x_TD = torch.randn(12, 8)
    plain = router(x_TD)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # Under autocast a matmul would run in bf16; the router must not.
        assert (x_TD @ router.weight.t()).dtype == torch.bfloat16
        routed = router(x_TD)
    for name in ("weights_TK", "scores_TE", "aux_loss"):
        assert getattr(routed, name).dtype == torch.float32, name
    assert torch.equal(routed.experts_TK, plain.experts_TK)
    torch.testing.assert_close(routed.weights_TK, plain.weights_TK, atol=0, rtol=0)
    torch.testing.assert_close(routed.aux_loss, plain.aux_loss, atol=0, rtol=0)


def test_router_with_bf16_input_and_weight_returns_fp32():
    torch.manual_seed(9)
    router = make_router(8, 4, 2).to(torch.bfloat16)
    x_TD = torch.randn(5, 8, dtype=torch.bfloat16)
    routing = router(x_TD)
    assert routing.weights_TK.dtype == routing.scores_TE.dtype == torch.float32
    # Same decision as fp32 on the bf16-rounded values: the logits are computed in fp32.
    expected = reference_routing(router, x_TD)
    torch.testing.assert_close(routing.weights_TK, expected.weights_TK.float(), atol=FP32_ATOL, rtol=FP32_RTOL)


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_gate_logits_keep_the_tokens_in_their_dtype_for_the_backward(weight_dtype):
    # x.float() @ w.float().t() under plain autograd keeps an fp32 copy of x (T*D*4 bytes per layer);
    # gate_logits keeps x itself and matches that formulation's values and gradients.
    from moe_engine.routing.gate import gate_logits

    torch.manual_seed(10)
    x = torch.randn(13, 24, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(5, 24) * 0.2).to(weight_dtype).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = gate_logits(x, w)
    assert logits.dtype == torch.float32
    assert [t.dtype for t in saved if t.shape == x.shape] == [torch.bfloat16]  # no fp32 copy of x
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    expected = x_ref.float() @ w_ref.float().t()
    torch.testing.assert_close(logits, expected, atol=0, rtol=0)
    grad = torch.randn(13, 5)
    got = torch.autograd.grad(logits, (x, w), grad)
    want = torch.autograd.grad(expected, (x_ref, w_ref), grad)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # The router's own gate GEMM keeps no fp32 copy of bf16 tokens either.
    router = make_router(24, 5, 2, z_loss_coef=0.01).to(weight_dtype)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        router(x)
    assert not [t for t in saved if t.shape == x.shape and t.dtype == torch.float32]


@pytest.mark.parametrize(
    "top_k, kwargs, match",
    [
        (0, {}, "top_k = 0"),
        (5, {}, "top_k = 5"),  # K > E = 4
        (2, {"score_function": "relu"}, "'relu'"),
        (2, {"aux_loss_type": "gshard"}, "'gshard'"),
    ],
)
def test_router_rejects_bad_arguments(top_k, kwargs, match):
    with pytest.raises(ValueError, match=match):
        TopKRouter(4, 4, top_k, **kwargs)


@pytest.mark.parametrize("policy", ["position", "score"])
def test_choices_dropped_before_stay_dropped_and_take_no_slot(policy: str) -> None:
    # Token 0's second choice is already dropped (-1); expert 1 has capacity 1.
    experts_TK = torch.tensor([[1, -1], [1, 0], [0, 1]])
    weights_TK = torch.tensor([[0.9, 0.0], [0.6, 0.4], [0.7, 0.3]])
    experts, weights = drop_over_capacity(experts_TK, weights_TK, 2, 1, policy)
    rows = [list(r) for r in experts_TK.tolist()]
    weight_rows = [[w for w in row.unbind(0)] for row in weights_TK]
    ref.drop_choices(rows, weight_rows, 2, 1, policy)
    assert experts.tolist() == rows
    assert experts[0, 1] == -1 and weights[0, 1] == 0
    torch.testing.assert_close(weights, torch.stack([torch.stack(r) for r in weight_rows]))
    # Only one choice per expert survives, and the -1 never claimed expert 1's (the last expert's) slot.
    kept = experts[experts >= 0]
    assert torch.bincount(kept, minlength=2).tolist() == [1, 1]


def test_aux_terms_are_detached_for_telemetry() -> None:
    # Logged terms kept across steps must not hold each step's autograd graph.
    from moe_engine.routing import RoutingContext
    from moe_engine.routing.router import TopKRouter

    ctx = RoutingContext(sequence_ids_T=torch.arange(16) // 4)
    for aux_loss_type in ("switch", "seq_switch"):
        router = TopKRouter(8, 4, 2, aux_loss_type=aux_loss_type, z_loss_coef=1e-3)
        out = router(torch.randn(16, 8), ctx)
        assert out.aux_loss.requires_grad and out.aux_terms
        assert not any(v.requires_grad for v in out.aux_terms.values()), aux_loss_type


@pytest.mark.parametrize("policy", ["position", "score"])
def test_ties_over_capacity_keep_the_earliest_tokens_among_many(policy: str) -> None:
    # 40 first choices of expert 0, all of equal weight, capacity 5: both policies keep tokens 0..4
    # (stable sorts; an unstable argsort reorders ties from about 17 elements on CPU).
    experts_TK = torch.tensor([[0, 1]] * 40)
    weights_TK = torch.full((40, 2), 0.5)
    experts, _ = drop_over_capacity(experts_TK, weights_TK, 2, 5, policy)
    assert (experts[:, 0] >= 0).nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    assert (experts[:, 1] >= 0).nonzero().flatten().tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("x_dtype, weight_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_gate_logits_weight_gradient_when_the_tokens_need_none(x_dtype, weight_dtype):
    # The router of a first layer sees tokens that need no gradient; its weight still needs one.
    from moe_engine.routing.gate import gate_logits

    torch.manual_seed(11)
    x = torch.randn(7, 16, dtype=x_dtype)
    w = (torch.randn(3, 16) * 0.2).to(weight_dtype).requires_grad_()
    grad = torch.randn(7, 3)
    (got,) = torch.autograd.grad(gate_logits(x, w), (w,), grad)
    assert got.dtype == weight_dtype
    torch.testing.assert_close(got.float(), grad.t() @ x.float(), atol=1e-2, rtol=1e-2)
