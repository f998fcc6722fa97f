"""Tests of expert-choice routing (moe_engine.routing.expert_choice) against a per-expert transcription
of Zhou et al. 2022, alone and inside the MoE layer (output and every gradient, float64)."""

from __future__ import annotations

import math

import pytest
import torch

from moe_engine.config import ConfigError, MoEConfig, RouterConfig, load_config
from moe_engine.layer import MoELayer
from moe_engine.routing import ExpertChoiceRouter


def transcription(x_TD: torch.Tensor, w_ED: torch.Tensor, top_k: int, capacity_factor: float):
    """(capacity, chosen: expert -> list of (token, weight)) one expert at a time, in float64."""
    num_tokens, num_experts = x_TD.shape[0], w_ED.shape[0]
    capacity = min(num_tokens, max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts)))
    scores_TE = (x_TD.double() @ w_ED.double().t()).softmax(-1)
    chosen = {}
    for e in range(num_experts):
        # Descending by score, ties to the lower token.
        order = sorted(range(num_tokens), key=lambda t: (-float(scores_TE[t, e].detach()), t))[:capacity]
        chosen[e] = [(t, scores_TE[t, e]) for t in order]
    return capacity, chosen, scores_TE


@pytest.mark.parametrize(
    "num_tokens, num_experts, top_k, capacity_factor",
    [
        (16, 8, 2, 1.0),  # C = 4
        (1, 4, 1, 1.0),  # T = 1: every expert takes the one token
        (13, 7, 3, 1.0),  # prime E, C = ceil(39 / 7) = 6
        (6, 3, 3, 1.0),  # K = E: C = T, every expert takes every token
        (9, 5, 2, 0.3),  # C = ceil(1.08) = 2
        (5, 4, 2, 4.0),  # C capped at T
    ],
)
def test_router_matches_the_transcription(num_tokens, num_experts, top_k, capacity_factor):
    torch.manual_seed(0)
    router = ExpertChoiceRouter(6, num_experts, top_k, capacity_factor=capacity_factor)
    x_TD = torch.randn(num_tokens, 6)
    routing = router(x_TD)
    capacity, chosen, scores_TE = transcription(x_TD, router.weight.detach(), top_k, capacity_factor)
    assert routing.capacity == capacity and routing.aux_loss.item() == 0.0
    assert routing.experts_TK.shape == routing.weights_TK.shape == (num_tokens, num_experts)
    assert routing.weights_TK.dtype == routing.scores_TE.dtype == torch.float32
    torch.testing.assert_close(routing.scores_TE.double(), scores_TE, atol=1e-6, rtol=1e-5)
    for e in range(num_experts):
        tokens = sorted(t for t, _ in chosen[e])
        assert (routing.experts_TK[:, e] >= 0).nonzero().flatten().tolist() == tokens
        assert (routing.experts_TK[tokens, e] == e).all()
        for t, weight in chosen[e]:
            assert routing.weights_TK[t, e].item() == pytest.approx(weight.item(), rel=1e-5)
    # Balanced by construction: every expert takes exactly C tokens; the rest carry -1 and weight 0.
    assert ((routing.experts_TK >= 0).sum(0) == capacity).all()
    assert (routing.weights_TK[routing.experts_TK < 0] == 0).all()


def test_ties_go_to_the_lower_token():
    router = ExpertChoiceRouter(4, 4, 1)
    with torch.no_grad():
        router.weight.zero_()  # every score 1/E: each expert takes tokens 0..C-1
    routing = router(torch.randn(8, 4))
    assert routing.capacity == 2
    assert (routing.experts_TK[:2] == torch.arange(4)).all() and (routing.experts_TK[2:] == -1).all()


@pytest.mark.parametrize("num_tokens, num_experts, top_k, capacity_factor", [(11, 5, 2, 1.0), (1, 3, 3, 1.0), (7, 4, 1, 2.0)])
def test_layer_matches_the_transcription_with_every_gradient(num_tokens, num_experts, top_k, capacity_factor):
    torch.manual_seed(1)
    cfg = MoEConfig(num_experts=num_experts, ffn_hidden=6, experts_impl="loop",
                    router=RouterConfig(type="expert_choice", top_k=top_k, capacity_factor=capacity_factor))
    layer = MoELayer.from_config(8, cfg).double()
    x_TD = torch.randn(num_tokens, 8, dtype=torch.float64, requires_grad=True)
    out = layer(x_TD)
    grad_y = torch.randn_like(out.y)
    (out.y * grad_y).sum().backward()
    assert out.tokens_per_expert_E.tolist() == [out.routing.capacity] * num_experts

    params = {name: p.detach().clone().requires_grad_() for name, p in layer.named_parameters()}
    x_ref = x_TD.detach().clone().requires_grad_()
    _, chosen, _ = transcription(x_ref, params["router.weight"], top_k, capacity_factor)
    w_in, w_out = params["experts.w_in"], params["experts.w_out"]
    y_rows = [torch.zeros(8, dtype=torch.float64) for _ in range(num_tokens)]
    for e, picks in chosen.items():
        for t, weight in picks:
            gate, up = (w_in[e] @ x_ref[t]).chunk(2)
            y_rows[t] = y_rows[t] + weight * (w_out[e] @ (torch.nn.functional.silu(gate) * up))
    y_ref = torch.stack(y_rows)
    (y_ref * grad_y).sum().backward()
    # The routing (scores and weights) is fp32 by design, the rest float64.
    tol = dict(atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.y, y_ref, **tol)
    torch.testing.assert_close(x_TD.grad, x_ref.grad, **tol)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, **tol, msg=name)


def test_decisions_in_fp32_under_bf16_autocast():
    torch.manual_seed(2)
    router = ExpertChoiceRouter(16, 6, 2)
    x_TD = torch.randn(20, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = router(x_TD)
    plain = router(x_TD)
    assert under.weights_TK.dtype == torch.float32 and torch.equal(under.experts_TK, plain.experts_TK)


def test_config_builds_it_and_refuses_what_it_does_not_have():
    cfg = load_config(None, ["moe.router.type=expert_choice", "moe.router.capacity_factor=1.5", "moe.num_experts=4"])
    layer = MoELayer.from_config(8, cfg.moe)
    assert isinstance(layer.router, ExpertChoiceRouter) and layer.router.capacity_factor == 1.5
    assert MoELayer.from_config(8, load_config(None, ["moe.router.type=expert_choice"]).moe).router.capacity_factor == 1.0
    for override, message in [
        ("moe.router.aux_loss_coef=0.1", "expert_choice is balanced by construction"),
        ("moe.router.renormalize=false", "never renormalised"),
        ("moe.router.drop_policy=score", "expert_choice drops nothing"),
        ("moe.router.z_loss_coef=0.01", "'expert_choice' has none"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["moe.router.type=expert_choice", override])
    # It always has a capacity, so static all-to-all splits need no capacity_factor.
    fixed = ["parallel.dispatcher=all_to_all", "parallel.fixed_splits=true"]
    assert load_config(None, ["moe.router.type=expert_choice", *fixed]).parallel.fixed_splits
    with pytest.raises(ValueError, match=r"top_k = 5: must be in \[1, num_experts = 4\]"):
        ExpertChoiceRouter(8, 4, 5)


def test_ties_go_to_the_lower_token_among_many() -> None:
    # 20 identical tokens: every expert takes tokens 0..4 (a stable sort; an unstable one reorders
    # ties from about 17 elements on CPU).
    router = ExpertChoiceRouter(4, 4, 1)
    out = router(torch.ones(20, 4))
    assert out.capacity == 5
    assert torch.equal(out.experts_TK[:5], torch.arange(4).expand(5, 4)) and bool((out.experts_TK[5:] == -1).all())
