"""Tests of the fused top-k gating kernel (moe_engine.kernels.router) and the router features it carries.

The Triton path (under Triton's interpreter on CPU) is compared with `topk_gating_reference`,
forward and the gradient through every differentiable output; group-limited selection is also
checked against a per-token brute force. Expert choices are compared exactly: both paths break
ties to the lowest expert index.
"""

from __future__ import annotations

import pytest
import torch

from moe_engine.kernels.router import (
    TopKGating,
    topk_gating,
    topk_gating_backward_triton,
    topk_gating_reference,
    topk_gating_triton,
)
from moe_engine.routing import TopKRouter

FP32_ATOL, FP32_RTOL = 1e-6, 1e-5
DIFFERENTIABLE = ("scores_TE", "weights_TK", "prob_sums_E", "lse_T")

# (T, E, K), each row an edge case of the kernel.
SHAPES = [
    (16, 8, 2),  # typical, T = BLOCK_T of the first (interpreter) config
    (1, 8, 2),  # T = 1
    (5, 8, 2),  # T < BLOCK_T: a partial block
    (37, 7, 3),  # prime E (padded to 8), several blocks with a tail
    (9, 7, 7),  # K = E: every expert chosen, in score order
    (6, 1, 1),  # E = 1: a softmax weight is exactly 1
    (20, 64, 8),  # OLMoE-like E = 64, K = 8
    (17, 128, 8),  # Qwen3-like E = 128, K = 8
]

# (score_function, renormalize, scaling_factor, with expert bias)
MODES = [
    ("softmax", True, 1.0, False),  # Mixtral / Qwen3-MoE
    ("softmax", False, 1.0, False),  # Qwen2-MoE: raw top-k probabilities
    ("sigmoid", True, 2.5, True),  # DeepSeek-V3: sigmoid, bias for selection, renormalise, scale 2.5
]


def both(logits_TE: torch.Tensor, top_k: int, monkeypatch, **kwargs) -> tuple[TopKGating, TopKGating]:
    monkeypatch.setenv("MOE_ENGINE_KERNELS", "triton")
    fused = topk_gating(logits_TE, top_k, **kwargs)
    return fused, topk_gating_reference(logits_TE, top_k, **kwargs)


def assert_same_gating(fused: TopKGating, expected: TopKGating) -> None:
    assert torch.equal(fused.experts_TK, expected.experts_TK)
    assert torch.equal(fused.counts_E, expected.counts_E)
    assert fused.counts_E.dtype == fused.experts_TK.dtype == torch.int64
    for name in ("scores_TE", "weights_TK", "prob_sums_E", "lse_T"):
        got, want = getattr(fused, name), getattr(expected, name)
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got, want.detach(), atol=FP32_ATOL, rtol=FP32_RTOL, msg=name)


def random_logits(num_tokens: int, num_experts: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(num_tokens, num_experts, generator=generator)).to(dtype)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16 logits: both paths compute in fp32
@pytest.mark.parametrize("num_tokens, num_experts, top_k", SHAPES)
def test_forward_matches_reference(num_tokens, num_experts, top_k, dtype, mode, monkeypatch):
    score_function, renormalize, scaling_factor, with_bias = mode
    logits_TE = random_logits(num_tokens, num_experts, dtype)
    bias_E = 0.1 * torch.randn(num_experts) if with_bias else None
    fused, expected = both(logits_TE, top_k, monkeypatch, score_function=score_function, renormalize=renormalize,
                           scaling_factor=scaling_factor, expert_bias_E=bias_E)
    assert_same_gating(fused, expected)
    assert int(fused.counts_E.sum()) == num_tokens * top_k
    if renormalize:
        sums_T = fused.weights_TK.sum(-1)
        torch.testing.assert_close(sums_T, torch.full_like(sums_T, scaling_factor))


@pytest.mark.parametrize(
    "num_tokens, config",
    [
        (7, {"BLOCK_T": 1, "num_warps": 4}),  # one token per program (the candidate for the largest E)
        (37, {"BLOCK_T": 4, "num_warps": 4}),  # 10 blocks, the last one partial
        (37, {"BLOCK_T": 64, "num_warps": 8}),  # one partial block
    ],
)
def test_forward_other_block_sizes(num_tokens, config):
    logits_TE = random_logits(num_tokens, 12, torch.float32, seed=1)
    kwargs = dict(score_function="sigmoid", renormalize=True, scaling_factor=2.5, expert_bias_E=torch.randn(12) * 0.1,
                  n_groups=4, topk_groups=2)
    assert_same_gating(topk_gating_triton(logits_TE, 4, config=config, **kwargs),
                       topk_gating_reference(logits_TE, 4, **kwargs))


def test_all_tokens_to_one_expert(monkeypatch):
    # A logit 1e4 above the rest: softmax scores are one-hot, the other K-1 choices are ties at 0
    # (lowest indices first), counts put T on the hot expert, lse is the huge logit.
    logits_TE = random_logits(13, 7, torch.float32)
    logits_TE[:, 4] = 1e4
    fused, expected = both(logits_TE, 3, monkeypatch)
    assert_same_gating(fused, expected)
    assert (fused.experts_TK[:, 0] == 4).all()
    assert fused.experts_TK[:, 1:].tolist() == [[0, 1]] * 13
    assert fused.counts_E.tolist() == [13, 13, 0, 0, 13, 0, 0]  # experts 2, 3, 5, 6 get no tokens
    torch.testing.assert_close(fused.weights_TK[:, 0], torch.ones(13))
    torch.testing.assert_close(fused.lse_T, torch.full((13,), 1e4))


def test_ties_go_to_the_lowest_expert(monkeypatch):
    # torch.topk on CPU returns zeros in the order 12, 9, 10, ... (no index tie-break); both paths sort stably.
    logits_TE = torch.tensor([[1.0, 2, 2, 1, 2, 0, 2], [0, 0, 0, 0, 0, 0, 0], [3, 1, 3, 1, 3, 1, 3]])
    for score_function in ("softmax", "sigmoid"):
        fused, expected = both(logits_TE, 3, monkeypatch, score_function=score_function)
        assert fused.experts_TK.tolist() == [[1, 2, 4], [0, 1, 2], [0, 2, 4]]
        assert_same_gating(fused, expected)


def test_no_tokens(monkeypatch):
    fused, expected = both(torch.zeros(0, 6), 2, monkeypatch)
    assert_same_gating(fused, expected)
    assert fused.weights_TK.shape == (0, 2) and fused.counts_E.tolist() == [0] * 6


def test_expert_bias_changes_selection_not_weights(monkeypatch):
    # Every token ranks expert 0 > 1 > 2 > 3 > 4; a bias of +1 on expert 4 makes it a choice,
    # with its own (small, unbiased) softmax probability as weight.
    logits_TE = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(6, 1) + 0.01 * random_logits(6, 5, torch.float32)
    bias_E = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])
    plain, _ = both(logits_TE, 2, monkeypatch, renormalize=False)
    fused, expected = both(logits_TE, 2, monkeypatch, renormalize=False, expert_bias_E=bias_E)
    assert_same_gating(fused, expected)
    assert plain.experts_TK.tolist() == [[0, 1]] * 6
    assert fused.experts_TK.tolist() == [[4, 0]] * 6
    torch.testing.assert_close(fused.weights_TK, fused.scores_TE.gather(1, fused.experts_TK),
                               atol=FP32_ATOL, rtol=FP32_RTOL)
    assert (fused.weights_TK[:, 0] < 0.02).all()
    # Scores, P (prob_sums) and lse ignore the bias.
    for name in ("scores_TE", "prob_sums_E", "lse_T"):
        torch.testing.assert_close(getattr(fused, name), getattr(plain, name), msg=name)


# ---------------------------------------------------------------------------------------------
# Group-limited selection
# ---------------------------------------------------------------------------------------------


def brute_force_group_topk(select_TE: torch.Tensor, top_k: int, n_groups: int, topk_groups: int) -> list[list[int]]:
    """Per token, in plain Python: groups ranked by the sum of their two best scores (one if the
    group has one expert), ties to the lower group; then experts of the kept groups by score, ties
    to the lower index."""
    num_experts = select_TE.shape[1]
    size = num_experts // n_groups
    chosen = []
    for row in select_TE.tolist():
        groups = [sorted(row[g * size:(g + 1) * size], reverse=True) for g in range(n_groups)]
        group_score = [sum(values[:2]) for values in groups]
        kept = sorted(range(n_groups), key=lambda g: (-group_score[g], g))[:topk_groups]
        candidates = [e for e in range(num_experts) if e // size in kept]
        chosen.append(sorted(candidates, key=lambda e: (-row[e], e))[:top_k])
    return chosen


@pytest.mark.parametrize(
    "num_tokens, num_experts, top_k, n_groups, topk_groups, score_function",
    [
        (11, 16, 4, 4, 2, "sigmoid"),  # groups of 4, keep 2
        (9, 12, 5, 6, 3, "softmax"),  # groups of 2: the group score is the whole group
        (7, 8, 3, 8, 3, "sigmoid"),  # groups of 1: its own score; keeping K groups is no limit at all
        (6, 15, 5, 3, 1, "softmax"),  # odd groups of 5 in E padded to 16; K = the one kept group
        (20, 64, 8, 8, 4, "sigmoid"),  # DeepSeek-V3's 8 groups / 4 kept, at E = 64
    ],
)
def test_group_limited_matches_brute_force(num_tokens, num_experts, top_k, n_groups, topk_groups, score_function,
                                           monkeypatch):
    logits_TE = random_logits(num_tokens, num_experts, torch.float32, seed=3)
    bias_E = 0.2 * torch.randn(num_experts, generator=torch.Generator().manual_seed(4))
    kwargs = dict(score_function=score_function, expert_bias_E=bias_E, n_groups=n_groups, topk_groups=topk_groups,
                  scaling_factor=2.5)
    fused, expected = both(logits_TE, top_k, monkeypatch, **kwargs)
    assert_same_gating(fused, expected)
    scores_TE = logits_TE.softmax(-1) if score_function == "softmax" else logits_TE.sigmoid()
    assert fused.experts_TK.tolist() == brute_force_group_topk(scores_TE + bias_E, top_k, n_groups, topk_groups)
    # The group limit matters on these inputs (otherwise the test above proves little).
    unlimited, _ = both(logits_TE, top_k, monkeypatch, score_function=score_function, expert_bias_E=bias_E)
    assert torch.equal(unlimited.experts_TK, fused.experts_TK) == (num_experts == n_groups)


def test_group_ties_go_to_the_lowest_group(monkeypatch):
    # All scores equal: every group ties, groups 0 and 1 win, then experts 0, 1, 2.
    fused, expected = both(torch.zeros(3, 12), 3, monkeypatch, n_groups=4, topk_groups=2)
    assert fused.experts_TK.tolist() == [[0, 1, 2]] * 3
    assert_same_gating(fused, expected)


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


def gating_grads(fn, logits_TE, top_k, upstream, **kwargs) -> torch.Tensor:
    logits_TE = logits_TE.detach().clone().requires_grad_()
    out = fn(logits_TE, top_k, **kwargs)
    loss = sum((getattr(out, name) * grad).sum() for name, grad in upstream.items())
    loss.backward()
    return logits_TE.grad


@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 1e-6, 1e-5), (torch.bfloat16, 1e-5, 8e-3)])
@pytest.mark.parametrize("outputs", [(name,) for name in DIFFERENTIABLE] + [DIFFERENTIABLE])
@pytest.mark.parametrize("mode", MODES + [("sigmoid", False, 1.0, False)])
def test_gradients_match_reference(mode, outputs, dtype, atol, rtol, monkeypatch):
    score_function, renormalize, scaling_factor, with_bias = mode
    num_tokens, num_experts, top_k = 37, 7, 3  # prime E, several blocks, partial last block
    logits_TE = random_logits(num_tokens, num_experts, dtype)
    generator = torch.Generator().manual_seed(5)
    shapes = {"scores_TE": (num_tokens, num_experts), "weights_TK": (num_tokens, top_k),
              "prob_sums_E": (num_experts,), "lse_T": (num_tokens,)}
    upstream = {name: torch.randn(shapes[name], generator=generator) for name in outputs}
    kwargs = dict(score_function=score_function, renormalize=renormalize, scaling_factor=scaling_factor,
                  expert_bias_E=0.1 * torch.randn(num_experts, generator=generator) if with_bias else None)
    monkeypatch.setenv("MOE_ENGINE_KERNELS", "triton")
    fused = gating_grads(topk_gating, logits_TE, top_k, upstream, **kwargs)
    expected = gating_grads(topk_gating_reference, logits_TE, top_k, upstream, **kwargs)
    assert fused.dtype == dtype
    torch.testing.assert_close(fused, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("num_tokens, num_experts, top_k, n_groups, topk_groups", [
    (20, 64, 8, 1, 1),  # E = 64, K = 8
    (17, 128, 8, 8, 4),  # E = 128, K = 8, group-limited (the choice moves, the formula does not)
    (1, 8, 2, 1, 1),  # T = 1
])
def test_gradients_at_larger_e(num_tokens, num_experts, top_k, n_groups, topk_groups, monkeypatch):
    logits_TE = random_logits(num_tokens, num_experts, torch.float32, seed=6)
    generator = torch.Generator().manual_seed(7)
    upstream = {"weights_TK": torch.randn(num_tokens, top_k, generator=generator),
                "prob_sums_E": torch.randn(num_experts, generator=generator),
                "lse_T": torch.randn(num_tokens, generator=generator)}
    for score_function in ("softmax", "sigmoid"):
        kwargs = dict(score_function=score_function, n_groups=n_groups, topk_groups=topk_groups)
        monkeypatch.setenv("MOE_ENGINE_KERNELS", "triton")
        fused = gating_grads(topk_gating, logits_TE, top_k, upstream, **kwargs)
        expected = gating_grads(topk_gating_reference, logits_TE, top_k, upstream, **kwargs)
        torch.testing.assert_close(fused, expected, atol=FP32_ATOL, rtol=FP32_RTOL)


@pytest.mark.parametrize("outputs", [("weights_TK",), ("prob_sums_E",), DIFFERENTIABLE])
def test_sigmoid_scores_that_all_underflow_stay_finite(outputs, monkeypatch):
    # Every logit of token 2 below -104: its fp32 sigmoid scores are all exactly 0, so the per-token
    # balance sum S is 0. Both paths clamp it (as the renormalisation does): no 0/0 in P_i or its gradient.
    logits_TE = random_logits(4, 8, torch.float32, seed=8)
    logits_TE[2] = -110.0 + logits_TE[2]
    generator = torch.Generator().manual_seed(9)
    shapes = {"scores_TE": (4, 8), "weights_TK": (4, 2), "prob_sums_E": (8,), "lse_T": (4,)}
    upstream = {name: torch.randn(shapes[name], generator=generator) for name in outputs}
    fused, expected = both(logits_TE, 2, monkeypatch, score_function="sigmoid")
    assert_same_gating(fused, expected)
    assert fused.prob_sums_E.isfinite().all()
    grad = gating_grads(topk_gating, logits_TE, 2, upstream, score_function="sigmoid")
    expected_grad = gating_grads(topk_gating_reference, logits_TE, 2, upstream, score_function="sigmoid")
    assert grad.isfinite().all() and expected_grad.isfinite().all()
    torch.testing.assert_close(grad, expected_grad, atol=FP32_ATOL, rtol=FP32_RTOL)


def test_backward_with_no_gradients_is_zero():
    logits_TE = random_logits(5, 6, torch.float32)
    experts_TK = topk_gating_reference(logits_TE, 2).experts_TK
    grad = topk_gating_backward_triton(logits_TE, experts_TK, None, None, None, None)
    assert torch.equal(grad, torch.zeros_like(logits_TE))


def test_compiles_through_the_custom_op(monkeypatch):
    monkeypatch.setenv("MOE_ENGINE_KERNELS", "triton")
    logits_TE = random_logits(9, 8, torch.float32).requires_grad_()

    def loss_fn(logits):
        out = topk_gating(logits, 2, score_function="sigmoid", scaling_factor=2.5)
        return out.weights_TK.sum() + out.prob_sums_E.square().sum() + out.lse_T.square().mean()

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    loss = compiled(logits_TE)
    (grad,) = torch.autograd.grad(loss, logits_TE)
    (expected,) = torch.autograd.grad(loss_fn(logits_TE), logits_TE)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck_topk_gating(with_bias):
    logits_TE = random_logits(5, 6, torch.float32).requires_grad_()
    bias_E = torch.randn(6) if with_bias else None
    torch.library.opcheck(torch.ops.moe_engine.topk_gating.default,
                          (logits_TE, bias_E, 2, "sigmoid", True, 2.5, 3, 2))


def test_opcheck_topk_gating_backward():
    logits_TE = random_logits(5, 6, torch.float32)
    experts_TK = topk_gating_reference(logits_TE, 2).experts_TK
    grads = (torch.randn(5, 2), torch.randn(5, 6), torch.randn(6), torch.randn(5))
    torch.library.opcheck(torch.ops.moe_engine.topk_gating_backward.default,
                          (logits_TE, experts_TK, *grads, "softmax", True, 1.0))


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "shape, top_k, kwargs, match",
    [
        ((4, 6), 0, {}, "top_k = 0"),
        ((4, 6), 7, {}, "top_k = 7"),
        ((4, 6), 2, {"score_function": "relu"}, "'relu'"),
        ((4, 6), 2, {"n_groups": 4}, "n_groups = 4"),  # 6 experts do not split into 4 groups
        ((4, 6), 2, {"n_groups": 3, "topk_groups": 4}, "topk_groups = 4"),
        ((4, 6), 3, {"n_groups": 3, "topk_groups": 1}, "top_k = 3"),  # one group of 2 experts
        ((4, 6), 2, {"expert_bias_E": torch.zeros(5)}, r"expert_bias_E.*\(6,\)"),
        ((6,), 2, {}, "2-D"),
    ],
)
def test_bad_arguments_are_named(shape, top_k, kwargs, match, backend, monkeypatch):
    monkeypatch.setenv("MOE_ENGINE_KERNELS", backend)
    with pytest.raises(ValueError, match=match):
        topk_gating(torch.zeros(shape), top_k, **kwargs)


# ---------------------------------------------------------------------------------------------
# TopKRouter: bias and groups
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_router_group_limit_and_bias(backend, monkeypatch):
    monkeypatch.setenv("MOE_ENGINE_KERNELS", backend)
    torch.manual_seed(8)
    router = TopKRouter(6, 16, 4, score_function="sigmoid", scaling_factor=2.5, expert_bias=True, n_groups=4,
                        topk_groups=2, z_loss_coef=0.01)
    with torch.no_grad():
        router.expert_bias.copy_(0.1 * torch.randn(16))
    x_TD = torch.randn(10, 6)
    routing = router(x_TD)
    logits_TE = x_TD @ router.weight.t()
    expected = brute_force_group_topk(logits_TE.sigmoid() + router.expert_bias, 4, 4, 2)
    assert routing.experts_TK.tolist() == expected
    assert "expert_bias" in router.state_dict()


def test_update_expert_bias_moves_toward_balance():
    router = TopKRouter(4, 4, 1, expert_bias=True, renormalize=False)
    router.update_expert_bias(torch.tensor([10, 2, 4, 0]), rate=0.01)  # mean 4: sign(4 - count)
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.01, 0.01, 0.0, 0.01]))
    # Every token prefers expert 0 (softmax 0.356) to expert 1 (0.322): overloading expert 0
    # lowers its bias step by step until expert 1 wins the choice, with its unbiased weight.
    router.expert_bias.zero_()
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    x_TD = torch.tensor([[1.0, 0.9, 0.0, 0.0]]).repeat(8, 1)
    first_choices = []
    for _ in range(4):
        routing = router(x_TD)
        first_choices.append(int(routing.experts_TK[0, 0]))
        router.update_expert_bias(torch.bincount(routing.experts_TK.flatten(), minlength=4), rate=0.01)
    assert first_choices[0] == 0 and 1 in first_choices
    torch.testing.assert_close(routing.weights_TK[:, 0], routing.scores_TE.gather(1, routing.experts_TK)[:, 0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_groups": 3}, "n_groups = 3: must divide num_experts = 8"),
        ({"n_groups": 4, "topk_groups": 5}, r"topk_groups = 5: must be in \[1, n_groups = 4\]"),
        ({"n_groups": 4, "topk_groups": 1}, "top_k = 4: topk_groups = 1 groups of 2 experts offer only 2"),
    ],
)
def test_router_rejects_bad_groups(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TopKRouter(4, 8, 4, **kwargs)


def test_update_expert_bias_needs_the_bias():
    with pytest.raises(ValueError, match="expert_bias=False"):
        TopKRouter(4, 4, 1).update_expert_bias(torch.zeros(4), 0.01)
    with pytest.raises(ValueError, match=r"\(3,\): expected \(4,\)"):
        TopKRouter(4, 4, 1, expert_bias=True).update_expert_bias(torch.zeros(3), 0.01)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_group_scores_and_expert_bias_by_hand(impl):
    # Independent of the reference: values worked out by hand. Group score = the sum of its top two
    # (DeepSeek-V3), not its best expert; the expert bias chooses, the weights stay unbiased.
    from moe_engine.kernels.router import topk_gating_reference, topk_gating_triton

    gating = topk_gating_reference if impl == "reference" else topk_gating_triton
    logit = lambda p: torch.logit(torch.tensor([p], dtype=torch.float32))  # noqa: E731
    # Groups of 2: (0.9, 0.1) sums 1.0 with the best single expert; (0.6, 0.6) sums 1.2 and wins.
    logits = torch.cat([logit(p) for p in (0.9, 0.1, 0.6, 0.6, 0.5, 0.5, 0.2, 0.2)])[None]
    out = gating(logits, 2, score_function="sigmoid", n_groups=4, topk_groups=1)
    assert sorted(out.experts_TK[0].tolist()) == [2, 3]
    torch.testing.assert_close(out.weights_TK[0], torch.tensor([0.5, 0.5]))
    # Bias +1 on expert 2 makes it the first choice; its weight is its own score, renormalised.
    logits = torch.cat([logit(p) for p in (0.8, 0.7, 0.3, 0.2)])[None]
    out = gating(logits, 2, score_function="sigmoid", expert_bias_E=torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert out.experts_TK[0].tolist() == [2, 0]
    torch.testing.assert_close(out.weights_TK[0], torch.tensor([0.3 / 1.1, 0.8 / 1.1]))


def test_non_contiguous_logits(monkeypatch):
    # A transposed (column-major) logits view: the launcher makes its rows contiguous, as the kernel
    # reads each row with stride 1; forward and gradient match the reference.
    logits_TE = random_logits(6, 9, torch.float32, seed=9).t().contiguous().t()
    assert logits_TE.stride(-1) != 1
    fused, expected = both(logits_TE, 3, monkeypatch, score_function="sigmoid")
    assert_same_gating(fused, expected)
    upstream = {"weights_TK": torch.randn(6, 3, generator=torch.Generator().manual_seed(10))}
    grad = gating_grads(topk_gating, logits_TE, 3, upstream)
    torch.testing.assert_close(grad, gating_grads(topk_gating_reference, logits_TE, 3, upstream),
                               atol=FP32_ATOL, rtol=FP32_RTOL)
