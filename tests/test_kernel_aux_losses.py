"""Tests of the load-balancing loss kernels (moe_engine.kernels.aux_losses).

Each Triton loss (under Triton's interpreter on CPU) is compared with its torch reference, value
and gradient, at the edge cases of its kernel; a few values are checked by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from moe_engine.kernels.cv_squared import (
    cv_squared_reference,
    importance_cv_squared,
    importance_cv_squared_reference,
    load_cv_squared,
    load_cv_squared_reference,
)
from moe_engine.kernels.aux_losses import (
    balance_loss_triton,
    router_z_loss,
    router_z_loss_reference,
    sequence_load_balancing_loss,
    sequence_load_balancing_loss_reference,
    switch_load_balancing_loss,
    switch_load_balancing_loss_reference,
)
from moe_engine.routing import losses as routing_losses

DTYPES = [(torch.float32, 1e-6, 1e-5), (torch.bfloat16, 1e-5, 8e-3)]


def value_and_grad(fn, x: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    loss = fn(x, *args)
    (grad,) = torch.autograd.grad(3.0 * loss, x)  # an upstream gradient other than 1
    return loss.detach(), grad


def assert_matches(fused_fn, reference_fn, x, *args, atol, rtol, monkeypatch, dtype):
    monkeypatch.setenv("MOE_ENGINE_KERNELS", "triton")
    loss, grad = value_and_grad(fused_fn, x, *args)
    expected_loss, expected_grad = value_and_grad(reference_fn, x, *args)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=1e-5)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad, expected_grad, atol=atol, rtol=rtol)


def random_probs(num_tokens: int, num_experts: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, num_experts, generator=generator).softmax(-1).to(dtype)


def random_choices(num_tokens: int, num_experts: int, top_k: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(num_tokens)]
    return torch.stack(rows) if rows else torch.zeros(0, top_k, dtype=torch.int64)


# (T, E, K, case), each row an edge case of the balance kernels.
BALANCE_CASES = [
    (16, 8, 2, "random"),  # T = BLOCK_T of the first (interpreter) config
    (1, 4, 2, "random"),  # T = 1
    (37, 7, 3, "random"),  # prime E, several token blocks with a tail, E < BLOCK_E
    (9, 7, 7, "random"),  # K = E
    (20, 70, 8, "random"),  # E = 70 > BLOCK_E: several expert blocks
    (13, 5, 2, "one_expert"),  # every first choice on expert 2; experts 3 and 4 get no tokens
    (17, 6, 3, "dropped"),  # capacity drops: choices of -1 are not counted
]


def balance_inputs(num_tokens, num_experts, top_k, case, dtype):
    probs_TE = random_probs(num_tokens, num_experts, dtype)
    experts_TK = random_choices(num_tokens, num_experts, top_k)
    if case == "one_expert":
        experts_TK = torch.tensor([[2, 0], [2, 1]]).repeat(num_tokens, 1)[:num_tokens]
    elif case == "dropped":
        dropped_TK = torch.rand(num_tokens, top_k, generator=torch.Generator().manual_seed(1)) < 0.3
        experts_TK = experts_TK.masked_fill(dropped_TK, -1)
        assert (experts_TK < 0).any()
    return probs_TE, experts_TK


# ---------------------------------------------------------------------------------------------
# Switch and sequence-level losses
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("num_tokens, num_experts, top_k, case", BALANCE_CASES)
def test_switch_loss_matches_reference(num_tokens, num_experts, top_k, case, dtype, atol, rtol, monkeypatch):
    probs_TE, experts_TK = balance_inputs(num_tokens, num_experts, top_k, case, dtype)
    assert_matches(switch_load_balancing_loss, switch_load_balancing_loss_reference, probs_TE, experts_TK,
                   atol=atol, rtol=rtol, monkeypatch=monkeypatch, dtype=dtype)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("num_tokens, num_experts, top_k, case", BALANCE_CASES)
def test_sequence_loss_matches_reference(num_tokens, num_experts, top_k, case, dtype, atol, rtol, monkeypatch):
    probs_TE, experts_TK = balance_inputs(num_tokens, num_experts, top_k, case, dtype)
    # Unsorted ids over 4 sequences, sequence 2 without tokens: mixed blocks add per element.
    sequence_ids_T = torch.randint(0, 4, (num_tokens,), generator=torch.Generator().manual_seed(2))
    sequence_ids_T[sequence_ids_T == 2] = 3
    assert_matches(sequence_load_balancing_loss, sequence_load_balancing_loss_reference, probs_TE, experts_TK,
                   sequence_ids_T, atol=atol, rtol=rtol, monkeypatch=monkeypatch, dtype=dtype)


@pytest.mark.parametrize("config", [{"BLOCK_T": 4, "BLOCK_E": 4, "num_warps": 4}, {"BLOCK_T": 64, "BLOCK_E": 128}])
def test_sequence_loss_packed_sequences(config):
    # Sorted (packed) ids: blocks inside one sequence reduce first, blocks across a boundary add
    # per element. num_sequences given: no sync, and trailing sequences without tokens do not count.
    probs_TE, experts_TK = balance_inputs(30, 7, 2, "random", torch.float32)
    sequence_ids_T = torch.repeat_interleave(torch.arange(4), torch.tensor([9, 3, 13, 5]))
    loss, counts_SE, coef_S = balance_loss_triton(probs_TE, experts_TK, sequence_ids_T, 6, config=config)
    expected = sequence_load_balancing_loss_reference(probs_TE, experts_TK, sequence_ids_T, 6)
    torch.testing.assert_close(loss, expected)
    assert counts_SE.sum(-1).tolist() == [18, 6, 26, 10, 0, 0]
    assert coef_S[4:].tolist() == [0.0, 0.0]
    torch.testing.assert_close(expected, sequence_load_balancing_loss_reference(probs_TE, experts_TK, sequence_ids_T))


@pytest.mark.parametrize("config", [{"BLOCK_T": 16, "BLOCK_E": 32, "num_warps": 4}, {"BLOCK_T": 4, "BLOCK_E": 4, "num_warps": 4}],
                         ids=["first", "small_blocks"])
def test_sequence_ids_outside_the_range_touch_nothing(config):
    """Tokens whose sequence id is outside [0, S) (-1 padding, or an id >= S) are skipped: the statistics
    kernel writes nothing outside its (S, E) and (S,) buffers (here views into guarded ones, so a stray
    atomic add shows), the loss is the reference's on the other tokens, and their gradient is 0.
    Blocks of one out-of-range sequence, and blocks mixing it with valid ones."""
    from moe_engine.kernels._triton import launch
    from moe_engine.kernels.aux_losses import _balance_stats_kernel, _tile_grid, balance_loss_backward_triton

    T, E, K, S, pad = 24, 6, 2, 2, 64
    probs_TE, experts_TK = balance_inputs(T, E, K, "random", torch.float32)
    seq_T = torch.tensor([2] * 4 + [0] * 5 + [-1] * 3 + [1] * 4 + [3] * 4 + [0, 2, 1, -1])
    kept = (seq_T >= 0) & (seq_T < S)
    guarded = [torch.zeros(2 * pad + S * E, dtype=torch.int32), torch.zeros(2 * pad + S * E),
               torch.zeros(2 * pad + S, dtype=torch.int32)]
    counts, prob_sums, tokens = (g[pad:-pad] for g in guarded)
    launch(_balance_stats_kernel, _tile_grid(T, E), config, probs_TE, experts_TK, seq_T, counts, prob_sums, tokens,
           T, E, S, K, probs_TE.stride(0), HAS_SEQ=True)
    for g in guarded:
        assert not g[:pad].any() and not g[-pad:].any()
    assert tokens.tolist() == torch.bincount(seq_T[kept], minlength=S).tolist()
    flat = (seq_T[:, None] * E + experts_TK)[kept]
    assert counts.tolist() == torch.bincount(flat.reshape(-1), minlength=S * E).tolist()

    loss, counts_SE, coef_S = balance_loss_triton(probs_TE, experts_TK, seq_T, S, config=config)
    torch.testing.assert_close(loss, sequence_load_balancing_loss_reference(probs_TE[kept], experts_TK[kept], seq_T[kept], S))
    grad_TE = balance_loss_backward_triton(torch.tensor(1.0), seq_T, counts_SE, coef_S, T, torch.float32)
    assert not grad_TE[~kept].any() and grad_TE[kept].any()


def test_balance_losses_by_hand(monkeypatch):
    # probs [3/4, 1/4] x3 and [1/4, 3/4] for token 2; choices 0, 0, 1, 0 -> f = [3/4, 1/4],
    # P = [5/8, 3/8]: Switch = 2 (3/4 5/8 + 1/4 3/8) = 1.125. Sequences {0, 1}, {2, 3}: 1.5 and 1.0 -> 1.25.
    monkeypatch.setenv("MOE_ENGINE_KERNELS", "triton")
    probs_TE = torch.tensor([[0.75, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.25]])
    experts_TK = torch.tensor([[0], [0], [1], [0]])
    torch.testing.assert_close(switch_load_balancing_loss(probs_TE, experts_TK), torch.tensor(1.125))
    torch.testing.assert_close(sequence_load_balancing_loss(probs_TE, experts_TK, torch.tensor([0, 0, 1, 1])),
                               torch.tensor(1.25))
    # Uniform probabilities give 1 whatever the choices; everything on one expert gives E.
    torch.testing.assert_close(switch_load_balancing_loss(torch.full((6, 5), 0.2), random_choices(6, 5, 2)),
                               torch.tensor(1.0))
    one_hot_TE = torch.nn.functional.one_hot(torch.full((6,), 3), 5).float()
    torch.testing.assert_close(switch_load_balancing_loss(one_hot_TE, torch.full((6, 1), 3)), torch.tensor(5.0))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_losses_of_no_tokens_are_zero(backend, monkeypatch):
    monkeypatch.setenv("MOE_ENGINE_KERNELS", backend)
    empty_TE, empty_TK = torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.int64)
    assert switch_load_balancing_loss(empty_TE, empty_TK).item() == 0.0
    assert sequence_load_balancing_loss(empty_TE, empty_TK, torch.zeros(0, dtype=torch.int64)).item() == 0.0
    assert router_z_loss(empty_TE).item() == 0.0
    assert importance_cv_squared(empty_TE).item() == 0.0


def test_routing_losses_reexport_the_kernels():
    # moe_engine.routing keeps its names; the switch loss from topk_gating's statistics agrees.
    assert routing_losses.switch_load_balancing_loss is switch_load_balancing_loss
    probs_TE, experts_TK = balance_inputs(37, 7, 3, "random", torch.float32)
    counts_E = torch.bincount(experts_TK.flatten(), minlength=7)
    torch.testing.assert_close(routing_losses.switch_loss_from_stats(counts_E, probs_TE.sum(0), 37, 3),
                               switch_load_balancing_loss_reference(probs_TE, experts_TK))


# ---------------------------------------------------------------------------------------------
# z-loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize(
    "num_tokens, num_experts, scale",
    [
        (16, 8, 3.0),  # typical
        (1, 8, 3.0),  # T = 1
        (37, 7, 3.0),  # prime E, several token blocks with a tail
        (9, 70, 3.0),  # E > BLOCK_E: the online logsumexp across expert chunks
        (5, 6, 1e3),  # huge logits: no overflow (lse ~ 1e3)
    ],
)
def test_z_loss_matches_reference(num_tokens, num_experts, scale, dtype, atol, rtol, monkeypatch):
    logits_TE = (scale * torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(3))).to(dtype)
    if scale > 100:
        atol, rtol = atol * scale, rtol  # gradients scale with lse
    assert_matches(router_z_loss, router_z_loss_reference, logits_TE, atol=atol, rtol=rtol, monkeypatch=monkeypatch,
                   dtype=dtype)


def test_z_loss_by_hand(monkeypatch):
    monkeypatch.setenv("MOE_ENGINE_KERNELS", "triton")
    torch.testing.assert_close(router_z_loss(torch.zeros(3, 6)), torch.tensor(math.log(6.0) ** 2))


# ---------------------------------------------------------------------------------------------
# Importance and load CV^2
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize(
    "num_tokens, num_experts",
    [
        (16, 8),  # typical
        (1, 4),  # T = 1
        (37, 7),  # prime E, several token blocks with a tail
        (9, 70),  # E > BLOCK_E: several expert blocks
        (5, 1),  # E = 1: variance 0
    ],
)
def test_importance_matches_reference(num_tokens, num_experts, dtype, atol, rtol, monkeypatch):
    # Sparse gates like noisy top-2's (zeros outside the top 2), so importance is uneven.
    gates_TE = random_probs(num_tokens, num_experts, torch.float32, seed=4)
    top_TK = gates_TE.topk(min(2, num_experts), dim=-1)
    gates_TE = torch.zeros_like(gates_TE).scatter(1, top_TK.indices, top_TK.values.softmax(-1)).to(dtype)
    assert_matches(importance_cv_squared, importance_cv_squared_reference, gates_TE, atol=atol, rtol=rtol,
                   monkeypatch=monkeypatch, dtype=dtype)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize(
    "num_experts, kind",
    [
        (7, "random"),  # prime E < BLOCK_E
        (700, "random"),  # E > BLOCK_E: chunked mean, variance and gradient
        (4, "zeros"),  # mean 0: 0 / eps = 0, gradient 0
        (1, "random"),  # E = 1
    ],
)
def test_load_cv_squared_matches_reference(num_experts, kind, dtype, atol, rtol, monkeypatch):
    load_E = torch.rand(num_experts, generator=torch.Generator().manual_seed(5)) * 10
    if kind == "zeros":
        load_E = torch.zeros(num_experts)
    assert_matches(load_cv_squared, load_cv_squared_reference, load_E.to(dtype), atol=atol, rtol=rtol,
                   monkeypatch=monkeypatch, dtype=dtype)


def test_cv_squared_by_hand(monkeypatch):
    # x = [1, 3]: mean 2, biased variance 1 -> 1/4 (the unbiased variance would give 1/2).
    monkeypatch.setenv("MOE_ENGINE_KERNELS", "triton")
    torch.testing.assert_close(load_cv_squared(torch.tensor([1.0, 3.0])), torch.tensor(0.25))
    torch.testing.assert_close(cv_squared_reference(torch.tensor([1.0, 3.0])), torch.tensor(0.25))
    # Balanced importance: 0.
    assert importance_cv_squared(torch.full((4, 5), 0.2)).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    "fused, reference, needs",
    [
        (switch_load_balancing_loss, switch_load_balancing_loss_reference, "experts"),
        (sequence_load_balancing_loss, sequence_load_balancing_loss_reference, "sequences"),
        (router_z_loss, router_z_loss_reference, ""),
        (importance_cv_squared, importance_cv_squared_reference, ""),
    ],
    ids=["switch", "sequence", "z_loss", "importance"],
)
def test_column_slices_of_a_wider_tensor(fused, reference, needs, monkeypatch):
    """probs / logits / gates as a column slice of a wider tensor (unit column stride, row stride > E, so
    the launchers keep the view): the kernels step rows by the tensor's stride, not by E. Value and
    gradient, which lands in the slice's columns of the wide tensor only."""
    monkeypatch.setenv("MOE_ENGINE_KERNELS", "triton")
    T, E = 21, 5
    wide = random_probs(T, E + 4, torch.float32, seed=7)
    experts_TK = random_choices(T, E, 2, seed=7)
    args = {"experts": (experts_TK,), "sequences": (experts_TK, torch.arange(T) % 3)}.get(needs, ())
    results = []
    for fn in (fused, reference):
        leaf = wide.clone().requires_grad_()
        x_TE = leaf[:, 1:1 + E]
        assert x_TE.stride() == (E + 4, 1)
        loss = fn(x_TE, *args)
        results.append((loss.detach(), torch.autograd.grad(3.0 * loss, leaf)[0]))
    (loss, grad), (expected_loss, expected_grad) = results
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(grad, expected_grad)


def test_second_outputs_of_the_loss_ops_are_differentiable():
    """moe_engine::router_z_loss returns (loss, lse_T) and moe_engine::importance_cv_squared (loss,
    importance_E); a gradient through the second output (d lse / d x = softmax(x), d importance / d gates
    = 1) adds to the loss's."""
    generator = torch.Generator().manual_seed(8)
    logits_TE = torch.randn(7, 10, generator=generator)
    gates_TE = torch.rand(7, 10, generator=generator)
    weights_T, weights_E = torch.linspace(-1.0, 2.0, 7), torch.linspace(0.5, -1.5, 10)
    ops = torch.ops.moe_engine

    x = logits_TE.clone().requires_grad_()
    loss, lse_T = ops.router_z_loss(x)
    (grad,) = torch.autograd.grad(2.0 * loss + (weights_T * lse_T).sum(), x)
    x_ref = logits_TE.clone().requires_grad_()
    lse_ref = torch.logsumexp(x_ref, dim=-1)
    (expected,) = torch.autograd.grad(2.0 * lse_ref.square().mean() + (weights_T * lse_ref).sum(), x_ref)
    torch.testing.assert_close(lse_T, lse_ref.detach())
    torch.testing.assert_close(grad, expected)

    g = gates_TE.clone().requires_grad_()
    loss, importance_E = ops.importance_cv_squared(g)
    (grad,) = torch.autograd.grad(2.0 * loss + (weights_E * importance_E).sum(), g)
    g_ref = gates_TE.clone().requires_grad_()
    importance_ref = g_ref.sum(0)
    (expected,) = torch.autograd.grad(2.0 * cv_squared_reference(importance_ref) + (weights_E * importance_ref).sum(), g_ref)
    torch.testing.assert_close(importance_E, importance_ref.detach())
    torch.testing.assert_close(grad, expected)


def test_reference_gradients_pass_gradcheck():
    generator = torch.Generator().manual_seed(6)
    probs_TE = torch.rand(6, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    experts_TK = random_choices(6, 4, 2)
    seq_T = torch.tensor([0, 0, 1, 1, 1, 3])
    assert torch.autograd.gradcheck(lambda p: switch_load_balancing_loss_reference(p, experts_TK), (probs_TE,))
    assert torch.autograd.gradcheck(lambda p: sequence_load_balancing_loss_reference(p, experts_TK, seq_T), (probs_TE,))
    assert torch.autograd.gradcheck(router_z_loss_reference, (probs_TE,))
    assert torch.autograd.gradcheck(importance_cv_squared_reference, (probs_TE,))


# ---------------------------------------------------------------------------------------------
# Custom ops
# ---------------------------------------------------------------------------------------------


def test_opcheck_balance_loss():
    probs_TE, experts_TK = balance_inputs(9, 5, 2, "dropped", torch.float32)
    probs_TE.requires_grad_()
    torch.library.opcheck(torch.ops.moe_engine.balance_loss.default, (probs_TE, experts_TK, None, 1))
    seq_T = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1])
    torch.library.opcheck(torch.ops.moe_engine.balance_loss.default, (probs_TE, experts_TK, seq_T, 3))
    counts_SE = torch.randint(0, 3, (3, 5), dtype=torch.int32)
    torch.library.opcheck(torch.ops.moe_engine.balance_loss_backward.default,
                          (torch.tensor(2.0), seq_T, counts_SE, torch.rand(3), 9, torch.float32))


def test_opcheck_z_loss():
    logits_TE = torch.randn(5, 6, requires_grad=True)
    torch.library.opcheck(torch.ops.moe_engine.router_z_loss.default, (logits_TE,))
    lse_T = torch.logsumexp(logits_TE.detach(), -1)
    torch.library.opcheck(torch.ops.moe_engine.router_z_loss_backward.default,
                          (torch.tensor(2.0), logits_TE.detach(), lse_T))


def test_opcheck_cv_squared():
    torch.library.opcheck(torch.ops.moe_engine.cv_squared.default, (torch.rand(6, requires_grad=True),))
    torch.library.opcheck(torch.ops.moe_engine.cv_squared_backward.default, (torch.rand(6), torch.tensor(2.0)))
    torch.library.opcheck(torch.ops.moe_engine.importance_cv_squared.default, (torch.rand(5, 6, requires_grad=True),))


def test_compiles_through_the_custom_ops(monkeypatch):
    monkeypatch.setenv("MOE_ENGINE_KERNELS", "triton")
    probs_TE, experts_TK = balance_inputs(9, 5, 2, "random", torch.float32)
    probs_TE.requires_grad_()

    def loss_fn(p):
        return switch_load_balancing_loss(p, experts_TK) + router_z_loss(p) + importance_cv_squared(p)

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    (grad,) = torch.autograd.grad(compiled(probs_TE), probs_TE)
    (expected,) = torch.autograd.grad(loss_fn(probs_TE), probs_TE)
    torch.testing.assert_close(grad, expected)
