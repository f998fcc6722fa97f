"""Tests of moe_engine.mtl.moe_attention (MoEAttention) and moe_engine.mtl.blocks (TaskMoEBlock).

MoEAttention is compared with a float64 loop over tokens, choices and heads that computes, for
each kept choice, the query with that expert's weights and full softmax attention over the
token's sequence (Mod-Squad's mixture of attention experts, REFERENCES.md):
    q_tk = Wq_e x_t,  o_tk = concat_h softmax(K_h q_tk,h / sqrt(A)) V_h,  y_t = sum_k w_tk Wo_e o_tk
Gradients of every parameter (Wq, Wo, the shared kv projection, the router) and of x come from
autograd through that loop. It runs on both kernel backends: the torch references and the
Triton kernels (under Triton's interpreter on CPU, tests/conftest.py).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reference_moe as ref
from moe_engine.experts import MLP, GroupedExperts
from moe_engine.layer import MoELayer
from moe_engine.mtl.blocks import TaskMoEBlock
from moe_engine.mtl.moe_attention import MoEAttention
from moe_engine.mtl.statistics import check_task_ids
from moe_engine.routing import Routing, RoutingContext, TopKRouter

FP32_ATOL, FP32_RTOL = 2e-5, 1e-4


# Triton's interpreter costs seconds a test: every case runs on the torch kernels, a chosen few
# on the Triton kernels too.
@pytest.fixture
def backend(request, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MOE_ENGINE_KERNELS", request.param)
    return request.param


def with_backends(rows: list[tuple], triton_rows: set[int]) -> list:
    """Each row on the torch kernels, and the rows numbered in triton_rows also on Triton's."""
    cases = [pytest.param("torch", *row, id=f"torch-{i}") for i, row in enumerate(rows)]
    return cases + [pytest.param("triton", *rows[i], id=f"triton-{i}") for i in sorted(triton_rows)]


class TaskTableRouter(nn.Module):
    """Routes every token of task x to the experts table_XK[x] (-1: a dropped choice), weighted by
    softmax(logits_XK[x]) over the kept choices. A task-conditional router of the contract's
    interface that needs no file of moe_engine.mtl besides statistics."""

    def __init__(self, table_XK: list[list[int]], num_experts: int) -> None:
        super().__init__()
        table = torch.tensor(table_XK, dtype=torch.int64)
        self.num_experts, self.top_k = num_experts, table.shape[1]
        self.register_buffer("table_XK", table)
        self.logits_XK = nn.Parameter(torch.randn(table.shape, dtype=torch.float32))

    def weights(self, logits_XK: torch.Tensor, task_ids_T: torch.Tensor) -> torch.Tensor:
        dropped_TK = self.table_XK[task_ids_T] < 0
        return torch.softmax(logits_XK[task_ids_T].masked_fill(dropped_TK, -math.inf), -1).masked_fill(dropped_TK, 0.0)

    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext | None = None) -> Routing:
        num_tasks = self.table_XK.shape[0]
        task_ids_T = check_task_ids(ctx.task_ids_T if ctx else None, x_TD.shape[0], num_tasks, "TaskTableRouter")
        experts_TK = self.table_XK[task_ids_T]
        weights_TK = self.weights(self.logits_XK, task_ids_T)
        scores_TE = weights_TK.new_zeros(x_TD.shape[0], self.num_experts)
        scores_TE = scores_TE.scatter_add(1, experts_TK.clamp(min=0), weights_TK)
        capacity = x_TD.shape[0] if bool((self.table_XK < 0).any()) else None
        return Routing(weights_TK, experts_TK, scores_TE, weights_TK.new_zeros(()), {}, capacity)


def naive_moe_attention(
    x_BSD: torch.Tensor, w_q: torch.Tensor, w_o: torch.Tensor, w_kv: torch.Tensor,
    experts_TK: torch.Tensor, weights_TK: torch.Tensor, num_heads: int,
) -> torch.Tensor:
    """The loop reference: (B, S, D) in the inputs' dtype; choices with expert -1 are skipped."""
    B, S, D = x_BSD.shape
    inner = w_q.shape[1]
    head = inner // num_heads
    rows = []
    for b in range(B):
        keys_SQ = x_BSD[b] @ w_kv[:inner].t()
        values_SQ = x_BSD[b] @ w_kv[inner:].t()
        for s in range(S):
            t = b * S + s
            y_D = torch.zeros(D, dtype=x_BSD.dtype)
            for k in range(experts_TK.shape[1]):
                e = int(experts_TK[t, k])
                if e < 0:
                    continue
                q_Q = w_q[e] @ x_BSD[b, s]
                heads = []
                for h in range(num_heads):
                    cols = slice(h * head, (h + 1) * head)
                    probs_S = torch.softmax(keys_SQ[:, cols] @ q_Q[cols] / math.sqrt(head), dim=0)
                    heads.append(probs_S @ values_SQ[:, cols])
                y_D = y_D + weights_TK[t, k] * (w_o[e] @ torch.cat(heads))
            rows.append(y_D)
    return torch.stack(rows).view(B, S, D)


def make_attention(D, H, E, K, head_dim=None, **router_kwargs) -> MoEAttention:
    router = TopKRouter(D, E, K, aux_loss_type="none", **router_kwargs)
    with torch.no_grad():
        router.weight.normal_()  # clear top-k gaps, so fp32 and fp64 pick the same experts
    return MoEAttention(D, H, E, router, head_dim=head_dim)


def double_params(attn: MoEAttention) -> list[torch.Tensor]:
    return [p.detach().double().requires_grad_() for p in (attn.w_q, attn.w_o, attn.kv_proj.weight)]


# ---------------------------------------------------------------------------------------------
# MoEAttention against the loop reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend, B, S, D, H, head_dim, E, K, capacity_factor",
    with_backends([
        (2, 5, 12, 3, None, 4, 2, None),  # odd S, typical
        (1, 1, 8, 2, None, 3, 2, None),  # T = 1: a token attends only to itself
        (3, 3, 8, 2, None, 3, 3, None),  # K = E, E prime
        (2, 7, 10, 2, 3, 5, 2, None),  # head_dim != D / H, odd D, prime E
        (2, 5, 8, 2, None, 4, 2, 0.5),  # capacity drops choices: expert -1, weight 0
    ], triton_rows={2, 4}),
    indirect=["backend"],
)
def test_topk_router_matches_reference(backend, B, S, D, H, head_dim, E, K, capacity_factor) -> None:
    torch.manual_seed(B * 100 + S * 10 + E)
    attn = make_attention(D, H, E, K, head_dim, capacity_factor=capacity_factor)
    x = torch.randn(B, S, D, requires_grad=True)
    y, routing = attn(x)
    grad_y = torch.randn_like(y)
    params = [x, attn.w_q, attn.w_o, attn.kv_proj.weight, attn.router.weight]
    grads = torch.autograd.grad((y * grad_y).sum(), params)

    x64 = x.detach().double().requires_grad_()
    router64 = attn.router.weight.detach().double().requires_grad_()
    ref_routing = ref.route(x64.view(B * S, D), router64, K, capacity_factor=capacity_factor)
    assert torch.equal(routing.experts_TK, ref_routing.experts_TK)
    if capacity_factor is not None:
        assert (routing.experts_TK == -1).any()
    params64 = double_params(attn)
    y64 = naive_moe_attention(x64, *params64, ref_routing.experts_TK, ref_routing.weights_TK, H)
    grads64 = torch.autograd.grad((y64 * grad_y.double()).sum(), [x64, *params64, router64])

    torch.testing.assert_close(y.double(), y64.detach(), atol=FP32_ATOL, rtol=FP32_RTOL)
    for name, g, g64 in zip(["x", "w_q", "w_o", "kv_proj", "router"], grads, grads64):
        torch.testing.assert_close(g.double(), g64, atol=FP32_ATOL, rtol=FP32_RTOL, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize(
    "backend, table, E, B, S",
    with_backends([
        ([[2], [2]], 4, 2, 5),  # every token on expert 2; experts 0, 1, 3 get no rows
        ([[0, 3], [1, -1], [-1, 2]], 4, 3, 3),  # per-task experts, one dropped choice in two tasks
        ([[4, 0, 2], [1, 3, 4]], 5, 1, 7),  # K = 3, E prime, one sequence
    ], triton_rows={0, 1}),
    indirect=["backend"],
)
def test_task_router_matches_reference(backend, table, E, B, S) -> None:
    torch.manual_seed(len(table) * 10 + E)
    D, H = 8, 2
    router = TaskTableRouter(table, E)
    attn = MoEAttention(D, H, E, router)
    x = torch.randn(B, S, D, requires_grad=True)
    task_ids_T = torch.randint(0, len(table), (B * S,))
    y, routing = attn(x, RoutingContext(task_ids_T=task_ids_T))
    grad_y = torch.randn_like(y)
    params = [x, attn.w_q, attn.w_o, attn.kv_proj.weight, router.logits_XK]
    grads = torch.autograd.grad((y * grad_y).sum(), params)

    x64 = x.detach().double().requires_grad_()
    logits64 = router.logits_XK.detach().double().requires_grad_()
    params64 = double_params(attn)
    weights64 = router.weights(logits64, task_ids_T)
    y64 = naive_moe_attention(x64, *params64, router.table_XK[task_ids_T], weights64, H)
    grads64 = torch.autograd.grad((y64 * grad_y.double()).sum(), [x64, *params64, logits64])

    torch.testing.assert_close(y.double(), y64.detach(), atol=FP32_ATOL, rtol=FP32_RTOL)
    for name, g, g64 in zip(["x", "w_q", "w_o", "kv_proj", "router"], grads, grads64):
        torch.testing.assert_close(g.double(), g64, atol=FP32_ATOL, rtol=FP32_RTOL, msg=lambda m: f"d{name}: {m}")


def test_given_routing_is_used_as_is_and_router_skipped() -> None:
    torch.manual_seed(1)
    B, S, D, H, E = 2, 3, 8, 2, 3
    attn = make_attention(D, H, E, 2)
    calls = []
    attn.router.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(B, S, D)
    # A hand-made decision with a dropped choice: token 4 runs only expert 1.
    experts_TK = torch.tensor([[0, 1], [2, 0], [1, 2], [0, 2], [1, -1], [2, 1]])
    weights_TK = torch.rand(B * S, 2).masked_fill(experts_TK < 0, 0.0)
    given = Routing(weights_TK, experts_TK, torch.zeros(B * S, E), torch.tensor(0.5), {}, capacity=B * S)
    y, routing = attn(x, routing=given)
    assert routing is given and not calls
    params64 = double_params(attn)
    y64 = naive_moe_attention(x.double(), *params64, experts_TK, weights_TK.double(), H)
    torch.testing.assert_close(y.double(), y64.detach(), atol=FP32_ATOL, rtol=FP32_RTOL)


def test_padding_mask_routes_real_tokens_with_their_context_rows() -> None:
    """key_padding_mask_BS, B=3 S=4 with lengths 4, 1, 3: the router sees only the R = 8 real tokens and
    the matching rows of every ctx field (sequence ids feed a seq_switch balance loss here), each sequence
    equals the loop reference over its own real tokens (padding keys masked, query slots in the B*S
    layout), and padding positions output 0."""
    torch.manual_seed(5)
    B, S, D, H, E, K = 3, 4, 8, 2, 4, 2
    lengths = [4, 1, 3]
    router = TopKRouter(D, E, K, aux_loss_type="seq_switch", aux_loss_coef=0.01)
    with torch.no_grad():
        router.weight.normal_()
    attn = MoEAttention(D, H, E, router)
    x = torch.randn(B, S, D)
    mask_BS = torch.arange(S)[None] >= torch.tensor(lengths)[:, None]
    sequence_ids_T = torch.arange(B).repeat_interleave(S)
    y, routing = attn(x, RoutingContext(sequence_ids_T=sequence_ids_T), key_padding_mask_BS=mask_BS)

    real_T = ~mask_BS.reshape(-1)
    expected = router(x.reshape(B * S, D)[real_T], RoutingContext(sequence_ids_T=sequence_ids_T[real_T]))
    assert routing.experts_TK.equal(expected.experts_TK)
    torch.testing.assert_close(routing.aux_loss, expected.aux_loss)
    assert not y[mask_BS].any()
    params64 = double_params(attn)
    start = 0
    for b, n in enumerate(lengths):
        rows = slice(start, start + n)
        y64 = naive_moe_attention(
            x[b : b + 1, :n].double(), *params64, expected.experts_TK[rows], expected.weights_TK[rows].double(), H
        )
        torch.testing.assert_close(y[b, :n].double(), y64[0].detach(), atol=FP32_ATOL, rtol=FP32_RTOL)
        start += n


def test_aux_loss_travels_in_routing() -> None:
    torch.manual_seed(2)
    router = TopKRouter(8, 4, 2, aux_loss_coef=0.01, z_loss_coef=0.001)
    attn = MoEAttention(8, 2, 4, router)
    x = torch.randn(2, 5, 8)
    _, routing = attn(x)
    expected = router(x.view(10, 8)).aux_loss
    assert float(routing.aux_loss.detach()) > 0
    torch.testing.assert_close(routing.aux_loss, expected)


@pytest.mark.parametrize(
    "backend, use_autocast",
    [("torch", False), ("torch", True), ("triton", False)],
    indirect=["backend"],
)
def test_bf16_runs_close_to_fp32(backend, use_autocast) -> None:
    torch.manual_seed(3)
    attn = make_attention(16, 2, 4, 2)
    x = torch.randn(2, 5, 16)
    y32, routing32 = attn(x)
    if use_autocast:  # fp32 input and weights, bf16 compute: output back in x's dtype
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y16, routing16 = attn(x.requires_grad_())
        assert y16.dtype == torch.float32
    else:  # bf16 input, fp32 weights cast to bf16 inside
        y16, routing16 = attn(x.bfloat16().requires_grad_())
        assert y16.dtype == torch.bfloat16
    assert torch.equal(routing16.experts_TK, routing32.experts_TK)
    assert routing16.weights_TK.dtype == torch.float32
    scale = y32.abs().max()
    torch.testing.assert_close(y16.float() / scale, y32 / scale, atol=3e-2, rtol=0)
    y16.float().sum().backward()
    assert torch.isfinite(attn.w_q.grad).all() and torch.isfinite(attn.router.weight.grad).all()


def test_attention_dropout_only_in_training() -> None:
    torch.manual_seed(4)
    attn = make_attention(8, 2, 3, 2)
    attn_dropout = MoEAttention(8, 2, 3, attn.router, dropout=0.5)
    attn_dropout.load_state_dict(attn.state_dict())
    x = torch.randn(2, 6, 8)
    torch.testing.assert_close(attn_dropout.eval()(x)[0], attn(x)[0])
    assert not torch.allclose(attn_dropout.train()(x)[0], attn(x)[0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d_model=10, num_heads=3), r"num_heads = 3: must divide d_model = 10 when head_dim is not given"),
        (dict(num_experts=5), r"router.num_experts = 4: must equal num_experts = 5"),
        (dict(dropout=1.0), r"dropout = 1.0: must be in \[0, 1\)"),
        (dict(head_dim=0), r"head_dim = 0: must be >= 1"),
        (dict(num_heads=0), r"num_heads = 0: must be >= 1"),
    ],
)
def test_constructor_errors(kwargs, match) -> None:
    args = dict(d_model=8, num_heads=2, num_experts=4, router=TopKRouter(8, 4, 2)) | kwargs
    with pytest.raises(ValueError, match=match):
        MoEAttention(**args)


def test_forward_errors() -> None:
    attn = MoEAttention(8, 2, 4, TopKRouter(8, 4, 2))
    with pytest.raises(ValueError, match=r"x_BSD has shape \(6, 8\): expected \(B, S, 8\)"):
        attn(torch.randn(6, 8))
    wrong = TopKRouter(8, 4, 2)(torch.randn(5, 8))
    match = r"routing for 5 tokens over 4 experts given to an MoEAttention of 4 experts with 6 tokens"
    with pytest.raises(ValueError, match=match):
        attn(torch.randn(2, 3, 8), routing=wrong)
    with pytest.raises(ValueError, match=r"TaskTableRouter needs RoutingContext.task_ids_T"):
        MoEAttention(8, 2, 4, TaskTableRouter([[0]], 4))(torch.randn(1, 2, 8))


# ---------------------------------------------------------------------------------------------
# TaskMoEBlock
# ---------------------------------------------------------------------------------------------


class DenseAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.mha = nn.MultiheadAttention(d_model, num_heads, bias=False, batch_first=True)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return self.mha(x_BSD, x_BSD, x_BSD, need_weights=False)[0]


class Zero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


D, H, F_HIDDEN = 8, 2, 12


def moe_parts(E: int = 4, K: int = 2, E_ffn: int | None = None) -> tuple[MoEAttention, MoELayer]:
    attn = MoEAttention(D, H, E, TopKRouter(D, E, K, aux_loss_coef=0.01))
    E_ffn = E if E_ffn is None else E_ffn
    ffn = MoELayer(TopKRouter(D, E_ffn, K, aux_loss_coef=0.02), GroupedExperts(E_ffn, D, F_HIDDEN))
    return attn, ffn


def test_shared_routing_is_the_attentions() -> None:
    torch.manual_seed(5)
    attn, ffn = moe_parts()
    block = TaskMoEBlock(D, H, attn=attn, ffn=ffn, share_routing=True)
    ffn_outputs, ffn_router_calls = [], []
    ffn.register_forward_hook(lambda mod, args, out: ffn_outputs.append(out))
    ffn.router.register_forward_hook(lambda *args: ffn_router_calls.append(1))
    x = torch.randn(2, 5, D, requires_grad=True)
    out = block(x)

    (routing,) = out.routings
    assert ffn_outputs[0].routing is routing and not ffn_router_calls
    assert torch.equal(ffn_outputs[0].routing.experts_TK, routing.experts_TK)
    assert float(routing.aux_loss.detach()) > 0
    torch.testing.assert_close(out.aux_loss, routing.aux_loss)  # counted once
    # The block is exactly the composition of its parts with the attention's routing in the FFN.
    h, r = attn(block.norm_attn(x))
    x1 = x + h
    expected = x1 + ffn(block.norm_ffn(x1), routing=r).y
    torch.testing.assert_close(out.x, expected)

    (out.x.square().sum() + out.aux_loss).backward()
    assert ffn.router.weight.grad is None
    assert attn.router.weight.grad is not None and attn.router.weight.grad.abs().sum() > 0
    assert ffn.experts.w_in.grad is not None and x.grad is not None


def test_shared_routing_carries_the_ffn_gradient_to_the_attention_router() -> None:
    # Same parameters, sharing on and off: only with sharing does the FFN's combine depend on the
    # attention router, so its gradient differs; without sharing the FFN's own router gets one.
    torch.manual_seed(6)
    attn, ffn = moe_parts()
    x = torch.randn(2, 5, D)
    grads = {}
    for share in (True, False):
        block = TaskMoEBlock(D, H, attn=attn, ffn=ffn, share_routing=share)
        block.zero_grad(set_to_none=True)
        out = block(x)
        out.x.square().sum().backward()
        grads[share] = attn.router.weight.grad.clone()
        if not share:
            assert ffn.router.weight.grad is not None and ffn.router.weight.grad.abs().sum() > 0
            assert len(out.routings) == 2 and out.routings[1] is not out.routings[0]
            torch.testing.assert_close(out.aux_loss, out.routings[0].aux_loss + out.routings[1].aux_loss)
    assert not torch.allclose(grads[True], grads[False])


@pytest.mark.parametrize(
    "parts, match",
    [
        (lambda: (DenseAttention(D, H), moe_parts()[1]),
         r"share_routing = True: attn must be an MoEAttention, got DenseAttention"),
        (lambda: (moe_parts()[0], MLP(D, F_HIDDEN)), r"share_routing = True: ffn must be an MoELayer, got MLP"),
        (lambda: moe_parts(E=4, E_ffn=3), r"share_routing = True: attn has num_experts = 4 but ffn has 3"),
    ],
)
def test_share_routing_errors(parts, match) -> None:
    attn, ffn = parts()
    with pytest.raises(ValueError, match=match):
        TaskMoEBlock(D, H, attn=attn, ffn=ffn, share_routing=True)


def test_block_constructor_errors() -> None:
    attn, ffn = moe_parts()
    with pytest.raises(ValueError, match=r"num_heads = 4: attn has num_heads = 2; they must match"):
        TaskMoEBlock(D, 4, attn=attn, ffn=ffn)
    with pytest.raises(ValueError, match=r"task_embed.embedding_dim = 6: must equal d_model = 8"):
        TaskMoEBlock(D, H, attn=attn, ffn=ffn, task_embed=nn.Embedding(3, 6))
    with pytest.raises(ValueError, match=r"dropout = -0.1: must be in \[0, 1\)"):
        TaskMoEBlock(D, H, attn=attn, ffn=ffn, dropout=-0.1)


def test_task_embedding_added_per_task() -> None:
    torch.manual_seed(7)
    embed = nn.Embedding(3, D)
    block = TaskMoEBlock(D, H, attn=Zero(), ffn=Zero(), task_embed=embed)
    x = torch.randn(2, 4, D)
    task_ids_T = torch.tensor([0, 0, 0, 0, 2, 2, 1, 1])  # tasks may differ within a sequence
    out = block(x, RoutingContext(task_ids_T=task_ids_T))
    torch.testing.assert_close(out.x, x + embed.weight[task_ids_T].view(2, 4, D))
    assert out.routings == () and out.aux_loss.dtype == torch.float32 and float(out.aux_loss) == 0.0
    out.x.sum().backward()
    assert embed.weight.grad[1].abs().sum() > 0 and embed.weight.grad[2].abs().sum() > 0
    with pytest.raises(ValueError, match=r"TaskMoEBlock.task_embed needs RoutingContext.task_ids_T"):
        block(x)
    with pytest.raises(ValueError, match=r"TaskMoEBlock.task_embed: task_ids_T has values in \[0, 3\]"):
        block(x, RoutingContext(task_ids_T=torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])))


def test_task_embedding_reaches_a_task_router() -> None:
    # Mod-Squad's layout: task embedding, MoE attention routed by task, MoE FFN routed by task.
    torch.manual_seed(8)
    E = 4
    attn = MoEAttention(D, H, E, TaskTableRouter([[0, 1], [2, 3]], E))
    ffn = MoELayer(TaskTableRouter([[1, 2], [3, 0]], E), GroupedExperts(E, D, F_HIDDEN))
    block = TaskMoEBlock(D, H, attn=attn, ffn=ffn, task_embed=nn.Embedding(2, D))
    task_ids_T = torch.tensor([0, 1, 1, 0, 1, 0])
    out = block(torch.randn(2, 3, D), RoutingContext(task_ids_T=task_ids_T))
    assert len(out.routings) == 2
    assert torch.equal(out.routings[0].experts_TK, attn.router.table_XK[task_ids_T])
    assert torch.equal(out.routings[1].experts_TK, ffn.router.table_XK[task_ids_T])


def test_mixed_dense_and_moe_parts() -> None:
    torch.manual_seed(9)
    attn, ffn = moe_parts()
    x = torch.randn(2, 3, D)
    moe_attn_only = TaskMoEBlock(D, H, attn=attn, ffn=MLP(D, F_HIDDEN))
    out = moe_attn_only(x)
    assert len(out.routings) == 1 and out.routings[0].num_experts == 4
    torch.testing.assert_close(out.aux_loss, out.routings[0].aux_loss)
    moe_ffn_only = TaskMoEBlock(D, H, attn=DenseAttention(D, H), ffn=ffn)
    out = moe_ffn_only(x)
    assert len(out.routings) == 1
    torch.testing.assert_close(out.aux_loss, out.routings[0].aux_loss)
    assert out.x.shape == x.shape


def test_block_dropout_only_in_training() -> None:
    torch.manual_seed(10)
    attn, ffn = moe_parts()
    block = TaskMoEBlock(D, H, attn=attn, ffn=ffn, dropout=0.5, share_routing=True)
    x = torch.randn(2, 3, D)
    plain = TaskMoEBlock(D, H, attn=attn, ffn=ffn, share_routing=True)
    plain.load_state_dict(block.state_dict())
    torch.testing.assert_close(block.eval()(x).x, plain(x).x)
    assert not torch.allclose(block.train()(x).x, plain(x).x)


def test_sdpa_grouping_matches_repeated_heads() -> None:
    # The layout MoEAttention relies on: with enable_gqa, query head i reads key/value head
    # i // (query heads / kv heads), as if the kv heads were repeat_interleave'd.
    torch.manual_seed(11)
    q, k, v = torch.randn(2, 6, 5, 4), torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    torch.testing.assert_close(
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)),
    )


def test_mod_squad_model_adds_a_task_embedding_before_every_block() -> None:
    """model.block_task_embed: each block of the multi-task model adds its own embedding of the
    token's task; a task's row in one block moves that task's features only, and the embeddings are
    task parameters (never frozen) that get gradients."""
    from moe_engine.config import ModelConfig, MoEConfig, RouterConfig
    from moe_engine.mtl.model import MultiTaskTransformer
    from moe_engine.mtl.tasks import TaskSpec
    from moe_engine.workloads.classifier import ClassifierWorkload

    torch.manual_seed(10)
    tasks = [TaskSpec(f"task{i}", 3, 0.5, "a test task") for i in range(3)]
    model_cfg = ModelConfig(d_model=D, num_layers=2, num_heads=H, ffn_hidden=16, dropout=0.0, block_task_embed=True)
    moe_cfg = MoEConfig(num_experts=4, ffn_hidden=12, router=RouterConfig(type="mod_squad"))
    model = MultiTaskTransformer(model_cfg, moe_cfg, tasks, (8, 12)).eval()
    embeds = [block.task_embed for block in model.blocks]
    assert all(isinstance(e, nn.Embedding) and e.weight.shape == (3, D) for e in embeds)
    images, task_ids = torch.rand(6, 8, 12), torch.tensor([0, 1, 2, 0, 1, 2])
    before = model(images, task_ids).features_BD
    with torch.no_grad():
        embeds[1].weight[1] += torch.randn(D)  # not a constant: LayerNorm would remove that
    after = model(images, task_ids).features_BD
    moved = (after - before).abs().amax(-1) > 1e-4
    assert moved.tolist() == [False, True, False, False, True, False]
    (after * torch.randn_like(after)).sum().backward()  # not .sum(): a LayerNorm output sums to a constant
    assert all(e.weight.grad.abs().sum() > 0 for e in embeds)
    owned = {id(p) for p in ClassifierWorkload.task_parameters(None, model)}
    assert all(id(e.weight) in owned for e in embeds)
    plain = MultiTaskTransformer(dataclasses.replace(model_cfg, block_task_embed=False), moe_cfg, tasks, (8, 12))
    assert all(block.task_embed is None for block in plain.blocks)
