"""Tests of moe_engine.mtl.dselect_k: the smooth step, the selectors, DSelectKGate and DSelectKRouter.

The library runs in fp32; it is compared with a float64 transcription of the paper's equations
written below (the expanded cubic, 1 - S for the 0 bits, bits from Python's binary formatting,
loops over selectors and codes), forward and gradients of every parameter and of the input.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

import reference_moe as ref
from moe_engine.experts import GroupedExperts
from moe_engine.layer import MoELayer
from moe_engine.mtl.dselect_k import (
    DSelectKGate,
    DSelectKRouter,
    binary_codes,
    num_selector_bits,
    selector_weights,
    smooth_step,
)
from moe_engine.routing import RoutingContext

FP32_ATOL, FP32_RTOL = 2e-6, 1e-5


# ---------------------------------------------------------------------------------------------
# float64 transcription of the equations (Hazimeh et al. 2021; ../shared/REFERENCES.md)
# ---------------------------------------------------------------------------------------------


def ref_smooth_step(t: torch.Tensor, g: float) -> torch.Tensor:
    cubic = -2 * t**3 / g**3 + 3 * t / (2 * g) + 0.5
    return torch.where(t <= -g / 2, torch.zeros_like(t), torch.where(t >= g / 2, torch.ones_like(t), cubic))


def ref_num_bits(num_experts: int) -> int:
    return max(1, math.ceil(math.log2(num_experts)))


def ref_selector(z_M: torch.Tensor, num_codes: int, g: float) -> torch.Tensor:
    """r over codes 0..num_codes-1 of one selector: prod_j (S(z_j) if bit_j else 1 - S(z_j))."""
    m = z_M.shape[0]
    s_M = ref_smooth_step(z_M, g)
    rows = []
    for code in range(num_codes):
        bits = format(code, f"0{m}b")
        value = torch.ones((), dtype=z_M.dtype)
        for j in range(m):
            value = value * (s_M[j] if bits[j] == "1" else 1 - s_M[j])
        rows.append(value)
    return torch.stack(rows)


def ref_entropy(r_E: torch.Tensor) -> torch.Tensor:
    safe = torch.where(r_E > 0, r_E, torch.ones_like(r_E))
    return -(r_E * torch.log(safe)).sum()


def ref_gate(z_KM: torch.Tensor, w_K: torch.Tensor, num_experts: int, g: float):
    """(q_E over the real experts, sum_i H(r_i), sum_i -log(1 - mass of r_i on codes >= E), floored at 1e-6)."""
    num_codes = 2 ** z_KM.shape[1]
    mix_K = torch.exp(w_K - w_K.max()) / torch.exp(w_K - w_K.max()).sum()
    q_E = torch.zeros(num_experts, dtype=z_KM.dtype)
    entropy = penalty = torch.zeros((), dtype=z_KM.dtype)
    for i in range(z_KM.shape[0]):
        r_C = ref_selector(z_KM[i], num_codes, g)
        q_E = q_E + mix_K[i] * r_C[:num_experts]
        entropy = entropy + ref_entropy(r_C[:num_experts])
        if num_codes > num_experts:
            penalty = penalty - torch.log(torch.clamp(1 - r_C[num_experts:].sum(), min=1e-6))
    return q_E, entropy, penalty


def ref_static(z_XKM, w_XK, task_ids_T, num_experts, g, entropy_coef, nonexistent_coef):
    """q_TE and reg = entropy_coef * sum over tasks of H + nonexistent_coef * sum over tasks of penalty."""
    per_task = [ref_gate(z_XKM[x], w_XK[x], num_experts, g) for x in range(z_XKM.shape[0])]
    q_TE = torch.stack([per_task[int(x)][0] for x in task_ids_T]) if len(task_ids_T) else torch.zeros(0, num_experts)
    reg = sum(entropy_coef * h + nonexistent_coef * p for _, h, p in per_task)
    return q_TE, reg


def ref_per_example(
    x_TD, z_weight, z_bias, w_weight, w_bias, task_ids_T, k, m, num_experts, g, entropy_coef, nonexistent_coef
):
    """z_i,j = W_z[(task k + i) m + j] . x + b, w_i = W_w[task k + i] . x + b; reg averaged over tokens."""
    rows, reg = [], torch.zeros((), dtype=x_TD.dtype)
    for t in range(x_TD.shape[0]):
        task = int(task_ids_T[t])
        z_KM = torch.stack([
            torch.stack([
                torch.dot(z_weight[(task * k + i) * m + j], x_TD[t]) + z_bias[(task * k + i) * m + j] for j in range(m)
            ])
            for i in range(k)
        ])
        w_K = torch.stack([torch.dot(w_weight[task * k + i], x_TD[t]) + w_bias[task * k + i] for i in range(k)])
        q_E, h, p = ref_gate(z_KM, w_K, num_experts, g)
        rows.append(q_E)
        reg = reg + entropy_coef * h + nonexistent_coef * p
    return torch.stack(rows), reg / max(x_TD.shape[0], 1)


def leaf64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().requires_grad_(True)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, **kw) -> None:
    kw = {"atol": FP32_ATOL, "rtol": FP32_RTOL, **kw}
    torch.testing.assert_close(actual.double(), expected.double(), **kw)


# ---------------------------------------------------------------------------------------------
# Smooth step, codes, selectors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_smooth_step_values(gamma, dtype):
    g = gamma
    t = torch.tensor([-3 * g, -g, -g / 2, -g / 4, 0.0, g / 4, g / 2, g, 3 * g], dtype=dtype)
    # S(-g/4) = 1/32 - 3/8 + 1/2 = 5/32; S(g/4) = 27/32: the same numbers for every gamma.
    expected = torch.tensor([0, 0, 0, 5 / 32, 0.5, 27 / 32, 1, 1, 1], dtype=dtype)
    out = smooth_step(t, gamma)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, atol=1e-7 if dtype == torch.float32 else 1e-15, rtol=0)
    # Exactly 0 and 1 outside (-g/2, g/2), not merely close.
    assert (out[:3] == 0).all() and (out[-3:] == 1).all()
    dense = torch.linspace(-1.5 * g, 1.5 * g, 301, dtype=torch.float64)
    torch.testing.assert_close(smooth_step(dense, gamma), ref_smooth_step(dense, gamma), atol=1e-15, rtol=0)


@pytest.mark.parametrize("gamma", [1.0, 0.5, 2.0])
def test_smooth_step_continuous_with_zero_derivative_at_edges(gamma):
    g = gamma
    eps = 1e-6 * g
    t = torch.tensor([-g / 2 - eps, -g / 2 + eps, g / 2 - eps, g / 2 + eps], dtype=torch.float64)
    out = smooth_step(t, gamma)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64), atol=1e-10, rtol=0)
    # Gradient: exactly 0 at and beyond the edges, -6t^2/g^3 + 3/(2g) inside.
    t = torch.tensor([-2 * g, -g / 2, -0.3 * g, 0.0, 0.2 * g, g / 2, 5 * g], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(smooth_step(t, gamma).sum(), t)
    inside = -6 * t.detach() ** 2 / g**3 + 3 / (2 * g)
    expected = torch.where(t.detach().abs() < g / 2, inside, torch.zeros_like(inside))
    assert (grad[[0, 1, 5, 6]] == 0).all()
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=0)
    # The cubic's own derivative vanishes at the edges, so S is C^1.
    torch.testing.assert_close(-6 * (g / 2) ** 2 / g**3 + 3 / (2 * g), 0.0)


def test_gamma_changes_the_output():
    # LibMTL's port ignored gamma; here gamma sets the width of the transition.
    t = torch.tensor([0.2, -0.2, 0.4])
    assert not torch.allclose(smooth_step(t, 1.0), smooth_step(t, 0.5))
    assert (smooth_step(t, 0.5)[2] == 1) and (smooth_step(t, 1.0)[2] < 1)
    torch.manual_seed(0)
    wide = DSelectKGate(8, 2, gamma=2.0, num_tasks=2)
    narrow = DSelectKGate(8, 2, gamma=0.5, num_tasks=2)
    narrow.load_state_dict(wide.state_dict())
    with torch.no_grad():
        wide.z_logits.uniform_(-0.3, 0.3)
        narrow.z_logits.copy_(wide.z_logits)
    assert not torch.allclose(wide.task_weights(), narrow.task_weights())


@pytest.mark.parametrize("num_experts", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 64])
def test_binary_codes(num_experts):
    m = num_selector_bits(num_experts)
    assert m == ref_num_bits(num_experts)
    codes = binary_codes(num_experts, m)
    assert codes.shape == (num_experts, m) and codes.dtype == torch.bool
    expected = [[c == "1" for c in format(e, f"0{m}b")] for e in range(num_experts)]
    assert codes.tolist() == expected


@pytest.mark.parametrize("num_experts", [1, 2, 3, 4, 5, 7, 8, 16])
@pytest.mark.parametrize("gamma", [1.0, 0.5])
def test_selector_weights_match_reference(num_experts, gamma):
    torch.manual_seed(num_experts)
    m = num_selector_bits(num_experts)
    z_XM = (torch.rand(6, m, dtype=torch.float64) * 2 - 1) * gamma  # mixes saturated and smooth bits
    bits = binary_codes(num_experts, m).long()  # 0/1 ints are accepted too
    r_XE = selector_weights(z_XM, bits, gamma)
    expected = torch.stack([ref_selector(z, num_experts, gamma) for z in z_XM])
    torch.testing.assert_close(r_XE, expected, atol=1e-14, rtol=0)
    all_codes = selector_weights(z_XM, binary_codes(2**m, m), gamma)
    torch.testing.assert_close(all_codes.sum(-1), torch.ones(6, dtype=torch.float64), atol=1e-14, rtol=0)
    if num_experts == 2**m:  # power of two: r is a distribution over the experts
        torch.testing.assert_close(r_XE.sum(-1), torch.ones(6, dtype=torch.float64), atol=1e-14, rtol=0)


@pytest.mark.parametrize("gamma", [1.0, 0.5, 2.0, 0.75, 0.3])
def test_selector_weights_keep_relative_precision_near_the_edges(gamma):
    # 1 - S(z) just inside g/2 is ~1e-15: computed as 1 - S in fp32 it would round to 0 (and drop
    # an expert whose true weight is not 0). Exact rational arithmetic gives the reference, with
    # the gamma fp32 holds (0.3 is not exact in fp32: the edges sit at +-fp32(0.3)/2).
    g32 = torch.tensor(gamma, dtype=torch.float32)
    half = g32 / 2
    inner = torch.nextafter(half, torch.tensor(0.0))
    z_X1 = torch.stack([
        inner, torch.nextafter(inner, torch.tensor(0.0)), -inner, -half + 1e-4 * g32, half - 1e-3 * g32, half, -half,
    ])[:, None]
    r_XE = selector_weights(z_X1, binary_codes(2, 1), gamma)
    g = Fraction(g32.item())
    for z, (off, on) in zip(z_X1.flatten().tolist(), r_XE.tolist()):
        t = Fraction(z)
        exact_on = 0 if t <= -g / 2 else 1 if t >= g / 2 else -2 * t**3 / g**3 + 3 * t / (2 * g) + Fraction(1, 2)
        assert on == pytest.approx(float(exact_on), rel=1e-5, abs=0)
        assert off == pytest.approx(float(1 - exact_on), rel=1e-5, abs=0)


# ---------------------------------------------------------------------------------------------
# DSelectKGate against the transcription
# ---------------------------------------------------------------------------------------------

GATE_CASES = [
    # (E, k, tasks, gamma, T)
    (8, 2, 3, 1.0, 11),  # power of two
    (5, 3, 2, 0.5, 7),  # not a power of two, gamma != 1
    (7, 1, 1, 2.0, 1),  # prime E, k = 1, T = 1
    (4, 4, 2, 1.0, 6),  # k = E
    (3, 5, 2, 1.0, 5),  # k > E
    (1, 1, 1, 1.0, 3),  # E = 1: one bit, code 1 names no expert
]


@pytest.mark.parametrize("num_experts, k, num_tasks, gamma, num_tokens", GATE_CASES)
def test_static_gate_matches_reference(num_experts, k, num_tasks, gamma, num_tokens):
    torch.manual_seed(1)
    gate = DSelectKGate(num_experts, k, gamma=gamma, entropy_coef=0.1, nonexistent_coef=0.7, num_tasks=num_tasks)
    with torch.no_grad():
        gate.z_logits.uniform_(-0.8 * gamma, 0.8 * gamma)
        gate.w_logits.normal_()
    x_TD = torch.randn(num_tokens, 4)
    task_ids_T = torch.randint(num_tasks, (num_tokens,))
    cot_TE = torch.randn(num_tokens, num_experts)
    q_TE, reg = gate(x_TD, task_ids_T)
    assert q_TE.dtype == torch.float32 and q_TE.shape == (num_tokens, num_experts) and reg.shape == ()
    ((q_TE * cot_TE).sum() + reg).backward()

    z, w = leaf64(gate.z_logits), leaf64(gate.w_logits)
    ref_q, ref_reg = ref_static(z, w, task_ids_T, num_experts, gamma, 0.1, 0.7)
    ((ref_q * cot_TE.double()).sum() + ref_reg).backward()
    assert_close(q_TE, ref_q)
    assert_close(reg, ref_reg)
    assert_close(gate.z_logits.grad, z.grad)
    assert_close(gate.w_logits.grad, w.grad)
    if num_experts == 2 ** num_selector_bits(num_experts):
        assert_close(q_TE.sum(-1), torch.ones(num_tokens))


@pytest.mark.parametrize("num_experts, k, num_tasks, gamma, num_tokens", GATE_CASES[:4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_example_gate_matches_reference(num_experts, k, num_tasks, gamma, num_tokens, dtype):
    torch.manual_seed(2)
    d_model = 5
    gate = DSelectKGate(
        num_experts, k, gamma=gamma, entropy_coef=0.1, nonexistent_coef=0.7, gate="per_example",
        num_tasks=num_tasks, d_model=d_model,
    )
    with torch.no_grad():
        gate.z_proj.weight.normal_(std=0.4 * gamma)
        gate.w_proj.weight.normal_()
    x_TD = torch.randn(num_tokens, d_model).to(dtype).requires_grad_(True)
    task_ids_T = torch.randint(num_tasks, (num_tokens,))
    cot_TE = torch.randn(num_tokens, num_experts)
    q_TE, reg = gate(x_TD, task_ids_T)
    assert q_TE.dtype == torch.float32
    ((q_TE * cot_TE).sum() + reg).backward()

    x = leaf64(x_TD)
    params = [leaf64(p) for p in (gate.z_proj.weight, gate.z_proj.bias, gate.w_proj.weight, gate.w_proj.bias)]
    m = num_selector_bits(num_experts)
    ref_q, ref_reg = ref_per_example(x, *params, task_ids_T, k, m, num_experts, gamma, 0.1, 0.7)
    ((ref_q * cot_TE.double()).sum() + ref_reg).backward()
    assert_close(q_TE, ref_q)
    assert_close(reg, ref_reg)
    # The gradient arrives in x's dtype: bf16 rounds it to 8 bits.
    grad_tol = {"atol": 1e-5, "rtol": 2**-7} if dtype == torch.bfloat16 else {}
    assert_close(x_TD.grad, x.grad, **grad_tol)
    for param, expected in zip((gate.z_proj.weight, gate.z_proj.bias, gate.w_proj.weight, gate.w_proj.bias), params):
        assert_close(param.grad, expected.grad)


@pytest.mark.parametrize("num_experts, k", [(8, 2), (5, 3), (16, 4), (6, 6)])
def test_saturated_selectors_give_exactly_k_sparse_weights(num_experts, k):
    torch.manual_seed(3)
    gamma = 0.5
    gate = DSelectKGate(num_experts, k, gamma=gamma, num_tasks=4)
    m = num_selector_bits(num_experts)
    with torch.no_grad():
        # |z| >= g/2 everywhere, and every code < E so that no selector points at a non-existent expert.
        codes_XK = torch.randint(num_experts, (4, k))
        bits_XKM = binary_codes(2**m, m)[codes_XK]
        gate.z_logits.copy_(torch.where(bits_XKM, 1.0, -1.0) * (gamma / 2 + torch.rand(4, k, m) * gamma))
        gate.z_logits[0, 0, 0] = gamma / 2 if bits_XKM[0, 0, 0] else -gamma / 2  # exactly on an edge
        gate.w_logits.normal_()
    q_XE = gate.task_weights()
    mix_XK = torch.softmax(gate.w_logits.detach(), -1)
    for task in range(4):
        expected_E = torch.zeros(num_experts).index_add(0, codes_XK[task], mix_XK[task])
        assert (q_XE[task] > 0).sum() <= k
        assert (q_XE[task][expected_E == 0] == 0).all()  # exactly zero, not small
        assert_close(q_XE[task], expected_E)
        assert gate.selected_experts(task) == sorted(set(codes_XK[task].tolist()))
    assert_close(q_XE.sum(-1), torch.ones(4))
    out = gate.weights(torch.zeros(4, 1), torch.arange(4))
    assert out.entropy == 0 and out.nonexistent == 0 and out.reg_loss == 0


def test_zero_weights_have_exactly_zero_gradient():
    # Underflow in the mixture: selector 1 gives expert 0 r = 3e-8 (z just below g/2) and has softmax
    # weight e^-90 = 8e-40, so q_0 = 2.5e-47 rounds to 0 in fp32, while dq_0/dz = 8e-40 * dr_0/dz
    # (~5e-43) does not: the router drops expert 0, so that gradient must be exactly 0 as well.
    gate = DSelectKGate(2, 2, num_tasks=1)
    with torch.no_grad():
        gate.z_logits.copy_(torch.tensor([[[0.6], [0.4999]]]))
        gate.w_logits.copy_(torch.tensor([[0.0, -90.0]]))
    q_TE, _ = gate(torch.zeros(2, 3))
    assert q_TE[0, 0] == 0 and q_TE[0, 1] == 1
    q_TE[:, 0].sum().backward()
    assert (gate.z_logits.grad == 0).all() and (gate.w_logits.grad == 0).all()
    # Underflow in a selector: six factors S(z_j) ~ 7.5e-9 multiply to ~1e-49 for expert 63.
    gate = DSelectKGate(64, 1, num_tasks=1)
    with torch.no_grad():
        gate.z_logits.fill_(-0.49995)
    q_TE, _ = gate(torch.zeros(2, 3))
    assert q_TE[0, 63] == 0 and q_TE[0, 0] > 0
    q_TE[:, 63].sum().backward()
    assert (gate.z_logits.grad == 0).all() and (gate.w_logits.grad == 0).all()
    # A saturated mixture: gradient of every q == 0 entry, wrt z and w, is exactly 0.
    gate = DSelectKGate(5, 2, num_tasks=2)
    with torch.no_grad():
        z = [[[-0.5, 0.7, -0.6], [-0.9, -0.5, 0.5]], [[0.5, -0.5, -0.5], [-0.5, -0.2, 0.3]]]  # edges, saturated, smooth
        gate.z_logits.copy_(torch.tensor(z))
    q_TE, _ = gate(torch.zeros(2, 1), torch.tensor([0, 1]))
    dropped = q_TE == 0
    assert dropped.any() and (~dropped).any()
    (q_TE * dropped).sum().backward()
    assert (gate.z_logits.grad == 0).all() and (gate.w_logits.grad == 0).all()


# ---------------------------------------------------------------------------------------------
# Training: the selectors settle on at most k real experts
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """Hundreds of tiny steps: intra-op threads only add overhead (and contend on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_static_gate(gate: DSelectKGate, target_XE: torch.Tensor | None, steps: int) -> None:
    """Adam on 10 * ||q - target||^2 + reg per task (reg alone when target_XE is None).

    The task term is weighted 10x because the non-existent-code penalty keeps its official weight 1:
    at 1x, a selector heading for expert 4 of E = 5 (code 100, next to the non-existent 101, 110,
    111) was pushed back to expert 0 in 5 of 15 tried configurations; at 10x none was.
    """
    opt = torch.optim.Adam(gate.parameters(), lr=0.05)
    task_ids_T = torch.arange(gate.num_tasks)
    x_TD = torch.zeros(gate.num_tasks, 1)
    for _ in range(steps):
        q_TE, reg = gate(x_TD, task_ids_T)
        loss = reg if target_XE is None else 10 * (q_TE - target_XE).square().sum() + reg
        opt.zero_grad()
        loss.backward()
        opt.step()


def codes_mass_beyond(gate: DSelectKGate) -> torch.Tensor:
    """(X, k) mass of each selector on the codes >= E."""
    m = gate.num_bits
    return selector_weights(gate.z_logits.detach(), binary_codes(2**m, m), gate.gamma)[..., gate.num_experts :].sum(-1)


@pytest.mark.parametrize(
    "num_experts, wanted",
    [
        # Not a power of two: 4 = 100 borders the non-existent 101, 110, 111 (and 5 = 101 borders 110, 111).
        (5, [[1, 4], [0, 3], [4], [2, 4], [3, 4]]),
        (6, [[1, 5], [4], [0, 5]]),
        (8, [[2, 7], [0, 5], [6]]),
    ],
)
def test_training_selects_at_most_k_real_experts(num_experts, wanted, one_thread):
    torch.manual_seed(4)
    k = 2
    gate = DSelectKGate(num_experts, k, entropy_coef=0.05, num_tasks=len(wanted))
    target_XE = torch.zeros(len(wanted), num_experts)
    for task, experts in enumerate(wanted):
        target_XE[task, experts] = 1.0 / len(experts)
    train_static_gate(gate, target_XE, steps=300)
    q_XE = gate.task_weights()
    for task, experts in enumerate(wanted):
        assert gate.selected_experts(task) == experts
        others = [e for e in range(num_experts) if e not in experts]
        assert (q_XE[task, others] == 0).all()  # exactly zero: those experts never run
        assert_close(q_XE[task], target_XE[task], atol=1e-3, rtol=0)
    assert (codes_mass_beyond(gate) == 0).all()
    out = gate.weights(torch.zeros(1, 1), torch.zeros(1, dtype=torch.int64))
    assert out.entropy == 0 and out.nonexistent == 0  # every selector saturated on one real expert


@pytest.mark.parametrize("num_experts", [3, 5, 6])
def test_nonexistent_penalty_keeps_selectors_on_real_experts(num_experts, one_thread):
    # With the regulariser alone, the entropy over the real experts falls to 0 on a non-existent
    # code too; without the penalty, selectors collapse there and q loses its mass.
    torch.manual_seed(5)
    kept = DSelectKGate(num_experts, 3, entropy_coef=0.1, num_tasks=4)
    lost = DSelectKGate(num_experts, 3, entropy_coef=0.1, nonexistent_coef=0.0, num_tasks=4)
    lost.load_state_dict(kept.state_dict())
    train_static_gate(kept, None, steps=300)
    train_static_gate(lost, None, steps=300)
    assert (codes_mass_beyond(kept) == 0).all()
    assert_close(kept.task_weights().sum(-1), torch.ones(4))
    assert all(1 <= len(kept.selected_experts(t)) <= 3 for t in range(4))
    assert (codes_mass_beyond(lost) > 0.5).any()


def test_entropy_regulariser_reaches_every_task():
    # LibMTL's port regularised only the last task's selectors.
    torch.manual_seed(6)
    gate = DSelectKGate(8, 2, entropy_coef=1.0, num_tasks=3)
    q_TE, reg = gate(torch.zeros(4, 2), torch.zeros(4, dtype=torch.int64))  # a batch of task 0 only
    reg.backward()
    for task in range(3):
        assert gate.z_logits.grad[task].abs().min() > 0
    z = leaf64(gate.z_logits)
    expected = sum(ref_gate(z[x], leaf64(gate.w_logits)[x], 8, 1.0)[1] for x in range(3))
    expected.backward()
    assert_close(reg, expected)
    assert_close(gate.z_logits.grad, z.grad)


# ---------------------------------------------------------------------------------------------
# DSelectKRouter: the router interface and MoELayer
# ---------------------------------------------------------------------------------------------


def test_router_routing_fields():
    torch.manual_seed(7)
    router = DSelectKRouter(6, 5, 2, 3, entropy_coef=0.1)
    with torch.no_grad():
        router.gate.z_logits.copy_(torch.sign(torch.randn(3, 2, 3)) * 0.75)
        router.gate.z_logits[2].uniform_(-0.2, 0.2)  # task 2 still smooth: every expert runs
    x_TD = torch.randn(9, 6, dtype=torch.bfloat16)
    task_ids_T = torch.tensor([0, 1, 2, 2, 1, 0, 0, 1, 2])
    routing = router(x_TD, RoutingContext(task_ids_T=task_ids_T))
    q_TE = router.gate.task_weights()[task_ids_T]
    assert router.top_k == 5 and router.k == 2 and router.num_experts == 5
    assert routing.top_k == 5 and routing.num_experts == 5 and routing.capacity == 9
    assert routing.weights_TK.dtype == torch.float32 and routing.experts_TK.dtype == torch.int64
    assert torch.equal(routing.weights_TK, q_TE) and torch.equal(routing.scores_TE, q_TE)
    expected_experts = torch.where(q_TE > 0, torch.arange(5), -1)
    assert torch.equal(routing.experts_TK, expected_experts)
    assert (routing.experts_TK == -1).any() and (routing.experts_TK[task_ids_T == 2] >= 0).all()
    assert set(routing.aux_terms) == {"dselect_entropy", "dselect_nonexistent"}
    assert not routing.aux_terms["dselect_entropy"].requires_grad
    out = router.gate.weights(x_TD, task_ids_T)
    assert_close(routing.aux_loss, 0.1 * out.entropy + out.nonexistent)
    for task in range(3):
        assert router.selected_experts(task) == torch.nonzero(router.gate.task_weights()[task]).flatten().tolist()
    assert set(DSelectKRouter(4, 8, 2, 1)(torch.randn(3, 4)).aux_terms) == {"dselect_entropy"}  # X = 1: ids optional


@pytest.mark.parametrize("gate_kind", ["static", "per_example"])
def test_router_empty_batch_and_autocast(gate_kind):
    torch.manual_seed(9)
    router = DSelectKRouter(4, 5, 2, 2, gate=gate_kind)
    layer = MoELayer(router, GroupedExperts(5, 4, 3))
    x_TD = torch.zeros(0, 4, requires_grad=True)
    out = layer(x_TD, RoutingContext(task_ids_T=torch.zeros(0, dtype=torch.int64)))
    (out.y.sum() + out.aux_loss).backward()
    assert out.y.shape == (0, 4) and out.routing.capacity == 0
    assert torch.equal(out.tokens_per_expert_E, torch.zeros(5, dtype=torch.int64))
    assert torch.isfinite(out.aux_loss)
    x_TD = torch.randn(3, 4)
    ctx = RoutingContext(task_ids_T=torch.tensor([0, 1, 1]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = router(x_TD, ctx)
    expected = router(x_TD, ctx)
    assert routing.weights_TK.dtype == torch.float32 and routing.aux_loss.dtype == torch.float32
    torch.testing.assert_close(routing.weights_TK, expected.weights_TK, atol=0, rtol=0)


def dense_reference(router: DSelectKRouter, layer: MoELayer, x_TD, task_ids_T):
    """y_t = sum_e q_te expert_e(x_t) over ALL experts, and the aux loss, in float64 with leaf tensors."""
    gate = router.gate
    x = leaf64(x_TD)
    experts_in, experts_out = leaf64(layer.experts.w_in), leaf64(layer.experts.w_out)
    if gate.kind == "static":
        params = [leaf64(gate.z_logits), leaf64(gate.w_logits)]
        q_TE, aux = ref_static(
            *params, task_ids_T, gate.num_experts, gate.gamma, gate.entropy_coef, gate.nonexistent_coef
        )
    else:
        params = [leaf64(p) for p in (gate.z_proj.weight, gate.z_proj.bias, gate.w_proj.weight, gate.w_proj.bias)]
        q_TE, aux = ref_per_example(
            x, *params, task_ids_T, gate.k, gate.num_bits, gate.num_experts, gate.gamma, gate.entropy_coef,
            gate.nonexistent_coef,
        )
    y_TD = torch.stack([
        sum(q_TE[t, e] * ref.mlp(x[t], experts_in[e], experts_out[e], "swiglu") for e in range(gate.num_experts))
        for t in range(x.shape[0])
    ])
    return y_TD, aux, x, params, (experts_in, experts_out)


@pytest.mark.parametrize(
    "gate_kind, saturated",
    [("static", False), ("static", True), ("per_example", False), ("per_example", True)],
)
def test_moe_layer_matches_dense_reference(gate_kind, saturated):
    torch.manual_seed(8)
    d_model, ffn, num_experts, k, num_tasks, num_tokens = 6, 5, 5, 2, 3, 9
    router = DSelectKRouter(d_model, num_experts, k, num_tasks, entropy_coef=0.05, gate=gate_kind)
    layer = MoELayer(router, GroupedExperts(num_experts, d_model, ffn))
    gate = router.gate
    with torch.no_grad():
        if gate_kind == "static":
            if saturated:  # task 0 selects experts 1 and 2 only; task 1 and 2 one expert each (3 and 0)
                z = torch.tensor([[[-1, -1, 1], [-1, 1, -1]], [[-1, 1, 1], [-1, 1, 1]], [[-1, -1, -1], [-1, -1, -1]]])
                gate.z_logits.copy_(0.6 * z)
            else:
                gate.z_logits.uniform_(-0.4, 0.4)
            gate.w_logits.normal_()
        else:
            gate.z_proj.weight.normal_(std=2.0 if saturated else 0.1)
            gate.w_proj.weight.normal_()
    x_TD = torch.randn(num_tokens, d_model, requires_grad=True)
    task_ids_T = torch.tensor([0, 1, 2, 0, 0, 1, 2, 2, 0])
    out = layer(x_TD, RoutingContext(task_ids_T=task_ids_T))
    cot_TD = torch.randn(num_tokens, d_model)
    ((out.y * cot_TD).sum() + out.aux_loss).backward()

    dropped_TE = out.routing.weights_TK == 0
    if saturated:
        assert dropped_TE.any()
        idle = [e for e in range(num_experts) if dropped_TE[:, e].all()]
        counts = out.tokens_per_expert_E
        assert torch.equal(counts, (~dropped_TE).sum(0))  # only the experts with q > 0 got rows
        if gate_kind == "static":  # every bit saturated: at most k experts per token
            assert (dropped_TE.sum(-1) >= num_experts - k).all()
            assert idle == [4] and torch.equal(counts, torch.tensor([3, 4, 4, 2, 0]))
            assert (layer.experts.w_in.grad[4] == 0).all() and (layer.experts.w_out.grad[4] == 0).all()
    else:
        assert not dropped_TE.any()

    # The per-token loop over the routing's choices (reference_moe's y_t = sum_k w_tk expert_{e_tk}(x_t)).
    w_in, w_out = layer.experts.w_in.detach(), layer.experts.w_out.detach()
    loop_TD = torch.stack([
        sum(
            (out.routing.weights_TK[t, c] * ref.mlp(x_TD[t].detach(), w_in[e], w_out[e], "swiglu")
             for c, e in enumerate(out.routing.experts_TK[t].tolist()) if e >= 0),
            torch.zeros(d_model),
        )
        for t in range(num_tokens)
    ])
    assert_close(out.y, loop_TD.detach())

    # Dropping the q == 0 experts loses no gradient: every gradient equals the dense computation's.
    ref_y, ref_aux, x, params, experts = dense_reference(router, layer, x_TD, task_ids_T)
    ((ref_y * cot_TD.double()).sum() + ref_aux).backward()
    assert_close(out.y, ref_y)
    assert_close(out.aux_loss, ref_aux)
    assert_close(x_TD.grad, x.grad)
    gate_params = [gate.z_logits, gate.w_logits] if gate_kind == "static" else [
        gate.z_proj.weight, gate.z_proj.bias, gate.w_proj.weight, gate.w_proj.bias
    ]
    for param, expected in zip(gate_params, params):
        assert_close(param.grad, expected.grad)
    assert_close(layer.experts.w_in.grad, experts[0].grad)
    assert_close(layer.experts.w_out.grad, experts[1].grad)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_experts": 4, "k": 0}, r"k = 0: must be >= 1"),
        ({"num_experts": 0, "k": 1}, r"num_experts = 0: must be >= 1"),
        ({"num_experts": 4, "k": 2, "gamma": 0.0}, r"gamma = 0.0: must be a finite number > 0"),
        ({"num_experts": 4, "k": 2, "gamma": -1.0}, r"gamma = -1.0: must be a finite number > 0"),
        ({"num_experts": 4, "k": 2, "gamma": float("nan")}, r"gamma = nan"),
        ({"num_experts": 4, "k": 2, "entropy_coef": -1.0}, r"entropy_coef = -1.0: must be a finite number >= 0"),
        ({"num_experts": 4, "k": 2, "nonexistent_coef": float("inf")}, r"nonexistent_coef = inf"),
        ({"num_experts": 4, "k": 2, "gate": "dynamic"}, r"gate = 'dynamic': allowed: static, per_example"),
        ({"num_experts": 4, "k": 2, "num_tasks": 0}, r"num_tasks = 0: must be >= 1"),
        ({"num_experts": 4, "k": 2, "gate": "per_example"}, r"d_model = None: the per_example gate needs d_model >= 1"),
    ],
)
def test_gate_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DSelectKGate(**kwargs)


def test_router_errors():
    with pytest.raises(ValueError, match=r"d_model = 0: must be >= 1"):
        DSelectKRouter(0, 4, 2, 2)
    with pytest.raises(ValueError, match=r"k = 0: must be >= 1"):
        DSelectKRouter(4, 4, 0, 2)
    router = DSelectKRouter(4, 5, 2, 2, gate="per_example")
    x_TD = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"DSelectKRouter needs RoutingContext.task_ids_T .*got None"):
        router(x_TD)
    with pytest.raises(ValueError, match=r"DSelectKRouter needs RoutingContext.task_ids_T"):
        router(x_TD, RoutingContext())
    with pytest.raises(ValueError, match=r"task_ids_T has values in \[0, 2\]: allowed \[0, 1\]"):
        router(x_TD, RoutingContext(task_ids_T=torch.tensor([0, 1, 2])))
    with pytest.raises(ValueError, match=r"task_ids_T has shape \(2,\): expected \(3,\)"):
        router(x_TD, RoutingContext(task_ids_T=torch.tensor([0, 1])))
    with pytest.raises(ValueError, match=r"x_TD has width 3: expected d_model = 4"):
        router(torch.randn(3, 3), RoutingContext(task_ids_T=torch.tensor([0, 1, 1])))
    with pytest.raises(ValueError, match=r"x_TD has shape \(3,\): expected \(T, D\)"):
        router(torch.randn(3), RoutingContext(task_ids_T=torch.tensor([0, 1, 1])))
    with pytest.raises(ValueError, match=r"DSelectKGate needs RoutingContext.task_ids_T"):
        router.gate(x_TD)
    with pytest.raises(ValueError, match=r"task_weights: gate = 'per_example' has no per-task weights"):
        router.selected_experts(0)
    with pytest.raises(ValueError, match=r"task = 2: allowed \[0, 1\] \(2 tasks\)"):
        DSelectKRouter(4, 5, 2, 2).selected_experts(2)
