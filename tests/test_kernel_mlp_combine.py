"""Tests of the expert MLP fused with the weighted combine (moe_engine/kernels/mlp_combine.py).

The Triton op against the composition of the torch references (grouped MLP loop, then
`unpermute_reference`): the forward and the gradients of x, w_in, w_out and the routing weights,
whose gradient the op takes from its backward GEMM instead of from saved expert outputs. And
what it saves for the backward: no (N, D) tensor. Under the interpreter (tests/conftest.py) the
tiles are 64 x 64 x 32, so F = 72 spans two N-tiles and two partial-sum slots.
"""

from __future__ import annotations

import pytest
import torch

from moe_engine.kernels.grouped_gemm import SCORE_SLOT, score_slots
from moe_engine.kernels.mlp_combine import (
    grouped_mlp_combine,
    grouped_mlp_combine_reference,
    grouped_mlp_combine_triton,
    grouped_mlp_scored_reference,
    grouped_mlp_scored_triton,
)
from moe_engine.kernels.expert_order import expert_order_reference
from moe_engine.kernels.permute import unpermute
from moe_engine.kernels.grouped_mlp import grouped_mlp_triton

from test_kernel_grouped_gemm import DTYPE_TOLERANCES, assert_close

@pytest.fixture(autouse=True)
def _triton_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    # The public `unpermute` of the composed comparisons runs its Triton op too.
    monkeypatch.setenv("MOE_ENGINE_KERNELS", "triton")


# (T, D, F, E, K, routing): "random" distinct experts per token, "one" every token on expert E - 1,
# "drop" random with a third of the choices dropped (id -1), as capacity drops them.
CASES = [
    (7, 16, 72, 5, 2, "random"),  # F > 64: two N-tiles and two score slots per row
    (1, 16, 8, 3, 2, "random"),  # T = 1, experts with no rows
    (6, 13, 24, 7, 7, "random"),  # K = E (prime), odd D
    (9, 16, 8, 4, 1, "one"),  # every token on one expert, the others empty
    (8, 16, 16, 4, 3, "drop"),  # dropped choices: their weight gradient is 0
]


def make_routing(T: int, E: int, K: int, kind: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(experts_TK int64 with -1 for dropped choices, weights_TK float32 in (0, 1))."""
    experts_TK = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    if kind == "one":
        experts_TK[:, 0] = E - 1
    if kind == "drop":
        experts_TK[torch.rand(T, K, generator=gen) < 1 / 3] = -1
    return experts_TK, torch.rand(T, K, generator=gen) + 0.1


def make_inputs(T, D, F, E, K, kind, activation, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    experts_TK, weights_TK = make_routing(T, E, K, kind, gen)
    choice_N, tokens_E = expert_order_reference(experts_TK, E)
    width_in = 2 * F if activation == "swiglu" else F
    x = torch.randn(T, D, generator=gen).to(dtype)
    w_in = (torch.randn(E, width_in, D, generator=gen) * D**-0.5).to(dtype)
    w_out = (torch.randn(E, D, F, generator=gen) * F**-0.5).to(dtype)
    return x, w_in, w_out, tokens_E, choice_N, weights_TK


@pytest.mark.parametrize("dtype, ref_dtype, atol, rtol", DTYPE_TOLERANCES)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("T, D, F, E, K, kind", CASES)
def test_fused_combine_matches_the_composed_references(T, D, F, E, K, kind, activation, dtype, ref_dtype, atol, rtol):
    x, w_in, w_out, tokens_E, choice_N, weights_TK = make_inputs(T, D, F, E, K, kind, activation, dtype)
    leaves = [t.clone().requires_grad_() for t in (x, w_in, w_out, weights_TK)]
    y = grouped_mlp_combine_triton(leaves[0], leaves[1], leaves[2], tokens_E, activation, choice_N, leaves[3])
    assert y.shape == (T, D) and y.dtype == dtype
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    got = [y, *torch.autograd.grad((y * grad_y.to(dtype)).sum(), leaves)]

    ref_leaves = [t.detach().to(ref_dtype).requires_grad_() for t in (x, w_in, w_out)]
    ref_weights = weights_TK.to(torch.float64 if ref_dtype == torch.float64 else torch.float32).requires_grad_()
    y_ref = grouped_mlp_combine_reference(*ref_leaves, tokens_E, activation, choice_N, ref_weights)
    expected = [y_ref, *torch.autograd.grad((y_ref * grad_y.to(ref_dtype)).sum(), [*ref_leaves, ref_weights])]
    for what, a, b in zip(("y", "dx", "dw_in", "dw_out", "dweights"), got, expected):
        if what == "dweights":  # float32 like the weights; its bf16 error is the GEMM's, scaled the same way
            tol = atol * max(1.0, b.abs().max().item()) if dtype == torch.bfloat16 else atol
            torch.testing.assert_close(a.to(b.dtype), b.detach(), atol=tol, rtol=rtol, msg=lambda m: f"dweights: {m}")
        else:
            assert_close(a, b.detach(), atol, rtol, what)
    if kind == "drop":
        dropped = torch.ones(T * K, dtype=torch.bool)
        dropped[choice_N] = False
        assert dropped.any() and torch.all(got[4].reshape(-1)[dropped] == 0)


# (rows per expert, D, F, gathered): the scored MLP of expert parallelism runs on received rows (no gather);
# the gather is covered too. Empty experts, N = 1, F > 64 (two score slots), prime E, all rows on one expert.
SCORED_SHAPES = [
    ([3, 0, 5, 3], 16, 72, False),
    ([0, 1, 0], 16, 8, False),
    ([2, 0, 3, 1, 0, 4, 1], 13, 24, True),
    ([0, 0, 70, 0], 24, 13, False),
]


# fp32 on every shape; bf16 on the first (bf16 changes the arithmetic, not the indexing the shapes probe).
SCORED_ROWS = [(*shape, *DTYPE_TOLERANCES[0]) for shape in SCORED_SHAPES] + [(*SCORED_SHAPES[0], *DTYPE_TOLERANCES[1])]


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("tokens_per_expert, D, F, gathered, dtype, ref_dtype, atol, rtol", SCORED_ROWS)
def test_scored_mlp_matches_the_reference(tokens_per_expert, D, F, gathered, activation, dtype, ref_dtype, atol, rtol):
    gen = torch.Generator().manual_seed(8)
    N, E = sum(tokens_per_expert), len(tokens_per_expert)
    width_in = 2 * F if activation == "swiglu" else F
    x = torch.randn(5 if gathered else N, D, generator=gen).to(dtype)
    gather_N = torch.randint(0, 5, (N,), generator=gen) if gathered else None
    w_in = (torch.randn(E, width_in, D, generator=gen) * D**-0.5).to(dtype)
    w_out = (torch.randn(E, D, F, generator=gen) * F**-0.5).to(dtype)
    score_N = torch.rand(N, generator=gen)
    tokens_E = torch.tensor(tokens_per_expert)
    leaves = [t.clone().requires_grad_() for t in (x, w_in, w_out, score_N)]
    y = grouped_mlp_scored_triton(*leaves[:3], tokens_E, activation, leaves[3], gather_N)
    assert y.shape == (N, D) and y.dtype == dtype
    grad_y = torch.randn(y.shape, generator=gen)
    got = [y, *torch.autograd.grad((y * grad_y.to(dtype)).sum(), leaves)]
    ref_leaves = [t.detach().to(ref_dtype).requires_grad_() for t in (x, w_in, w_out)]
    ref_score = score_N.to(torch.float64 if ref_dtype == torch.float64 else torch.float32).requires_grad_()
    y_ref = grouped_mlp_scored_reference(*ref_leaves, tokens_E, activation, ref_score, gather_N)
    expected = [y_ref, *torch.autograd.grad((y_ref * grad_y.to(ref_dtype)).sum(), [*ref_leaves, ref_score])]
    for what, a, b in zip(("y", "dx", "dw_in", "dw_out", "dscore"), got, expected):
        if what == "dscore":
            tol = atol * max(1.0, b.abs().max().item()) if dtype == torch.bfloat16 else atol
            torch.testing.assert_close(a.to(b.dtype), b.detach(), atol=tol, rtol=rtol, msg=lambda m: f"dscore: {m}")
        else:
            assert_close(a, b.detach(), atol, rtol, what)


def test_scored_mlp_keeps_no_unscaled_outputs():
    # Scaling the plain MLP's output by the score keeps that (N, D) output for the score's gradient; the
    # scored op keeps h and the scores only.
    gen = torch.Generator().manual_seed(9)
    N, D, F, E = 12, 40, 16, 3
    x, score = torch.randn(N, D, generator=gen, requires_grad=True), torch.rand(N, generator=gen, requires_grad=True)
    w_in = torch.randn(E, 2 * F, D, generator=gen, requires_grad=True)
    w_out = torch.randn(E, D, F, generator=gen, requires_grad=True)
    tokens_E = torch.tensor([5, 0, 7])
    scored = _saved_tensors(lambda: grouped_mlp_scored_triton(x, w_in, w_out, tokens_E, "swiglu", score))
    plain = _saved_tensors(lambda: grouped_mlp_triton(x, w_in, w_out, tokens_E, "swiglu") * score[:, None])
    assert sum(tuple(t.shape) == (N, D) and t is not x for t in plain) == 1
    assert [tuple(t.shape) for t in scored if t.dim() == 2 and t is not x] == [(N, 2 * F)]


def test_fused_combine_equals_the_unfused_triton_ops():
    # The same kernels composed as two ops (grouped MLP, then unpermute): same forward, same gradients.
    x, w_in, w_out, tokens_E, choice_N, weights_TK = make_inputs(11, 16, 72, 6, 2, "random", "swiglu", torch.float32, 4)
    results = []
    for fused in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, w_in, w_out, weights_TK)]
        if fused:
            y = grouped_mlp_combine_triton(leaves[0], leaves[1], leaves[2], tokens_E, "swiglu", choice_N, leaves[3])
        else:
            y_ND = grouped_mlp_triton(leaves[0], leaves[1], leaves[2], tokens_E, "swiglu", choice_N // 2)
            y = unpermute(y_ND, choice_N, leaves[3], 11)
        results.append([y, *torch.autograd.grad(y.square().sum(), leaves)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _saved_tensors(fn) -> list[torch.Tensor]:
    """The tensors autograd saves while fn() runs its forward."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def test_fused_combine_saves_no_expert_outputs():
    T, D, F, E, K = 10, 48, 16, 4, 2  # D differs from every other width, so an (N, D) tensor is recognisable
    x, w_in, w_out, tokens_E, choice_N, weights_TK = make_inputs(T, D, F, E, K, "random", "swiglu", torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, w_in, w_out, weights_TK)]
    N = choice_N.numel()

    fused = _saved_tensors(lambda: grouped_mlp_combine_triton(
        leaves[0], leaves[1], leaves[2], tokens_E, "swiglu", choice_N, leaves[3]))
    composed = _saved_tensors(lambda: unpermute(
        grouped_mlp_triton(leaves[0], leaves[1], leaves[2], tokens_E, "swiglu", choice_N // K), choice_N, leaves[3], T))
    assert (N, D) in [tuple(t.shape) for t in composed]  # the composed ops keep y_ND for the weight gradient
    assert (N, D) not in [tuple(t.shape) for t in fused]
    activations = lambda ts: sum(t.numel() * t.element_size() for t in ts if t.dim() == 2 and t.shape[0] == N)  # noqa: E731
    assert activations(fused) == N * 2 * F * 4  # h only
    assert activations(composed) - activations(fused) == N * D * 4


def test_routing_weights_alone_still_keep_h():
    """Frozen experts and input, trainable routing weights (or scores): their gradient reads act, so the
    forward keeps the pre-activation h (N, H) instead of leaving the backward to recompute it."""
    x, w_in, w_out, tokens_E, choice_N, weights_TK = make_inputs(6, 16, 8, 3, 2, "random", "swiglu", torch.float32, 7)
    N, H = choice_N.numel(), w_in.shape[1]
    weights = weights_TK.clone().requires_grad_()
    score_N = weights_TK.reshape(-1)[choice_N].clone().requires_grad_()
    combined = _saved_tensors(lambda: grouped_mlp_combine_triton(x, w_in, w_out, tokens_E, "swiglu", choice_N, weights))
    scored = _saved_tensors(lambda: grouped_mlp_scored_triton(x.index_select(0, choice_N // 2), w_in, w_out, tokens_E,
                                                              "swiglu", score_N))
    for saved in (combined, scored):
        assert (N, H) in [tuple(t.shape) for t in saved], [tuple(t.shape) for t in saved]


def test_frozen_inputs_and_weights_without_grad():
    # Routing weights without a gradient (a detached router) and frozen expert weights both run and agree.
    x, w_in, w_out, tokens_E, choice_N, weights_TK = make_inputs(7, 16, 8, 3, 2, "random", "gelu", torch.float32, 2)
    x_ = x.clone().requires_grad_()
    y = grouped_mlp_combine_triton(x_, w_in, w_out, tokens_E, "gelu", choice_N, weights_TK)
    (dx,) = torch.autograd.grad(y.sum(), (x_,))
    x_ref = x.double().requires_grad_()
    y_ref = grouped_mlp_combine_reference(x_ref, w_in.double(), w_out.double(), tokens_E, "gelu", choice_N, weights_TK.double())
    torch.testing.assert_close(dx.double(), torch.autograd.grad(y_ref.sum(), (x_ref,))[0], atol=1e-5, rtol=1e-5)

    w_ = weights_TK.clone().requires_grad_()
    (dw,) = torch.autograd.grad(grouped_mlp_combine_triton(x, w_in, w_out, tokens_E, "gelu", choice_N, w_).sum(), (w_,))
    w_ref = weights_TK.double().requires_grad_()
    y_ref = grouped_mlp_combine_reference(x.double(), w_in.double(), w_out.double(), tokens_E, "gelu", choice_N, w_ref)
    torch.testing.assert_close(dw.double(), torch.autograd.grad(y_ref.sum(), (w_ref,))[0], atol=1e-5, rtol=1e-5)

    with torch.no_grad():  # no h is kept without a gradient to take
        assert grouped_mlp_combine_triton(x_, w_in, w_out, tokens_E, "gelu", choice_N, w_).shape == (7, 16)


def test_public_op_follows_the_backend_switch(monkeypatch):
    args = make_inputs(5, 16, 8, 3, 2, "random", "swiglu", torch.float32, 3)
    x, w_in, w_out, tokens_E, choice_N, weights_TK = args
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("MOE_ENGINE_KERNELS", backend)
        results[backend] = grouped_mlp_combine(x, w_in, w_out, tokens_E, "swiglu", choice_N, weights_TK)
    torch.testing.assert_close(results["torch"], results["triton"], atol=1e-5, rtol=1e-5)


def test_opcheck_custom_ops():
    x, w_in, w_out, tokens_E, choice_N, weights_TK = make_inputs(6, 16, 8, 3, 2, "random", "swiglu", torch.float32, 5)
    N = choice_N.numel()
    token_N = choice_N // 2
    grad_y = torch.randn(6, 16)
    h = torch.randn(N, 16)
    act = torch.randn(N, 8)
    ops = torch.ops.moe_engine

    def leaf(t):
        return t.detach().clone().requires_grad_()

    cases = [
        (ops.grouped_mlp_combine, (leaf(x), leaf(w_in), leaf(w_out), tokens_E, choice_N, leaf(weights_TK), "swiglu", True)),
        (ops.grouped_mlp_scored_act_backward, (grad_y, token_N, w_out, h, tokens_E, weights_TK.reshape(-1)[choice_N],
                                               "swiglu", True)),
        (ops.grouped_gemm_dw, (grad_y, act, tokens_E, None, token_N)),
        (ops.grouped_mlp_scored, (leaf(x), leaf(w_in), leaf(w_out), tokens_E, token_N, leaf(torch.rand(N)), "swiglu", True)),
        (ops.grouped_mlp_scored_act_backward, (torch.randn(N, 16), None, w_out, h, tokens_E, torch.rand(N), "swiglu", True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_score_partials_fill_every_slot():
    # Each N-tile writes its sum in its first slot and zeros in the rest: every slot is written, so
    # an uninitialised buffer sums to the row dot whatever the tile width.
    from moe_engine.kernels.grouped_gemm import _launch_gemm

    x, w_in, w_out, tokens_E, choice_N, weights_TK = make_inputs(5, 16, 200, 3, 2, "random", "gelu", torch.float32, 6)
    N, F = choice_N.numel(), 200
    token_N = choice_N // 2
    grad_y, h = torch.randn(5, 16), torch.randn(N, F)
    score_N = torch.rand(N)
    expected = ((grad_y[token_N][:, None, :] @ w_out[torch.repeat_interleave(torch.arange(3), tokens_E)]).squeeze(1)
                * torch.nn.functional.gelu(h)).sum(1)
    assert score_slots(F) == 4 and SCORE_SLOT == 64
    for block_n in (64, 128):
        dscore = torch.full((N, score_slots(F)), float("nan"))
        dh, act = torch.empty(N, F), torch.empty(N, F)
        config = dict(BLOCK_M=64, BLOCK_N=block_n, BLOCK_K=32, GROUP_M=8, B_TMA=0, num_warps=4, num_stages=3)
        _launch_gemm(grad_y, w_out, tokens_E, token_N, dh, F, "gelu_bwd", h=h, act=act, score=score_N, dscore=dscore,
                     config=config)
        assert not dscore.isnan().any(), block_n
        torch.testing.assert_close(dscore.sum(1), expected, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(act, score_N[:, None] * torch.nn.functional.gelu(h), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: {**a, "weights_TK": a["weights_TK"][:-1]}, r"weights_TK has shape \(6, 2\), expected \(7, K >= 1\)"),
        (lambda a: {**a, "weights_TK": a["weights_TK"].long()}, "expected a 2-D floating"),
        (lambda a: {**a, "activation": "relu"}, "activation = 'relu', allowed: swiglu, gelu"),
        (lambda a: {**a, "choice_N": a["choice_N"].int()}, "gather_index_N has shape .* dtype torch.int32, expected"),
        (lambda a: {**a, "choice_N": torch.arange(15)}, "choice_N has 15 rows, more than the 14 choices"),
    ],
)
def test_launcher_rejects_bad_inputs(change, match):
    x, w_in, w_out, tokens_E, choice_N, weights_TK = make_inputs(7, 16, 8, 3, 2, "random", "swiglu", torch.float32)
    args = dict(x_TD=x, w_in=w_in, w_out=w_out, tokens_per_expert_E=tokens_E, activation="swiglu", choice_N=choice_N,
                weights_TK=weights_TK)
    with pytest.raises(ValueError, match=match):
        grouped_mlp_combine_triton(**change(args))


def test_a_pinned_tile_narrower_than_a_score_slot_is_refused_before_the_forward(monkeypatch):
    monkeypatch.setenv("MOE_ENGINE_GROUPED_GEMM_CONFIG", "BLOCK_M=64,BLOCK_N=32,BLOCK_K=32,GROUP_M=8,B_TMA=0")
    x, w_in, w_out, tokens_E, choice_N, weights_TK = make_inputs(7, 16, 8, 3, 2, "random", "swiglu", torch.float32)
    with pytest.raises(ValueError, match="BLOCK_N a multiple of 64, got 32"):
        grouped_mlp_combine_triton(x, w_in, w_out, tokens_E, "swiglu", choice_N, weights_TK.requires_grad_())


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_fused_combine_on_cuda_bf16_matches_the_unfused_ops_and_is_deterministic(activation):
    # Compiled kernels at a shape with many tiles: against the unfused Triton ops (which keep y_ND),
    # two runs bitwise equal (the score dot is summed in a fixed order, no atomics).
    T, D, F, E, K = 2048, 512, 384, 16, 4
    x, w_in, w_out, tokens_E, choice_N, weights_TK = make_inputs(T, D, F, E, K, "random", activation, torch.bfloat16, 7)
    x, w_in, w_out, tokens_E, choice_N, weights_TK = (t.cuda() for t in (x, w_in, w_out, tokens_E, choice_N, weights_TK))
    grad_y = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    runs = []
    for fused in (True, True, False):
        leaves = [t.clone().requires_grad_() for t in (x, w_in, w_out, weights_TK)]
        if fused:
            y = grouped_mlp_combine_triton(leaves[0], leaves[1], leaves[2], tokens_E, activation, choice_N, leaves[3])
        else:
            y_ND = grouped_mlp_triton(leaves[0], leaves[1], leaves[2], tokens_E, activation, choice_N // K)
            y = unpermute(y_ND, choice_N, leaves[3], T)
        runs.append([y, *torch.autograd.grad((y * grad_y).sum(), leaves)])
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    for what, a, b in zip(("y", "dx", "dw_in", "dw_out", "dweights"), runs[0], runs[2]):
        scale = b.float().abs().max().item()
        assert (a.float() - b.float()).abs().max().item() <= 2e-2 * max(1.0, scale), what


def _saved_and_grads(fn, leaves, grad_y):
    """(the shapes autograd saved while fn() ran, fn()'s output, the gradients of every leaf)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = fn()
    return saved, y, torch.autograd.grad((y * grad_y).sum(), leaves)


@pytest.mark.parametrize("op", ["mlp", "mlp_gathered", "combine", "scored"])
@pytest.mark.parametrize("T, D, F, E, K, kind", [(5, 13, 24, 5, 2, "random"), CASES[4]])
def test_recompute_h_keeps_no_pre_activation_and_gives_the_same_gradients(op, T, D, F, E, K, kind):
    # recompute_h=True: the forward saves no (N, H) pre-activation; the backward recomputes it with the
    # up-projection alone. Same tiles, same arithmetic: the output and every gradient equal the saved-h run.
    x, w_in, w_out, tokens_E, choice_N, weights_TK = make_inputs(T, D, F, E, K, kind, "swiglu", torch.float32)
    N, H, token_N = choice_N.shape[0], w_in.shape[1], choice_N // K
    score_N = weights_TK.reshape(-1)[choice_N]
    x_rows = x.index_select(0, token_N)

    def run(recompute: bool):
        leaves = [t.clone().requires_grad_() for t in (x_rows if op in ("mlp", "scored") else x, w_in, w_out)]
        if op == "combine":
            leaves.append(weights_TK.clone().requires_grad_())
            fn = lambda: grouped_mlp_combine_triton(*leaves[:3], tokens_E, "swiglu", choice_N, leaves[3],  # noqa: E731
                                                    recompute_h=recompute)
        elif op == "scored":
            leaves.append(score_N.clone().requires_grad_())
            fn = lambda: grouped_mlp_scored_triton(*leaves[:3], tokens_E, "swiglu", leaves[3],  # noqa: E731
                                                   recompute_h=recompute)
        else:
            gather = token_N if op == "mlp_gathered" else None
            fn = lambda: grouped_mlp_triton(*leaves, tokens_E, "swiglu", gather, recompute_h=recompute)  # noqa: E731
        grad_y = torch.randn(T if op == "combine" else N, D, generator=torch.Generator().manual_seed(4))
        return _saved_and_grads(fn, leaves, grad_y)

    saved_h, y_h, grads_h = run(False)
    saved, y, grads = run(True)
    assert saved_h.count((N, H)) == saved.count((N, H)) + 1 and (0, H) in saved, (saved_h, saved)
    torch.testing.assert_close(y, y_h, rtol=0, atol=0)
    for a, b in zip(grads, grads_h, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_recompute_h_must_be_a_bool():
    x, w_in, w_out, tokens_E, choice_N, weights_TK = make_inputs(4, 16, 8, 3, 2, "random", "swiglu", torch.float32)
    with pytest.raises(ValueError, match="recompute_h = 'yes': must be True or False"):
        grouped_mlp_combine_triton(x, w_in, w_out, tokens_E, "swiglu", choice_N, weights_TK, recompute_h="yes")
