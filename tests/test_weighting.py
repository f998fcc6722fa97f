"""Tests of moe_engine.mtl.weighting (multi-task loss weighting) and moe_engine.mtl.delta_p.

Each gradient method is checked against a computation that does not use its solver: explicit
vector projections (PCGrad), a brute-force search over a fine simplex grid (MGDA, CAGrad), the
defining property of the result (IMTL-G's equal projections, MGDA's KKT conditions, Nash-MTL's
bargaining equations, CAGrad's primal problem), and hand-worked formulas (DWA, UW, GradNorm).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from moe_engine.mtl.delta_p import delta_p
from moe_engine.mtl.weighting import METHODS, build_weighting, gram_matrix, method_options, solvers, task_gradients

ALL_PRESENT3 = torch.tensor([True, True, True])


def random_grads(T: int, D: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(T, D))


def weights_of(method: str, grads_TD: np.ndarray, present=None, losses=None, **options) -> np.ndarray:
    """The float64 weights of one combine call on the Gram of grads_TD."""
    T = len(grads_TD)
    weighting = build_weighting(method, T, **options)
    present = torch.ones(T, dtype=torch.bool) if present is None else present
    losses = torch.ones(T, dtype=torch.float64, requires_grad=True) if losses is None else losses
    _, weights = weighting.combine(losses, present, torch.from_numpy(grads_TD @ grads_TD.T))
    return weights.numpy()


def simplex_grid(T: int, steps: int) -> np.ndarray:
    """(N, T) all points of the simplex with coordinates in multiples of 1/steps."""
    if T == 2:
        a = np.arange(steps + 1) / steps
        return np.stack([a, 1 - a], axis=1)
    rows = [(i, j, steps - i - j) for i in range(steps + 1) for j in range(steps + 1 - i)]
    return np.array(rows, dtype=np.float64) / steps


# ---- build_weighting and argument checks -------------------------------------------------------


def test_build_every_method_and_options():
    for name in METHODS:
        weighting = build_weighting(name, 3)
        assert weighting.method == name and weighting.num_tasks == 3
        assert "world_size" in method_options(name)
    assert method_options("dwa") == {"world_size": 1, "temperature": 2.0, "window": 20}
    assert method_options("mgda")["normalization"] == "none"
    assert method_options("nash_mtl") == {"world_size": 1, "max_norm": 1.0, "update_every": 1}


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("adam", {}, "expected one of equal, uncertainty, dwa"),
        ("dwa", {"temp": 2.0}, "no option 'temp': its options are world_size, temperature, window"),
        ("dwa", {"temperature": 0.0}, "temperature = 0.0"),
        ("dwa", {"window": 0}, "window = 0"),
        ("pcgrad", {"reduction": "max"}, "reduction = 'max': expected one of 'mean', 'sum'"),
        ("mgda", {"normalization": "l1"}, "normalization = 'l1'"),
        ("mgda", {"solver": "qp"}, "solver = 'qp'"),
        ("cagrad", {"c": -1.0}, "c = -1.0"),
        ("cagrad", {"rescale": 3}, "rescale = 3"),
        ("imtl", {"mode": "both"}, "mode = 'both'"),
        ("nash_mtl", {"update_every": 0}, "update_every = 0"),
        ("gradnorm", {"alpha": float("nan")}, "alpha = nan"),
        ("equal", {"world_size": 0}, "world_size = 0"),
    ],
)
def test_bad_names_and_options_are_named(name, options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_weighting(name, 3, **options)


def test_bad_num_tasks():
    with pytest.raises(ValueError, match="num_tasks = 0"):
        build_weighting("equal", 0)


@pytest.mark.parametrize("name", METHODS)
def test_shape_errors(name):
    weighting = build_weighting(name, 3)
    losses, gram = torch.ones(3), torch.eye(3)
    with pytest.raises(ValueError, match=r"losses_T: expected a float tensor of shape \(3,\)"):
        weighting.combine(torch.ones(2), ALL_PRESENT3, gram)
    with pytest.raises(ValueError, match="present_T: expected a bool tensor"):
        weighting.combine(losses, torch.ones(3), gram)
    with pytest.raises(ValueError, match=r"gram_TT: expected a float tensor of shape \(3, 3\)"):
        weighting.combine(losses, ALL_PRESENT3, torch.eye(2))
    with pytest.raises(ValueError, match="global_losses_T"):
        weighting.observe(torch.ones(4), ALL_PRESENT3)
    if weighting.needs_gram:
        with pytest.raises(ValueError, match=f"{name} needs gram_TT"):
            weighting.combine(losses, ALL_PRESENT3)
    else:
        weighting.combine(losses, ALL_PRESENT3)  # no Gram needed


def test_imtl_loss_mode_needs_no_gram():
    assert not build_weighting("imtl", 2, mode="loss").needs_gram
    assert build_weighting("imtl", 2, mode="gradient").needs_gram


# ---- every method: absent tasks, no task, non-finite Gram, dtypes ------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_absent_task_gets_weight_zero_and_no_gradient(name):
    grads = random_grads(4, 6, seed=1)
    grads[2] = 0.0  # absent tasks have zero Gram rows
    weighting = build_weighting(name, 4)
    present = torch.tensor([True, True, False, True])
    losses = torch.tensor([0.5, 1.0, float("nan"), 2.0], dtype=torch.float64, requires_grad=True)
    loss, weights = weighting.combine(losses, present, torch.from_numpy(grads @ grads.T))
    assert weights[2] == 0 and torch.isfinite(loss)
    loss.backward()
    assert losses.grad[2] == 0 and torch.isfinite(losses.grad).all()
    for param in weighting.parameters():
        assert param.grad is None or param.grad[2] == 0


@pytest.mark.parametrize("name", METHODS)
def test_absent_task_does_not_disturb_state(name):
    """Several steps with task 2 absent leave every per-task state entry of task 2 as it was."""
    T = 3
    weighting = build_weighting(name, T, **({"window": 1} if name == "dwa" else {}))
    optimizer = torch.optim.SGD(weighting.parameters(), lr=0.1) if list(weighting.parameters()) else None
    rng = np.random.default_rng(0)

    def step(present):
        grads = rng.normal(size=(T, 5)) * present.numpy()[:, None]
        losses = torch.tensor(rng.uniform(0.5, 2.0, size=T), requires_grad=True)
        if optimizer:
            optimizer.zero_grad()
        loss, _ = weighting.combine(losses, present, torch.from_numpy(grads @ grads.T))
        loss.backward()
        if optimizer:
            optimizer.step()
        weighting.after_optimizer_step()
        weighting.observe(losses.detach(), present)

    for _ in range(3):
        step(ALL_PRESENT3)
    state = weighting.state_dict()
    before = {k: v.clone() for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == (T,)}
    for _ in range(4):
        step(torch.tensor([True, True, False]))
    after = weighting.state_dict()
    for key, value in before.items():
        if key in ("last_present_T", "solved_present_T"):  # records of which tasks were present
            continue
        torch.testing.assert_close(after[key][2], value[2], rtol=0, atol=0, equal_nan=True, msg=key)


@pytest.mark.parametrize("name", METHODS)
def test_no_task_present(name):
    weighting = build_weighting(name, 2)
    losses = torch.ones(2, requires_grad=True)
    loss, weights = weighting.combine(losses, torch.zeros(2, dtype=torch.bool))  # no Gram needed either
    assert loss.item() == 0 and weights.tolist() == [0.0, 0.0]
    loss.backward()
    assert losses.grad.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("name", [m for m in METHODS if build_weighting(m, 2).needs_gram])
def test_non_finite_gram_gives_nan_and_keeps_state(name):
    weighting = build_weighting(name, 2)
    state = copy.deepcopy(weighting.state_dict())
    losses = torch.ones(2, requires_grad=True)
    gram = torch.tensor([[1.0, float("nan")], [0.5, 1.0]])
    loss, weights = weighting.combine(losses, torch.tensor([True, True]), gram)
    assert torch.isnan(weights).all() and torch.isnan(loss)
    loss.backward()
    assert torch.isnan(losses.grad).all()  # the trainer's gradient-norm guard stops the step
    for key, value in weighting.state_dict().items():
        if key == "_extra_state":
            assert torch.equal(value["generator_state"], state[key]["generator_state"])
        else:
            torch.testing.assert_close(value, state[key], rtol=0, atol=0, equal_nan=True)


DEGENERATE = {
    "identical": np.array([[1.0, 2.0]] * 3),
    "more tasks than dimensions": np.random.default_rng(0).normal(size=(4, 2)),
    "one zero gradient": np.array([[1.0, 0.0], [0.0, 0.0], [0.5, 1.0]]),
    "all zero (frozen shared parameters)": np.zeros((3, 2)),
    "opposite pair": np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]),
}


@pytest.mark.parametrize("case", DEGENERATE)
@pytest.mark.parametrize("name", [m for m in METHODS if build_weighting(m, 2).needs_gram])
def test_degenerate_grams_give_finite_weights(name, case):
    grads = DEGENERATE[case]
    with np.errstate(all="raise"):
        weights = weights_of(name, grads)
    assert np.isfinite(weights).all()
    if name in ("mgda", "imtl"):
        assert weights.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_losses(name, dtype):
    grads = random_grads(3, 5, seed=2)
    gram = torch.from_numpy(grads @ grads.T).float()
    reference = build_weighting(name, 3)
    weighting = build_weighting(name, 3)
    losses64 = torch.tensor([0.7, 1.3, 2.1], dtype=torch.float64)
    loss_ref, w_ref = reference.combine(losses64, ALL_PRESENT3, gram)
    loss, weights = weighting.combine(losses64.to(dtype), ALL_PRESENT3, gram)
    assert loss.dtype == dtype and weights.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(weights.double(), w_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(loss.double(), loss_ref, rtol=tol, atol=tol)


# ---- EW ----------------------------------------------------------------------------------------


def test_equal_is_the_mean_of_present_tasks():
    weighting = build_weighting("equal", 4)
    losses = torch.tensor([1.0, 2.0, 3.0, 10.0], requires_grad=True)
    loss, weights = weighting.combine(losses, torch.tensor([True, True, True, False]))
    assert loss.item() == pytest.approx(2.0)
    assert weights.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0])


# ---- PCGrad ------------------------------------------------------------------------------------


def explicit_pcgrad(grads_TD: np.ndarray, orders) -> np.ndarray:
    """PCGrad on the vectors themselves: (T, D) projected gradients."""
    projected = grads_TD.copy()
    for i, order in enumerate(orders):
        for j in order:
            dot = projected[i] @ grads_TD[j]
            if dot < 0:
                projected[i] = projected[i] - dot / (grads_TD[j] @ grads_TD[j]) * grads_TD[j]
    return projected


def test_pcgrad_two_tasks_by_hand():
    # g1 = (1, 0), g2 = (-1, 1): g1^PC = (0.5, 0.5) = g1 + g2 / 2, g2^PC = (0, 1) = g1 + g2; mean = g1 + 0.75 g2
    grads = np.array([[1.0, 0.0], [-1.0, 1.0]])
    assert weights_of("pcgrad", grads) == pytest.approx([1.0, 0.75])
    assert weights_of("pcgrad", grads, reduction="sum") == pytest.approx([2.0, 1.5])


@pytest.mark.parametrize("seed", range(4))
def test_pcgrad_coefficients_match_explicit_projections(seed):
    grads = random_grads(5, 7, seed)
    orders = [list(np.random.default_rng(seed + i).permutation([j for j in range(5) if j != i])) for i in range(5)]
    coef = solvers.pcgrad_coefficients(grads @ grads.T, orders)
    np.testing.assert_allclose(coef @ grads, explicit_pcgrad(grads, orders), atol=1e-12)


def test_pcgrad_without_conflict_is_equal_weighting():
    grads = np.abs(random_grads(4, 6, seed=3))  # all inner products positive
    np.testing.assert_allclose(weights_of("pcgrad", grads), weights_of("equal", grads))


def test_pcgrad_orders_from_the_seeded_generator():
    """The method's direction equals explicit projections in the orders its generator draws."""
    grads = random_grads(4, 3, seed=4)
    present = torch.tensor([True, False, True, True])
    grads[1] = 0.0
    generator = torch.Generator().manual_seed(7)
    index = [0, 2, 3]
    orders = []
    for i in range(3):
        others = [j for j in range(3) if j != i]
        orders.append([others[k] for k in torch.randperm(2, generator=generator).tolist()])
    expected = explicit_pcgrad(grads[index], orders).mean(axis=0)
    weights = weights_of("pcgrad", grads, present=present, seed=7)
    np.testing.assert_allclose(weights @ grads, expected, atol=1e-12)
    assert weights[1] == 0


# ---- MGDA --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "grads",
    [
        np.array([[1.0, 0.0], [0.0, 2.0]]),  # interior: gamma = 4/5
        np.array([[1.0, 0.0], [3.0, 1.0]]),  # <g1, g2> >= |g1|^2: all weight on g1
        np.array([[2.0, 1.0], [-1.0, 0.5]]),  # obtuse
        np.array([[1.0, 1.0], [1.0, 1.0]]),  # equal vectors
    ],
)
def test_mgda_two_tasks_closed_form(grads):
    g11, g12, g22 = grads[0] @ grads[0], grads[0] @ grads[1], grads[1] @ grads[1]
    gamma = np.clip((g22 - g12) / (g11 + g22 - 2 * g12), 0, 1) if g11 + g22 - 2 * g12 > 0 else 0.5
    for solver in ("frank_wolfe", "exact"):
        np.testing.assert_allclose(weights_of("mgda", grads, solver=solver), [gamma, 1 - gamma], atol=1e-12)
    # and the brute-force minimum over a fine grid of the segment
    grid = simplex_grid(2, 10000)
    norms = np.linalg.norm(grid @ grads, axis=1)
    assert np.linalg.norm(np.array([gamma, 1 - gamma]) @ grads) <= norms.min() + 1e-12


def kkt_violation(gram: np.ndarray, gamma: np.ndarray) -> float:
    """Largest violation of the min-norm KKT conditions, relative to max |g|^2: <g_t, d> >= |d|^2 for all t,
    with equality where gamma_t > 0."""
    dots = gram @ gamma
    d2 = gamma @ dots
    lower = max(0.0, d2 - dots.min())
    support = gamma > 1e-9
    equality = np.abs(dots[support] - d2).max()
    return max(lower, equality) / np.diag(gram).max()


@pytest.mark.parametrize("seed", range(5))
def test_mgda_three_tasks_brute_force_and_kkt(seed):
    grads = random_grads(3, 2 + seed % 3, seed)
    grid = simplex_grid(3, 300)
    best = (np.linalg.norm(grid @ grads, axis=1) ** 2).min()
    gram = grads @ grads.T
    exact = weights_of("mgda", grads, solver="exact")
    assert exact.min() >= 0 and exact.sum() == pytest.approx(1)
    d2 = exact @ gram @ exact
    assert d2 <= best + 1e-12 and best - d2 <= 1e-3 * np.diag(gram).max()
    assert kkt_violation(gram, exact) < 1e-9
    fw = weights_of("mgda", grads)  # Sener's Frank-Wolfe: O(1/k), the official 250 steps
    assert fw @ gram @ fw <= best + 1e-3 * np.diag(gram).max()
    assert max(0.0, fw @ gram @ fw - (gram @ fw).min()) < 5e-3 * np.diag(gram).max()


@pytest.mark.parametrize("normalization", ["l2", "loss", "loss+"])
def test_mgda_normalisation(normalization):
    grads = random_grads(3, 4, seed=9)
    losses = np.array([0.5, 2.0, 4.0])
    norms = np.linalg.norm(grads, axis=1)
    n = {"l2": norms, "loss": losses, "loss+": losses * norms}[normalization]
    unit = grads / n[:, None]
    expected_gamma = solvers.min_norm_exact(unit @ unit.T)
    weighting = build_weighting("mgda", 3, normalization=normalization, solver="exact")
    gram = torch.from_numpy(grads @ grads.T)
    # the losses of this step given to combine ...
    ones = torch.ones(3, dtype=torch.float64)
    _, weights = weighting.combine(ones, ALL_PRESENT3, gram, global_losses_T=torch.from_numpy(losses))
    np.testing.assert_allclose(weights.numpy(), expected_gamma / n, atol=1e-12)
    # ... or the last observed ones
    weighting.observe(torch.from_numpy(losses), ALL_PRESENT3)
    _, weights = weighting.combine(torch.ones(3, dtype=torch.float64), ALL_PRESENT3, gram)
    np.testing.assert_allclose(weights.numpy(), expected_gamma / n, atol=1e-12)


def test_min_norm_exact_many_random_problems():
    rng = np.random.default_rng(0)
    for _ in range(200):
        T, D = rng.integers(1, 9), rng.integers(1, 8)
        grads = rng.normal(size=(T, D))
        gamma = solvers.min_norm_exact(grads @ grads.T)
        assert gamma.min() >= 0 and gamma.sum() == pytest.approx(1)
        assert kkt_violation(grads @ grads.T, gamma) < 1e-9


# ---- CAGrad ------------------------------------------------------------------------------------


def cagrad_brute_force(grads: np.ndarray, c: float, steps: int) -> np.ndarray:
    """The official CAGrad direction with w from a grid search of its simplex objective."""
    T = len(grads)
    g0 = grads.mean(axis=0)
    grid = simplex_grid(T, steps)
    gw = grid @ grads
    objective = gw @ g0 + c * np.linalg.norm(g0) * np.linalg.norm(gw, axis=1)
    w = grid[np.argmin(objective)]
    gw_best = w @ grads
    return (g0 + c * np.linalg.norm(g0) / np.linalg.norm(gw_best) * gw_best) / (1 + c * c)


@pytest.mark.parametrize("T, steps", [(2, 20000), (3, 400)])
@pytest.mark.parametrize("seed", range(3))
def test_cagrad_against_brute_force(T, steps, seed):
    grads = random_grads(T, 5, seed + 10)
    direction = weights_of("cagrad", grads) @ grads
    expected = cagrad_brute_force(grads, 0.5, steps)
    np.testing.assert_allclose(direction, expected, atol=2e-2 * np.linalg.norm(expected))


@pytest.mark.parametrize("seed", range(3))
def test_cagrad_solves_its_primal_problem(seed):
    """(1 + c^2) d maximises min_t <g_t, d> over the ball |d - g0| <= c |g0| (the paper's problem)."""
    c = 0.5
    grads = random_grads(3, 4, seed + 20)
    g0 = grads.mean(axis=0)
    d = (weights_of("cagrad", grads, c=c) @ grads) * (1 + c * c)
    assert np.linalg.norm(d - g0) == pytest.approx(c * np.linalg.norm(g0), rel=1e-6)
    value = (grads @ d).min()
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(20000, 4))
    directions *= (rng.uniform(size=(20000, 1)) ** 0.25) / np.linalg.norm(directions, axis=1, keepdims=True)
    candidates = g0 + c * np.linalg.norm(g0) * directions
    assert value >= (candidates @ grads.T).min(axis=1).max() - 1e-6


def test_cagrad_c_zero_and_rescale():
    grads = random_grads(3, 4, seed=5)
    np.testing.assert_allclose(weights_of("cagrad", grads, c=0.0), [1 / 3] * 3, atol=1e-12)
    plain = weights_of("cagrad", grads, rescale=0)
    np.testing.assert_allclose(weights_of("cagrad", grads, rescale=1) * 1.25, plain, rtol=1e-10)
    np.testing.assert_allclose(weights_of("cagrad", grads, rescale=2) * 1.5, plain, rtol=1e-10)


# ---- IMTL --------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [2, 3, 5])
def test_imtl_g_equal_projections(T):
    grads = random_grads(T, 7, seed=T)
    alpha = weights_of("imtl", grads, mode="gradient")
    assert alpha.sum() == pytest.approx(1.0, abs=1e-12)
    d = alpha @ grads
    projections = grads @ d / np.linalg.norm(grads, axis=1)
    np.testing.assert_allclose(projections, projections[0], rtol=1e-9)


def test_imtl_hybrid_scales_the_gradients_and_learns_the_scales():
    grads = random_grads(3, 5, seed=11)
    weighting = build_weighting("imtl", 3)
    with torch.no_grad():
        weighting.log_scale_T.copy_(torch.tensor([0.3, -0.2, 0.5]))
    losses = torch.tensor([0.8, 1.5, 0.4], dtype=torch.float64, requires_grad=True)
    loss, weights = weighting.combine(losses, ALL_PRESENT3, torch.from_numpy(grads @ grads.T))
    scale = np.exp([0.3, -0.2, 0.5])
    alpha = weights.numpy() / scale
    assert alpha.sum() == pytest.approx(1.0, abs=1e-6)  # IMTL-G's alpha on the scaled gradients
    d = weights.numpy() @ grads
    projections = grads @ d / np.linalg.norm(grads, axis=1)
    np.testing.assert_allclose(projections, projections[0], rtol=1e-5)
    assert loss.item() == pytest.approx((weights.double() * losses).sum().item(), rel=1e-6)  # the s-term is 0 in value
    loss.backward()
    expected = scale * losses.detach().numpy() - 1.0  # d/ds (e^s L - s)
    np.testing.assert_allclose(weighting.log_scale_T.grad.numpy(), expected, atol=1e-6)


def test_imtl_loss_mode_and_world_size():
    weighting = build_weighting("imtl", 2, mode="loss", world_size=2)
    losses = torch.tensor([0.8, 1.5], requires_grad=True)
    loss, weights = weighting.combine(losses, torch.tensor([True, True]))
    loss.backward()
    assert weights.tolist() == [1.0, 1.0]
    assert weighting.log_scale_T.grad.tolist() == pytest.approx([0.8 - 0.5, 1.5 - 0.5])


def test_imtl_zero_gradient_tasks():
    grads = random_grads(3, 4, seed=12)
    grads[1] = 0.0
    alpha = weights_of("imtl", grads, mode="gradient")
    assert alpha[1] == pytest.approx(1 / 3) and alpha.sum() == pytest.approx(1.0)
    projections = grads[[0, 2]] @ (alpha @ grads) / np.linalg.norm(grads[[0, 2]], axis=1)
    assert projections[0] == pytest.approx(projections[1])
    np.testing.assert_allclose(weights_of("imtl", np.zeros((3, 4)), mode="gradient"), [1 / 3] * 3)


# ---- Nash-MTL ----------------------------------------------------------------------------------


@pytest.mark.parametrize("T, seed", [(2, 0), (3, 1), (4, 2), (6, 3)])
def test_nash_bargaining_equations(T, seed):
    grads = random_grads(T, T + 3, seed)
    gram = grads @ grads.T
    alpha = weights_of("nash_mtl", grads, max_norm=0.0)
    assert alpha.min() > 0
    # The equations hold on the raw gradients (the Frobenius normalisation is for conditioning only),
    # so the direction has norm sqrt(T) whatever the gradients' scale, as in the official code.
    np.testing.assert_allclose(alpha * (gram @ alpha), 1.0, atol=1e-4)
    assert np.linalg.norm(alpha @ grads) == pytest.approx(np.sqrt(T), rel=1e-4)
    raw = solvers.nash_weights(gram)
    np.testing.assert_allclose(raw * (gram @ raw), 1.0, atol=1e-8)
    np.testing.assert_allclose(alpha, raw, rtol=1e-4)


def test_nash_weights_scale_inversely_with_the_gradients():
    grads = random_grads(3, 6, seed=7)
    alpha = weights_of("nash_mtl", grads, max_norm=0.0)
    for scale in (1e-3, 1e3):  # small gradients late in training must not shrink the step
        np.testing.assert_allclose(weights_of("nash_mtl", scale * grads, max_norm=0.0), alpha / scale, rtol=1e-6)


def test_nash_orthogonal_gradients_closed_form():
    grads = np.diag([1.0, 2.0, 4.0])
    alpha = solvers.nash_weights(grads @ grads.T)
    np.testing.assert_allclose(alpha, [1.0, 0.5, 0.25], rtol=1e-12)  # alpha_i = 1 / |g_i|


def test_nash_max_norm_clips_the_direction():
    grads = 10.0 * random_grads(3, 5, seed=4)
    for scale in (1.0, 1e-3):  # the unclipped direction has norm sqrt(3) at any scale
        weights = weights_of("nash_mtl", scale * grads, max_norm=1.0)
        assert np.linalg.norm(weights @ (scale * grads)) == pytest.approx(1.0, rel=1e-5)
    unclipped = weights_of("nash_mtl", grads, max_norm=0.0)
    np.testing.assert_allclose(weights_of("nash_mtl", grads, max_norm=2.0), unclipped)  # sqrt(3) < 2: no clip


def test_nash_without_solution_keeps_previous_weights():
    weighting = build_weighting("nash_mtl", 2, max_norm=0.0)
    losses, present = torch.ones(2, dtype=torch.float64), torch.tensor([True, True])
    _, weights = weighting.combine(losses, present, torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
    assert weights.tolist() == [1.0, 1.0]  # opposite gradients: no bargaining solution; initial weights
    solved = weighting.combine(losses, present, torch.tensor([[1.0, 0.0], [0.0, 4.0]]))[1]
    weighting.after_optimizer_step()
    _, weights = weighting.combine(losses, present, torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
    torch.testing.assert_close(weights, solved)


def test_nash_state_from_before_the_raw_scale_is_solved_again():
    # Its alpha was G/|G|_F's: reused between solves it would shrink the step by sqrt(|G|_F).
    grads = 10.0 * random_grads(3, 6, seed=8)
    gram = torch.from_numpy(grads @ grads.T)
    fresh = build_weighting("nash_mtl", 3, max_norm=0.0, update_every=5)
    solved = fresh.combine(torch.ones(3, dtype=torch.float64), ALL_PRESENT3, gram)[1]
    old = {k: v for k, v in fresh.state_dict().items() if k != "raw_scale"}
    old["alpha_T"] = old["alpha_T"] / 7.0  # some other scale
    old["step"] = torch.tensor(1)  # mid-interval: no solve would be due
    resumed = build_weighting("nash_mtl", 3, max_norm=0.0, update_every=5)
    resumed.load_state_dict(old)
    assert resumed.wants_gram(ALL_PRESENT3)
    torch.testing.assert_close(resumed.combine(torch.ones(3, dtype=torch.float64), ALL_PRESENT3, gram)[1], solved)
    current = build_weighting("nash_mtl", 3, max_norm=0.0, update_every=5)
    current.load_state_dict({**fresh.state_dict(), "step": torch.tensor(1)})
    assert not current.wants_gram(ALL_PRESENT3)  # a current state keeps its cadence


def test_nash_update_every():
    weighting = build_weighting("nash_mtl", 3, max_norm=0.0, update_every=3)
    rng = np.random.default_rng(0)
    history = []
    for step in range(6):
        wants = weighting.wants_gram(ALL_PRESENT3)
        assert wants == (step % 3 == 0)
        grads = rng.normal(size=(3, 5))
        gram = torch.from_numpy(grads @ grads.T) if wants else None
        history.append(weighting.combine(torch.ones(3, dtype=torch.float64), ALL_PRESENT3, gram)[1])
        weighting.after_optimizer_step()
    assert torch.equal(history[0], history[1]) and torch.equal(history[0], history[2])
    assert not torch.equal(history[2], history[3]) and torch.equal(history[3], history[5])
    # a change of the present tasks forces a solve
    assert weighting.wants_gram(torch.tensor([True, False, True]))
    assert build_weighting("nash_mtl", 3, update_every=3).wants_gram(ALL_PRESENT3)  # max_norm > 0: every step


# ---- DWA ---------------------------------------------------------------------------------------


def test_dwa_against_the_formula():
    window, temperature = 2, 2.0
    weighting = build_weighting("dwa", 3, window=window, temperature=temperature)
    losses = [[4.0, 2.0, 1.0], [3.0, 2.0, 1.0], [2.0, 2.0, 0.9], [2.0, 1.0, 0.9], [1.0, 1.6, 0.8], [1.0, 1.0, 0.8]]
    observed = []
    for step, row in enumerate(losses):
        _, weights = weighting.combine(torch.ones(3, dtype=torch.float64), ALL_PRESENT3)
        epochs_done = step // window
        if epochs_done < 2:
            expected = np.ones(3)
        else:
            means = [np.mean(losses[e * window : (e + 1) * window], axis=0) for e in range(epochs_done)]
            ratio = means[-1] / means[-2]
            expected = 3 * np.exp(ratio / temperature) / np.exp(ratio / temperature).sum()
        np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-12)
        observed.append(weights)
        weighting.observe(torch.tensor(row, dtype=torch.float64), ALL_PRESENT3)
    # epochs (3.5, 2, 1), (2, 1.5, .9): task 0 falls fastest, so its weight is the least
    assert observed[4][0] < observed[4][1] and observed[4][0] < observed[4][2]


def test_dwa_absent_task_keeps_its_epoch_means():
    weighting = build_weighting("dwa", 2, window=1)
    both, first = torch.tensor([True, True]), torch.tensor([True, False])
    for row, present in [([1.0, 4.0], both), ([0.5, 2.0], both), ([0.25, 9.0], first)]:
        weighting.observe(torch.tensor(row), present)
    # task 0: 0.25 / 0.5; task 1: its last two means are still 2.0 / 4.0 (absent in the third epoch)
    torch.testing.assert_close(weighting.ratios(), torch.tensor([0.5, 0.5], dtype=torch.float64))
    _, weights = weighting.combine(torch.ones(2), first)
    assert weights.tolist() == [1.0, 0.0]


def test_dwa_a_loss_that_reached_zero_has_no_trend():
    # fp32 cross-entropy is exactly 0 past a logit margin of ~104 (a CLIP-scaled retrieval task gets there):
    # 0 / 0 and x / 0 must not turn every weight into NaN.
    weighting = build_weighting("dwa", 2, window=1)
    for row in ([0.0, 4.0], [0.0, 2.0], [0.5, 1.0]):
        weighting.observe(torch.tensor(row), torch.tensor([True, True]))
        _, weights = weighting.combine(torch.ones(2), torch.tensor([True, True]))
        assert torch.isfinite(weights).all() and weights.sum().item() == pytest.approx(2.0)
    torch.testing.assert_close(weighting.ratios(), torch.tensor([1.0, 0.5], dtype=torch.float64))


def test_dwa_epoch_mean_is_over_the_steps_a_task_was_present():
    # window 2; task 1 is absent from the second step of epoch 1 (its loss there, 100, is not read):
    # its epoch means are 4 (one step) then 2, so w_1 = 0.5 like task 0's (2 then 1), not 2 / (4 / 2).
    weighting = build_weighting("dwa", 2, window=2)
    both, first = torch.tensor([True, True]), torch.tensor([True, False])
    for row, present in [([2.0, 4.0], both), ([2.0, 100.0], first), ([1.0, 2.0], both), ([1.0, 2.0], both)]:
        weighting.observe(torch.tensor(row, dtype=torch.float64), present)
    torch.testing.assert_close(weighting.ratios(), torch.tensor([0.5, 0.5], dtype=torch.float64))
    _, weights = weighting.combine(torch.ones(2, dtype=torch.float64), both)
    torch.testing.assert_close(weights, torch.ones(2, dtype=torch.float64))


# ---- UW ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 3])
def test_uncertainty_gradient(world_size):
    weighting = build_weighting("uncertainty", 3, world_size=world_size)
    with torch.no_grad():
        weighting.log_var_T.copy_(torch.tensor([0.0, 0.7, -0.4]))
    losses = torch.tensor([1.2, 0.3, 2.0], requires_grad=True)
    loss, weights = weighting.combine(losses, ALL_PRESENT3)
    s = weighting.log_var_T.detach()
    assert loss.item() == pytest.approx((torch.exp(-s) * losses + s / world_size).sum().item(), rel=1e-6)
    torch.testing.assert_close(weights, torch.exp(-s))
    loss.backward()
    torch.testing.assert_close(weighting.log_var_T.grad, 1.0 / world_size - torch.exp(-s) * losses.detach())
    torch.testing.assert_close(losses.grad, torch.exp(-s))


# ---- GradNorm ----------------------------------------------------------------------------------


def test_gradnorm_moves_weight_to_the_slower_task_and_renormalises():
    weighting = build_weighting("gradnorm", 3)
    optimizer = torch.optim.SGD(weighting.parameters(), lr=0.05)
    present = ALL_PRESENT3
    weighting.observe(torch.tensor([1.0, 1.0, 1.0]), present)  # L(0)
    weighting.observe(torch.tensor([0.4, 0.9, 0.6]), present)  # task 1 trains slowest
    grads = np.diag([1.0, 1.0, 1.0])  # equal gradient norms
    losses = torch.tensor([0.4, 0.9, 0.6], requires_grad=True)
    optimizer.zero_grad()
    loss, weights = weighting.combine(losses, present, torch.from_numpy(grads @ grads.T))
    assert loss.item() == pytest.approx(1.9)  # weights 1, GradNorm's term 0 in value
    loss.backward()
    r = np.array([0.4, 0.9, 0.6]) / np.mean([0.4, 0.9, 0.6])
    target = 1.0 * r**1.5
    # d/dw_t |w_t |g_t| - target_t| = sign(w_t |g_t| - target_t) |g_t|
    np.testing.assert_allclose(weighting.weights_T.grad.numpy(), np.sign(1.0 - target), rtol=1e-6)
    torch.testing.assert_close(losses.grad, torch.ones(3))  # the task losses see detached weights
    optimizer.step()
    weighting.after_optimizer_step()
    w = weighting.weights_T.detach()
    assert w[1] > w[2] and w[1] > 1 > w[0]
    assert w.sum().item() == pytest.approx(3.0)


def test_gradnorm_uses_the_global_losses_of_this_step_when_given():
    weighting = build_weighting("gradnorm", 2)
    weighting.observe(torch.tensor([1.0, 1.0]), torch.tensor([True, True]))
    present = torch.tensor([True, True])
    r_lagged = weighting.loss_ratios(present)
    r_now = weighting.loss_ratios(present, np.array([0.5, 1.0]))
    assert r_lagged.tolist() == [1.0, 1.0]
    np.testing.assert_allclose(r_now, [0.5 / 0.75, 1.0 / 0.75])


def test_gradnorm_first_step_balances_gradient_norms():
    weighting = build_weighting("gradnorm", 2)
    gram = torch.tensor([[4.0, 0.0], [0.0, 1.0]])  # |g| = 2, 1
    loss, _ = weighting.combine(torch.ones(2, requires_grad=True), torch.tensor([True, True]), gram)
    loss.backward()
    # G = (2, 1), mean 1.5, r = 1: push w_0 down, w_1 up
    assert weighting.weights_T.grad.tolist() == pytest.approx([2.0, -1.0])


def test_gradnorm_a_first_loss_of_zero_gives_ratio_one_not_nan():
    # A task whose first loss is exactly 0 (fp32 cross-entropy past a large margin) has no usable L(0):
    # Ltilde = 1 for it, as for a task never seen, instead of L / 0 = inf turning every ratio into NaN.
    weighting = build_weighting("gradnorm", 2)
    present = torch.tensor([True, True])
    weighting.observe(torch.tensor([0.0, 1.0]), present)
    np.testing.assert_allclose(weighting.loss_ratios(present, np.array([0.5, 0.5])), [1 / 0.75, 0.5 / 0.75])
    loss, _ = weighting.combine(torch.ones(2, requires_grad=True), present, torch.eye(2, dtype=torch.float64),
                                global_losses_T=torch.tensor([0.5, 0.5]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(weighting.weights_T.grad).all()


# ---- every method: data parallelism, resume, and training a tiny shared model -------------------


@pytest.mark.parametrize("name", METHODS)
def test_two_ranks_sum_to_the_single_process_gradients(name):
    """Each rank's losses are its share of the global ones; SUM-reducing the gradients of the
    weighting's parameters and of the losses over the ranks gives the single-process gradients."""
    grads = random_grads(3, 4, seed=8)
    gram = torch.from_numpy(grads @ grads.T)
    global_losses = torch.tensor([0.9, 1.7, 0.4], dtype=torch.float64)
    shares = [torch.tensor([0.5, 1.2, 0.1], dtype=torch.float64), None]
    shares[1] = global_losses - shares[0]
    modules = [build_weighting(name, 3, world_size=w) for w in (1, 2, 2)]
    for module in modules:
        with torch.no_grad():
            for param in module.parameters():
                param.copy_(torch.tensor([0.2, -0.3, 0.5]) + (1.0 if name == "gradnorm" else 0.0))
        module.observe(global_losses * 1.5, ALL_PRESENT3)
        module.observe(global_losses, ALL_PRESENT3)

    def gradients(module, losses_T):
        leaf = losses_T.clone().requires_grad_()
        loss, weights = module.combine(leaf, ALL_PRESENT3, gram)
        loss.backward()
        return leaf.grad, [p.grad.clone() for p in module.parameters()], weights

    single_losses, single_params, single_weights = gradients(modules[0], global_losses)
    ranks = [gradients(module, share) for module, share in zip(modules[1:], shares)]
    for loss_grad, _, weights in ranks:
        torch.testing.assert_close(weights, single_weights)
        torch.testing.assert_close(loss_grad, single_losses)
    for i, single in enumerate(single_params):
        torch.testing.assert_close(ranks[0][1][i] + ranks[1][1][i], single)



def run_steps(weighting, optimizer, steps, rng):
    out = []
    for _ in range(steps):
        present = torch.from_numpy(rng.uniform(size=3) < 0.8)
        grads = rng.normal(size=(3, 4)) * present.numpy()[:, None]
        losses = torch.tensor(rng.uniform(0.2, 2.0, size=3), requires_grad=True)
        if optimizer:
            optimizer.zero_grad()
        loss, weights = weighting.combine(losses, present, torch.from_numpy(grads @ grads.T))
        loss.backward()
        if optimizer:
            optimizer.step()
        weighting.after_optimizer_step()
        weighting.observe(losses.detach(), present)
        out.append(weights)
    return torch.stack(out)


OPTIONS = {"dwa": {"window": 2}, "nash_mtl": {"update_every": 2}}


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_round_trip_continues_identically(name):
    options = OPTIONS.get(name, {})
    original = build_weighting(name, 3, **options)
    optimizer = torch.optim.SGD(original.parameters(), lr=0.1) if list(original.parameters()) else None
    run_steps(original, optimizer, 5, np.random.default_rng(0))
    state = copy.deepcopy(original.state_dict())
    resumed = build_weighting(name, 3, **options)
    resumed.load_state_dict(state)
    resumed_optimizer = torch.optim.SGD(resumed.parameters(), lr=0.1) if optimizer else None
    expected = run_steps(original, optimizer, 6, np.random.default_rng(1))
    actual = run_steps(resumed, resumed_optimizer, 6, np.random.default_rng(1))
    assert torch.equal(expected, actual)


class TwoTaskRegression(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 3)
        self.heads = nn.ModuleList([nn.Linear(3, 1), nn.Linear(3, 1)])

    def forward(self, x):
        h = torch.tanh(self.shared(x))
        return [head(h).squeeze(-1) for head in self.heads]


@pytest.mark.parametrize("name", METHODS)
def test_each_method_trains_a_shared_two_task_regression(name):
    torch.manual_seed(0)
    x = torch.randn(32, 4)
    targets = [x @ torch.tensor([1.0, -1.0, 0.5, 0.0]), x @ torch.tensor([0.5, 1.0, 0.0, -1.0]) + 1.0]
    model = TwoTaskRegression()
    weighting = build_weighting(name, 2, **({"window": 2} if name == "dwa" else {}))
    optimizer = torch.optim.SGD([*model.parameters(), *weighting.parameters()], lr=0.1)
    present = torch.tensor([True, True])

    def task_losses():
        return torch.stack([((p - y) ** 2).mean() for p, y in zip(model(x), targets)])

    initial = task_losses().detach()
    for _ in range(30):
        optimizer.zero_grad()
        losses = task_losses()
        gram = gram_matrix(task_gradients(losses, present, list(model.shared.parameters())))
        loss, _ = weighting.combine(losses, present, gram if weighting.wants_gram(present) else None)
        loss.backward()
        optimizer.step()
        weighting.after_optimizer_step()
        weighting.observe(losses.detach(), present)
    final = task_losses().detach()
    assert final.sum() < 0.5 * initial.sum() and (final < initial).all(), (name, initial, final)


def test_task_gradients_and_gram():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    v = torch.tensor([3.0], requires_grad=True)
    losses = torch.stack([(w**2).sum(), (w[0] * v).sum(), (v * 0).sum() + 5.0])
    grads = task_gradients(losses, torch.tensor([True, True, False]), [w, v])
    assert grads.tolist() == [[2.0, 4.0, 0.0], [3.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    torch.testing.assert_close(gram_matrix(grads), grads @ grads.T)


@pytest.mark.parametrize("name", [m for m in METHODS if build_weighting(m, 2).needs_gram])
def test_gram_is_symmetrised_before_the_solver(name):
    """An fp32 G @ G.T need not be exactly symmetric: a (T, T) = (3, 3) Gram plus an antisymmetric
    perturbation gives the weights of the Gram itself."""
    grads = random_grads(3, 5, seed=7)
    gram = grads @ grads.T
    skew = np.array([[0.0, 0.4, -0.3], [-0.4, 0.0, 0.2], [0.3, -0.2, 0.0]])
    weighting, reference = build_weighting(name, 3), build_weighting(name, 3)
    losses = torch.ones(3, dtype=torch.float64, requires_grad=True)
    _, weights = weighting.combine(losses, ALL_PRESENT3, torch.from_numpy(gram + skew))
    _, expected = reference.combine(losses, ALL_PRESENT3, torch.from_numpy(gram))
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", [m for m in METHODS if build_weighting(m, 2).needs_gram])
def test_non_finite_gram_entries_of_absent_tasks_are_ignored(name):
    """Only the present tasks' block of the Gram must be finite: NaN in an absent task's row and
    column (T = 3, task 2 absent) still gives finite weights, 0 for the absent task."""
    grads = random_grads(3, 5, seed=3)
    gram = grads @ grads.T
    gram[2, :] = gram[:, 2] = np.nan
    weighting = build_weighting(name, 3)
    losses = torch.ones(3, dtype=torch.float64, requires_grad=True)
    loss, weights = weighting.combine(losses, torch.tensor([True, True, False]), torch.from_numpy(gram))
    assert torch.isfinite(weights).all() and weights[2] == 0 and torch.isfinite(loss)


def test_task_gradients_of_absent_tasks_are_zero_even_when_their_loss_reaches_the_params():
    """(T, P) = (3, 3): task 2 is absent, so its row is zero although its loss depends on w."""
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    v = torch.tensor([3.0], requires_grad=True)
    losses = torch.stack([(w**2).sum(), (w[0] * v).sum(), (w * v).sum()])
    grads = task_gradients(losses, torch.tensor([True, True, False]), [w, v])
    assert grads.tolist() == [[2.0, 4.0, 0.0], [3.0, 0.0, 1.0], [0.0, 0.0, 0.0]]


# ---- Delta_p -----------------------------------------------------------------------------------


def test_delta_p_hand_example():
    baseline = {"digit": {"accuracy": 0.8}, "value": {"mse": 2.0, "mae": 1.0}}
    multi = {"digit": {"accuracy": 0.88}, "value": {"mse": 1.5, "mae": 1.1}}
    # digit: +(0.88 - 0.8) / 0.8 = +0.1; value: mse (2 - 1.5) / 2 = +0.25, mae (1 - 1.1) / 1 = -0.1, mean +0.075
    assert delta_p(baseline, multi, {"digit": True, "value": False}) == pytest.approx(100 * (0.1 + 0.075) / 2)
    per_metric = {"digit": {"accuracy": True}, "value": {"mse": False, "mae": False}}
    assert delta_p(baseline, multi, per_metric) == pytest.approx(8.75)
    assert delta_p(baseline, baseline, {"digit": True, "value": False}) == 0.0


@pytest.mark.parametrize(
    "baseline, multi, higher, message",
    [
        ({"a": {"m": 1.0}}, {"b": {"m": 1.0}}, {"a": True}, "expected the same tasks"),
        ({"a": {"m": 1.0}}, {"a": {"n": 1.0}}, {"a": True}, "expected the same"),
        ({"a": {"m": 0.0}}, {"a": {"m": 1.0}}, {"a": True}, "divides by the baseline"),
        ({"a": {"m": 1.0}}, {"a": {"m": 1.0}}, {}, "no entry for task 'a'"),
        ({"a": {"m": 1.0}}, {"a": {"m": float("nan")}}, {"a": True}, "finite"),
        ({}, {}, {}, "baseline is empty"),
    ],
)
def test_delta_p_errors(baseline, multi, higher, message):
    with pytest.raises(ValueError, match=message):
        delta_p(baseline, multi, higher)


def test_simplex_grid_helper():
    grid = simplex_grid(3, 4)
    assert len(grid) == 15 and np.allclose(grid.sum(axis=1), 1) and grid.min() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("name", METHODS)
def test_every_method_on_cuda(name):
    """Module, losses and Gram on the GPU (the trainer's case): same weights as on the CPU."""
    grads = random_grads(3, 5, seed=6)
    gram = torch.from_numpy(grads @ grads.T).float()
    losses = torch.tensor([0.7, 1.3, 2.1])
    present = torch.tensor([True, False, True])
    cpu, gpu = build_weighting(name, 3), build_weighting(name, 3).cuda()
    for weighting, device in ((cpu, "cpu"), (gpu, "cuda")):
        weighting.observe(losses.to(device), present.to(device))
    _, expected = cpu.combine(losses.clone().requires_grad_(), present, gram)
    losses_gpu = losses.cuda().requires_grad_()
    loss, weights = gpu.combine(losses_gpu, present.cuda(), gram.cuda())
    loss.backward()
    gpu.after_optimizer_step()
    assert weights.device.type == "cuda" and losses_gpu.grad.device.type == "cuda"
    torch.testing.assert_close(weights.cpu(), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------- GradNorm's targets, exactly (mutation-found gaps)


def test_gradnorm_alpha_sets_the_target():
    # The weights' gradient of GradNorm's L1 loss is a sign times G_t; with unequal gradient norms
    # alpha decides the signs: G = (0.75, 1.25), mean 1; r = (0.8, 1.2); targets r^1.5 = (0.716, 1.315).
    w = build_weighting("gradnorm", 2)
    present = torch.tensor([True, True])
    w.observe(torch.tensor([1.0, 1.0]), present)
    gram = torch.diag(torch.tensor([0.75**2, 1.25**2]))
    loss, _ = w.combine(torch.tensor([0.8, 1.2], requires_grad=True), present, gram, global_losses_T=torch.tensor([0.8, 1.2]))
    loss.backward()
    assert w.weights_T.grad.tolist() == pytest.approx([0.75, -1.25])


def test_gradnorm_leaves_an_absent_task_out_of_its_means():
    # Task 2 absent from the step: the mean gradient norm and the mean loss ratio are over tasks 0 and 1.
    w = build_weighting("gradnorm", 3)
    w.observe(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([True, True, True]))
    present = torch.tensor([True, True, False])
    gram = torch.diag(torch.tensor([0.75**2, 1.25**2, 0.0]))
    loss, _ = w.combine(torch.tensor([0.8, 1.2, 0.0], requires_grad=True), present, gram,
                        global_losses_T=torch.tensor([0.8, 1.2, 0.0]))
    loss.backward()
    assert w.weights_T.grad.tolist() == pytest.approx([0.75, -1.25, 0.0])


def test_gradnorm_after_step_clamps_and_sums_to_the_task_count():
    # A negative weight would make the model maximise that task's loss; all weights sum to T, the
    # absent task's kept as it was.
    w = build_weighting("gradnorm", 3)
    present = torch.tensor([True, True, False])
    w.combine(torch.ones(3, requires_grad=True), present, torch.eye(3))
    with torch.no_grad():
        w.weights_T.copy_(torch.tensor([-0.5, 2.0, 0.5]))
    w.after_optimizer_step()
    v = w.weights_T.detach()
    assert v[0] > 0 and v[2].item() == 0.5 and v.sum().item() == pytest.approx(3.0)
