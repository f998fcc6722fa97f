"""Tests of the Triton grouped GEMM and expert MLP (moe_engine/kernels/grouped_gemm.py).

Without CUDA the kernels run under Triton's interpreter (tests/conftest.py), which runs the
first autotune candidate: BLOCK_M = BLOCK_N = 64, BLOCK_K = 32. Each result is compared with the
torch loop (`grouped_linear_loop`) run on the same values in float64 (fp32 rows) or float32 (bf16
rows, from the same bf16-rounded inputs): the forward and the gradients of x, w_in and w_out.
"""

from __future__ import annotations

import pytest
import torch

from moe_engine.experts import GroupedExperts
from moe_engine.kernels.grouped_gemm import grouped_gemm, grouped_gemm_reference, grouped_gemm_triton
from moe_engine.kernels.grouped_mlp import grouped_mlp, grouped_mlp_reference, grouped_mlp_triton
from moe_engine.kernels.mlp_combine import grouped_mlp_scored_reference, grouped_mlp_scored_triton

# (dtype, reference dtype, atol, rtol): fp32 tight; bf16 as vLLM/SonicMoE test their bf16 kernels,
# atol scaled by the reference's largest magnitude (see `assert_close`).
DTYPE_TOLERANCES = [
    (torch.float32, torch.float64, 1e-5, 1e-5),
    (torch.bfloat16, torch.float32, 2e-2, 2e-2),
]

# (rows per expert (its length is E), D, F). Interpreted tiles are 64 x 64 x 32: keep shapes small.
SHAPES = [
    ([3, 1, 4, 2], 16, 8),  # typical, uneven; N = 10 < BLOCK_M
    ([0, 1, 0], 16, 8),  # N = 1: a single row, experts with no rows around it
    ([2, 0, 3, 1, 0, 4, 1], 13, 24),  # prime E = 7, empty experts between busy ones; odd D, F
    ([0, 0, 70, 0], 24, 13),  # all rows on one expert, spanning two M-tiles; odd F
    ([0, 0, 0], 16, 8),  # N = 0: empty output, zero weight gradients
]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str) -> None:
    """For bf16, atol is relative to the reference's largest magnitude: an entry of a bf16 GEMM (or a
    gradient summed from such entries) errs by the size of its terms, not of itself."""
    if actual.dtype == torch.bfloat16 and expected.numel():
        atol = atol * max(1.0, expected.abs().max().item())
    assert actual.dtype in (torch.float32, torch.bfloat16) and actual.shape == expected.shape, what
    torch.testing.assert_close(actual.to(expected.dtype), expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def make_inputs(tokens_per_expert, d_model, out_width, dtype, gather):
    """x (rows or tokens, D), w (E, out_width, D), tokens_E, gather_N (or None), unit-ish scale."""
    num_rows = sum(tokens_per_expert)
    num_tokens = 5 if gather else num_rows
    x = torch.randn(num_tokens, d_model).to(dtype)
    w = (torch.randn(len(tokens_per_expert), out_width, d_model) * d_model**-0.5).to(dtype)
    # A gather repeats some tokens (their dx sums several rows) and skips others (their dx is 0).
    gather_N = torch.randint(0, num_tokens - 1, (num_rows,)) if gather else None
    return x, w, torch.tensor(tokens_per_expert), gather_N


def grads(y: torch.Tensor, grad_y: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    """d(sum(y * grad_y))/d(leaves); with no rows every gradient must come back as zeros."""
    return list(torch.autograd.grad((y * grad_y.to(y.dtype)).sum(), leaves))


@pytest.mark.parametrize("dtype, ref_dtype, atol, rtol", DTYPE_TOLERANCES)
@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("tokens_per_expert, d_model, out_width", SHAPES)
def test_grouped_gemm_matches_loop(tokens_per_expert, d_model, out_width, gather, dtype, ref_dtype, atol, rtol):
    torch.manual_seed(0)
    x, w, tokens_E, gather_N = make_inputs(tokens_per_expert, d_model, out_width, dtype, gather)
    x.requires_grad_()
    w.requires_grad_()
    y = grouped_gemm_triton(x, w, tokens_E, gather_N)
    grad_y = torch.randn(y.shape)
    got = [y, *grads(y, grad_y, [x, w])]

    leaves = [t.detach().to(ref_dtype).requires_grad_() for t in (x, w)]
    y_ref = grouped_gemm_reference(*leaves, tokens_E, gather_N)
    expected = [y_ref, *grads(y_ref, grad_y, leaves)]
    for what, a, b in zip(("y", "dx", "dw"), got, expected):
        assert_close(a, b.detach(), atol, rtol, what)


# bf16 runs with the gather only: the gather changes where A rows come from, not the bf16 arithmetic.
MLP_DTYPE_GATHER = [(*DTYPE_TOLERANCES[0], False), (*DTYPE_TOLERANCES[0], True), (*DTYPE_TOLERANCES[1], True)]


@pytest.mark.parametrize("dtype, ref_dtype, atol, rtol, gather", MLP_DTYPE_GATHER)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("tokens_per_expert, d_model, ffn_hidden", SHAPES)
def test_grouped_mlp_matches_loop(tokens_per_expert, d_model, ffn_hidden, activation, gather, dtype, ref_dtype, atol, rtol):
    torch.manual_seed(1)
    width_in = 2 * ffn_hidden if activation == "swiglu" else ffn_hidden
    x, w_in, tokens_E, gather_N = make_inputs(tokens_per_expert, d_model, width_in, dtype, gather)
    w_out = (torch.randn(len(tokens_per_expert), d_model, ffn_hidden) * ffn_hidden**-0.5).to(dtype)
    leaves = [t.requires_grad_() for t in (x, w_in, w_out)]
    y = grouped_mlp_triton(*leaves, tokens_E, activation, gather_N)
    grad_y = torch.randn(y.shape)
    got = [y, *grads(y, grad_y, leaves)]

    ref_leaves = [t.detach().to(ref_dtype).requires_grad_() for t in leaves]
    y_ref = grouped_mlp_reference(*ref_leaves, tokens_E, activation, gather_N)
    expected = [y_ref, *grads(y_ref, grad_y, ref_leaves)]
    for what, a, b in zip(("y", "dx", "dw_in", "dw_out"), got, expected):
        assert_close(a, b.detach(), atol, rtol, what)


def test_grouped_mlp_skips_gradients_nobody_needs():
    # Frozen weights (only dx) and a frozen input (only the weight grads) both run and agree.
    torch.manual_seed(2)
    x, w_in, tokens_E, _ = make_inputs([2, 3], 16, 16, torch.float32, False)
    w_out = torch.randn(2, 16, 8) * 8**-0.5
    x_ref = x.clone().requires_grad_()
    y_ref = grouped_mlp_reference(x_ref, w_in, w_out, tokens_E, "swiglu")
    (dx,) = torch.autograd.grad(grouped_mlp_triton(x.requires_grad_(), w_in, w_out, tokens_E, "swiglu").sum(), (x,))
    torch.testing.assert_close(dx, torch.autograd.grad(y_ref.sum(), (x_ref,))[0])
    w_out.requires_grad_()
    y = grouped_mlp_triton(x.detach(), w_in, w_out, tokens_E, "swiglu")
    (dw_out,) = torch.autograd.grad(y.sum(), (w_out,))
    w_ref = w_out.detach().clone().requires_grad_()
    expected = torch.autograd.grad(grouped_mlp_reference(x.detach(), w_in, w_ref, tokens_E, "swiglu").sum(), (w_ref,))[0]
    torch.testing.assert_close(dw_out, expected)


@pytest.mark.parametrize("trainable", [("w_in",), ("x", "w_in"), ("w_in", "w_out")], ids="+".join)
def test_grouped_mlp_gradients_of_any_trainable_subset(trainable):
    """Only some of x, w_in, w_out need a gradient (w_out frozen while the up-projection trains, say):
    each gradient asked for is computed, and matches the loop's. With the gather (dx sums rows)."""
    torch.manual_seed(7)
    x, w_in, tokens_E, gather_N = make_inputs([2, 0, 3], 16, 16, torch.float32, True)
    w_out = torch.randn(3, 16, 8) * 8**-0.5
    named = {"x": x, "w_in": w_in, "w_out": w_out}
    results = []
    for fn in (grouped_mlp_triton, grouped_mlp_reference):
        leaves = {k: v.clone().requires_grad_(k in trainable) for k, v in named.items()}
        y = fn(leaves["x"], leaves["w_in"], leaves["w_out"], tokens_E, "swiglu", gather_N)
        results.append(torch.autograd.grad(y.mul(torch.linspace(-1, 1, y.numel()).view_as(y)).sum(),
                                           [leaves[k] for k in trainable]))
    for what, a, b in zip(trainable, *results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def test_strided_counts_gather_and_scores_read_their_own_elements():
    """1-D index, count and score tensors that are views with stride != 1 (a column of a table):
    the launchers must not read them as flat arrays. Forward, dx and dW of the GEMM and the MLP,
    and the scored MLP's gradients (its backward passes an fp32 score on as it came)."""
    torch.manual_seed(4)
    E, I, O = 3, 16, 24
    tokens_E = torch.tensor([[3, 7], [0, 7], [5, 7]])[:, 0]
    gather_N = torch.stack([torch.tensor([0, 4, 4, 1, 0, 3, 2, 2]), torch.arange(8)], dim=1)[:, 0]
    x, w, w_in, w_out = torch.randn(5, I), torch.randn(E, O, I), torch.randn(E, 2 * O, I) * 0.3, torch.randn(E, I, O) * 0.3
    score_table = torch.rand(8, 2)

    def run(fn, kind):
        leaves = [t.clone().requires_grad_() for t in (x, w, w_in, w_out, score_table)]
        lx, lw, lw_in, lw_out, table = leaves
        score_N = table[:, 0]
        assert tokens_E.stride() == gather_N.stride() == score_N.stride() == (2,)
        if kind == "gemm":
            y = fn(lx, lw, tokens_E, gather_N)
        elif kind == "mlp":
            y = fn(lx, lw_in, lw_out, tokens_E, "swiglu", gather_N)
        else:
            y = fn(lx.index_select(0, gather_N), lw_in, lw_out, tokens_E, "swiglu", score_N)
        y.mul(torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return [y.detach(), *(t.grad for t in leaves if t.grad is not None)]

    for kind, ours, reference in [
        ("gemm", grouped_gemm_triton, grouped_gemm_reference),
        ("mlp", grouped_mlp_triton, grouped_mlp_reference),
        ("scored", grouped_mlp_scored_triton, grouped_mlp_scored_reference),
    ]:
        got, expected = run(ours, kind), run(reference, kind)
        assert len(got) == len(expected) == {"gemm": 3, "mlp": 4, "scored": 5}[kind]
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=kind)


def test_public_ops_follow_the_backend_switch(monkeypatch):
    torch.manual_seed(3)
    x, w_in, tokens_E, gather_N = make_inputs([1, 2, 0], 16, 16, torch.float32, True)
    w_out = torch.randn(3, 16, 8)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("MOE_ENGINE_KERNELS", backend)
        results[backend] = (grouped_gemm(x, w_in, tokens_E, gather_N), grouped_mlp(x, w_in, w_out, tokens_E, "swiglu", gather_N))
    for a, b in zip(results["torch"], results["triton"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_grouped_experts_triton_impl_and_forward_gathered(activation, monkeypatch):
    # impl="triton" against impl="loop"; forward_gathered against forward on the gathered copy;
    # auto picks triton on CPU only when MOE_ENGINE_KERNELS=triton (the interpreter runs it).
    torch.manual_seed(4)
    loop = GroupedExperts(4, 16, 8, activation, "loop")
    fused = GroupedExperts(4, 16, 8, activation, "triton")
    fused.load_state_dict(loop.state_dict())
    assert GroupedExperts(4, 16, 8, activation, "auto").resolve_impl(torch.device("cpu"), torch.float32) != "triton"
    monkeypatch.setenv("MOE_ENGINE_KERNELS", "triton")
    assert GroupedExperts(4, 16, 8, activation, "auto").resolve_impl(torch.device("cpu"), torch.float32) == "triton"
    # Asked for Triton where it cannot run (float64): an error, not a silent fallback to the loop.
    with pytest.raises(RuntimeError, match="MOE_ENGINE_KERNELS=triton, but the Triton grouped GEMM cannot run here: .*float64"):
        GroupedExperts(4, 16, 8, activation, "auto").resolve_impl(torch.device("cpu"), torch.float64)

    tokens_E = torch.tensor([2, 0, 3, 1])
    x_TD = torch.randn(4, 16)
    gather_N = torch.tensor([0, 3, 1, 0, 2, 3])
    outputs = []
    for experts, gathered in ((loop, False), (fused, False), (fused, True), (loop, True)):
        x = x_TD.clone().requires_grad_()
        if gathered:
            y = experts.forward_gathered(x, gather_N, tokens_E)
        else:
            y = experts(x.index_select(0, gather_N), tokens_E)
        outputs.append([y, *torch.autograd.grad(y.sum(), (x, experts.w_in, experts.w_out))])  # .sum(): zero-stride grad
    for other in outputs[1:]:
        for what, a, b in zip(("y", "dx", "dw_in", "dw_out"), other, outputs[0]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")
    # The fused gather's dx sums each token's rows in row order, as index_select's backward does on
    # the gathered copy: the same bits.
    assert torch.equal(outputs[2][1], outputs[1][1])


def test_triton_impl_refuses_float64():
    experts = GroupedExperts(2, 16, 8, "swiglu", "triton").double()
    with pytest.raises(ValueError, match="'triton' cannot run here: .*float64"):
        experts(torch.randn(3, 16, dtype=torch.float64), torch.tensor([1, 2]))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x, w, t: grouped_gemm_triton(x[0], w, t), r"x has shape \(16,\)"),
        (lambda x, w, t: grouped_gemm_triton(x, w[..., :8], t), r"w has shape \(2, 8, 8\).*\(E, out, 16\)"),
        (lambda x, w, t: grouped_gemm_triton(x, w, t[:1]), r"tokens_per_expert_E has shape \(1,\)"),
        (lambda x, w, t: grouped_gemm_triton(x, w, t.float()), "tokens_per_expert_E .* dtype torch.float32"),
        (lambda x, w, t: grouped_gemm_triton(x, w, t, t.int()), "gather_index_N .* dtype torch.int32"),
        (lambda x, w, t: grouped_gemm_triton(x, w.double(), t), "w is torch.float64"),
        (lambda x, w, t: grouped_mlp_triton(x, w, w, t, "relu"), "'relu'"),
        (lambda x, w, t: grouped_mlp_triton(x, w, w, t, "swiglu"), r"w_out \(2, 8, 16\).*\(2, 16, 4\)"),
        # An odd w_in.shape[1] has no [gate | up] halves, though w_out fits its floor half.
        (lambda x, w, t: grouped_mlp_triton(x, w[:, :7], torch.randn(2, 16, 3), t, "swiglu"), "and an even w_in.shape"),
    ],
)
def test_launchers_reject_bad_inputs(call, match):
    x, w, t = torch.randn(3, 16), torch.randn(2, 8, 16), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=match):
        call(x, w, t)


def test_opcheck_custom_ops():
    torch.manual_seed(5)
    x, w_in, tokens_E, gather_N = make_inputs([2, 0, 3], 16, 16, torch.float32, True)
    w_out = torch.randn(3, 16, 8)
    x_ND = x.index_select(0, gather_N)  # the grouped_gemm row without a gather
    dy = torch.randn(5, 16)
    h = torch.randn(5, 16)
    ops = torch.ops.moe_engine

    def leaf(t):
        return t.detach().clone().requires_grad_()

    # The backward ops (dx, dw, act_backward) are not differentiable themselves: plain tensors.
    cases = [
        (ops.grouped_gemm, (leaf(x), leaf(w_in), tokens_E, gather_N)),
        (ops.grouped_gemm, (leaf(x_ND), leaf(w_in), tokens_E, None)),
        (ops.grouped_gemm_dx, (dy, w_in, tokens_E, gather_N, x.shape[0])),
        (ops.grouped_gemm_dw, (dy, x, tokens_E, gather_N)),
        (ops.grouped_mlp, (leaf(x), leaf(w_in), leaf(w_out), tokens_E, gather_N, "swiglu", True)),
        (ops.grouped_mlp_act_backward, (dy, w_out, h, tokens_E, "swiglu")),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("skewed", [False, True])
def test_compiled_kernels_on_cuda_bf16(activation, skewed):
    # Compiled kernels (autotuned, several M- and N-tiles per expert, K loop of many steps) in bf16
    # against the fp32 loop from the same bf16 values; skewed: one expert gets most rows.
    torch.manual_seed(6)
    T, D, F, E, K = 512, 384, 256, 8, 2
    probs = torch.tensor([20.0] + [1.0] * (E - 1)) if skewed else torch.ones(E)
    experts_TK = torch.multinomial(probs.expand(T, E), K)
    choice_N = torch.argsort(experts_TK.reshape(-1), stable=True)
    tokens_E = torch.bincount(experts_TK.reshape(-1), minlength=E).cuda()
    gather_N = (choice_N // K).cuda()
    width_in = 2 * F if activation == "swiglu" else F
    leaves = [
        torch.randn(T, D, device="cuda").bfloat16().requires_grad_(),
        (torch.randn(E, width_in, D, device="cuda") * D**-0.5).bfloat16().requires_grad_(),
        (torch.randn(E, D, F, device="cuda") * F**-0.5).bfloat16().requires_grad_(),
    ]
    y = grouped_mlp_triton(*leaves, tokens_E, activation, gather_N)
    grad_y = torch.randn(y.shape, device="cuda")
    got = [y, *grads(y, grad_y, leaves)]
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    y_ref = grouped_mlp_reference(*ref_leaves, tokens_E, activation, gather_N)
    expected = [y_ref, *grads(y_ref, grad_y, ref_leaves)]
    for what, a, b in zip(("y", "dx", "dw_in", "dw_out"), got, expected):
        assert_close(a, b.detach(), 2e-2, 2e-2, what)


# A TMA candidate (weights through a tensor descriptor) and its pointer-load twin, small enough for
# the interpreter; each launch below is run with both and compared with the torch loop.
TMA_CONFIGS = [
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, B_TMA=tma, num_warps=4, num_stages=3) for tma in (0, 1)
]


@pytest.mark.parametrize("config", TMA_CONFIGS, ids=["pointer", "tma"])
@pytest.mark.parametrize("dtype, ref_dtype, atol, rtol", DTYPE_TOLERANCES)
def test_tma_weight_loads_match_the_loop(config, dtype, ref_dtype, atol, rtol):
    # Both weight orientations: K-major (the forward reads w.transpose(1, 2), with SwiGLU's up half
    # O rows further on) and N-major (act_backward / dX read w itself). The widths are not tile
    # multiples (the descriptor box runs past the weight's edges) and expert 1 has no rows.
    from moe_engine.kernels.grouped_gemm import _launch_gemm, grouped_linear_loop
    from moe_engine.kernels.grouped_mlp import activate_reference

    torch.manual_seed(11)
    tokens_E = torch.tensor([5, 0, 70])
    N, D, F = int(tokens_E.sum()), 40, 24
    x = torch.randn(N, D).to(dtype)
    w_in = (torch.randn(3, 2 * F, D) * D**-0.5).to(dtype)
    w_out = (torch.randn(3, D, F) * F**-0.5).to(dtype)
    ref = [t.to(ref_dtype) for t in (x, w_in, w_out)]

    act, h = x.new_empty(N, F), x.new_empty(N, 2 * F)
    _launch_gemm(x, w_in.transpose(1, 2), tokens_E, None, act, F, "swiglu", h=h, store_h=True, config=config)
    h_ref = grouped_linear_loop(ref[0], ref[1], tokens_E)
    assert_close(h, h_ref, atol, rtol, "h (K-major, SwiGLU's two halves)")
    assert_close(act, activate_reference(h_ref, "swiglu"), atol, rtol, "act")
    # SwiGLU from an N-major w_in (E, D, 2F), as Hugging Face's is_transposed experts store it.
    act, h = x.new_empty(N, F), x.new_empty(N, 2 * F)
    _launch_gemm(x, w_in.transpose(1, 2).contiguous(), tokens_E, None, act, F, "swiglu", h=h, store_h=True,
                 config=config)
    assert_close(h, h_ref, atol, rtol, "h (N-major, SwiGLU's two halves)")
    assert_close(act, activate_reference(h_ref, "swiglu"), atol, rtol, "act (N-major)")

    dx = x.new_empty(N, 2 * F)  # dX of the down-projection's input: grad_y @ w_out[e] (N-major)
    grad_y = torch.randn(N, D).to(dtype)
    _launch_gemm(grad_y, w_out, tokens_E, None, dx[:, :F], F, config=config)
    assert_close(dx[:, :F], grouped_linear_loop(grad_y.to(ref_dtype), ref[2].transpose(1, 2), tokens_E), atol, rtol, "dX")


def test_tma_config_needs_a_descriptor():
    from moe_engine.kernels.grouped_gemm import _launch_gemm

    x, w = torch.randn(4, 18), torch.randn(2, 8, 18)  # rows of 18 * 4 bytes: not 16-byte aligned
    with pytest.raises(ValueError, match="asks for TMA weight loads, but this weight has no TMA descriptor"):
        _launch_gemm(x, w.transpose(1, 2), torch.tensor([1, 3]), None, x.new_empty(4, 8), 8, config=TMA_CONFIGS[1])


@pytest.mark.gpu
def test_every_tma_candidate_on_cuda_bf16():
    # The TMA candidates are opt-in (MOE_ENGINE_GEMM_TMA=1) until measured; here three of them run
    # compiled, both weight orientations, widths that are not tile multiples, an empty expert.
    from moe_engine.kernels.grouped_gemm import _grouped_gemm_configs, _launch_gemm, grouped_linear_loop

    torch.manual_seed(12)
    tokens_E = torch.tensor([300, 0, 700, 24], device="cuda")
    N, D, F = int(tokens_E.sum()), 520, 200
    x = torch.randn(N, D, device="cuda").bfloat16()
    w_in = (torch.randn(4, 2 * F, D, device="cuda") * D**-0.5).bfloat16()
    w_out = (torch.randn(4, D, F, device="cuda") * F**-0.5).bfloat16()
    grad_y = torch.randn(N, D, device="cuda").bfloat16()
    h_ref = grouped_linear_loop(x.float(), w_in.float(), tokens_E)
    dx_ref = grouped_linear_loop(grad_y.float(), w_out.float().transpose(1, 2), tokens_E)
    # Three of the candidates (smallest and largest tile, one between): each config is a compile of
    # three kernels, and all of them would take minutes of a short GPU session.
    tma = sorted((c for c in _grouped_gemm_configs() if c["B_TMA"]),
                 key=lambda c: (c["BLOCK_M"] * c["BLOCK_N"] * c["BLOCK_K"], c["num_warps"], c["num_stages"]))
    for config in [tma[0], tma[len(tma) // 2], tma[-1]]:
        act, h = x.new_empty(N, F), x.new_empty(N, 2 * F)
        _launch_gemm(x, w_in.transpose(1, 2), tokens_E, None, act, F, "swiglu", h=h, store_h=True, config=config)
        assert_close(h, h_ref, 2e-2, 2e-2, f"h, K-major, {config}")
        _launch_gemm(x, w_in.transpose(1, 2).contiguous(), tokens_E, None, act, F, "swiglu", h=h, store_h=True,
                     config=config)
        assert_close(h, h_ref, 2e-2, 2e-2, f"h, N-major, {config}")
        dx = x.new_empty(N, F)
        _launch_gemm(grad_y, w_out, tokens_E, None, dx, F, config=config)
        assert_close(dx, dx_ref, 2e-2, 2e-2, f"dX, N-major, {config}")


def test_tma_candidates_are_opt_in_and_need_a_descriptor(monkeypatch):
    import triton

    from moe_engine.kernels.grouped_gemm import (
        GEMM_TMA_ENV_VAR, _grouped_gemm_configs, _prune_gemm_configs, _weight_descriptor, gemm_tma_enabled,
    )

    configs = [triton.Config({k: v for k, v in c.items() if not k.startswith("num_")}, num_warps=c["num_warps"],
                             num_stages=c["num_stages"]) for c in _grouped_gemm_configs()]
    desc, k_major = _weight_descriptor(torch.randn(4, 64, 32).transpose(1, 2))
    assert desc is not None and k_major and list(desc.shape) == [4, 64, 32]
    args = {"w_desc": desc, "O": 512, "EPILOGUE": "none"}

    def tma_kept(named_args):
        return {c.kwargs["B_TMA"] for c in _prune_gemm_configs(configs, named_args)}

    monkeypatch.delenv(GEMM_TMA_ENV_VAR, raising=False)
    assert not gemm_tma_enabled() and tma_kept(args) == {0}
    monkeypatch.setenv(GEMM_TMA_ENV_VAR, "1")
    assert tma_kept(args) == {0, 1}
    assert tma_kept({**args, "w_desc": torch.empty(1)}) == {0}  # no descriptor for this weight: pointer loads
    assert _weight_descriptor(torch.randn(2, 8, 18).transpose(1, 2))[0] is None  # 72-byte rows: not TMA-aligned
    monkeypatch.setenv(GEMM_TMA_ENV_VAR, "yes")
    with pytest.raises(ValueError, match="MOE_ENGINE_GEMM_TMA='yes': allowed: 0 .* or 1"):
        gemm_tma_enabled()


def test_weight_offsets_past_int32_are_int64(tmp_path):
    # A weight whose expert slice spans more than 2^31 elements (w_in (E, 2F, D) as a view of (2F, E, D)
    # storage, so the o stride is E * D): int32 offsets wrapped and read outside the tensor (a segfault
    # under the interpreter). 8 GiB of storage is reserved but only the slice's pages are touched; in a
    # child process, so a crash is a failure here, not the end of the test run.
    script = tmp_path / "wide_stride.py"
    script.write_text(
        "import os\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "import torch\n"
        "from moe_engine.kernels.grouped_gemm import _launch_gemm, grouped_linear_loop\n"
        "F, D, rows, o_stride = 128, 8, 16, 2**24  # (2F - 1) * o_stride > 2^31\n"
        "storage = torch.empty((2 * F - 1) * o_stride + D, dtype=torch.bfloat16)\n"
        "w_in = storage.as_strided((1, 2 * F, D), (D, o_stride, 1))\n"
        "torch.manual_seed(0)\n"
        "w_in.copy_((torch.randn(1, 2 * F, D) * D**-0.5).bfloat16())\n"
        "x, tokens = torch.randn(rows, D).bfloat16(), torch.tensor([rows])\n"
        "act, h = x.new_empty(rows, F), x.new_empty(rows, 2 * F)\n"
        "_launch_gemm(x, w_in.transpose(1, 2), tokens, None, act, F, 'swiglu', h=h, store_h=True)\n"
        "torch.testing.assert_close(h.float(), grouped_linear_loop(x.float(), w_in.float(), tokens), atol=2e-2, rtol=2e-2)\n"
        "print('ok')\n"
    )
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-2000:])
