"""The small optimisation problems of the gradient-based weightings, each on a Gram matrix alone.

Every function takes `gram_TT`, a (T, T) float64 NumPy array of inner products <g_i, g_j> of T task
gradients (T >= 1, only the tasks taking part), and returns (T,) float64 coefficients c_T such that
the method's update direction is sum_t c_t g_t. They never see the gradients themselves, so they
cost O(T^3) whatever the model size, and every rank that holds the same Gram gets the same answer.

- `min_norm_2`, `min_norm_frank_wolfe`, `min_norm_exact`: MGDA's min-norm point of the convex hull
  (Sener & Koltun 2018: their Frank-Wolfe MinNormSolver with the exact two-vector line search; and
  Wolfe's exact active-set algorithm).
- `pcgrad_coefficients`: PCGrad's projected gradients (Yu et al. 2020) in the basis of the g_t.
- `cagrad_weights`: CAGrad's direction (Liu et al. 2021), the simplex problem solved by SLSQP as in
  the official code.
- `imtl_g_weights`: IMTL-G's closed form (Liu et al. 2021).
- `nash_weights`: Nash-MTL's bargaining solution alpha > 0 with (G alpha)_i = 1 / alpha_i (Navon et al.
  2022), by damped Newton on a strictly convex function whose stationary point is that solution.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _check_gram(gram_TT: np.ndarray) -> int:
    if gram_TT.ndim != 2 or gram_TT.shape[0] != gram_TT.shape[1] or gram_TT.shape[0] == 0:
        raise ValueError(f"gram_TT has shape {tuple(gram_TT.shape)}: expected (T, T) with T >= 1")
    return gram_TT.shape[0]


def min_norm_2(g11: float, g12: float, g22: float) -> float:
    """gamma in [0, 1] minimising |gamma v1 + (1 - gamma) v2|^2 given <v1,v1>, <v1,v2>, <v2,v2>.

    The exact closed form gamma = clip((g22 - g12) / |v1 - v2|^2, 0, 1) (Sener's code clips to
    0.001 / 0.999 instead). Equal vectors: 0.5 when the norms tie, else all weight on the shorter.
    """
    denom = g11 + g22 - 2.0 * g12
    if denom <= 1e-12 * max(g11 + g22, 1e-300):
        return 0.5 if g11 == g22 else float(g11 < g22)
    return float(min(max((g22 - g12) / denom, 0.0), 1.0))


def _pair_norm(gamma: float, g11: float, g12: float, g22: float) -> float:
    return gamma * gamma * g11 + 2.0 * gamma * (1.0 - gamma) * g12 + (1.0 - gamma) ** 2 * g22


def min_norm_frank_wolfe(gram_TT: np.ndarray, max_iter: int = 250, tol: float = 1e-5) -> np.ndarray:
    """Weights gamma_T on the simplex minimising |sum_t gamma_t g_t|^2 (MGDA's min-norm point), approximately.

    T = 1: [1]. T = 2: the closed form of `min_norm_2` (exact). T >= 3: Sener's MinNormSolver: start
    at the best pair's min-norm point, then Frank-Wolfe steps toward the vertex with the least
    <g_t, d> with an exact line search (`min_norm_2` between d and g_t), until a step moves gamma by
    less than `tol` in L1 norm or after `max_iter` steps. Frank-Wolfe converges as O(1/k): with the
    official 250 steps and 1e-5 the KKT conditions hold to about 1e-3 of max |g_t|^2.
    """
    T = _check_gram(gram_TT)
    if T == 1:
        return np.ones(1)
    best = None
    for i in range(T):
        for j in range(i + 1, T):
            gamma = min_norm_2(gram_TT[i, i], gram_TT[i, j], gram_TT[j, j])
            cost = _pair_norm(gamma, gram_TT[i, i], gram_TT[i, j], gram_TT[j, j])
            if best is None or cost < best[0]:
                best = (cost, i, j, gamma)
    _, i, j, gamma = best
    sol_T = np.zeros(T)
    sol_T[i], sol_T[j] = gamma, 1.0 - gamma
    if T == 2:
        return sol_T
    scale = max(float(np.max(np.diag(gram_TT))), 1e-300)
    for _ in range(max_iter):
        dots_T = gram_TT @ sol_T  # <g_t, d> with d = sum gamma g
        t = int(np.argmin(dots_T))
        v1v1, v1v2, v2v2 = float(sol_T @ dots_T), float(dots_T[t]), float(gram_TT[t, t])
        if v1v1 + v2v2 - 2.0 * v1v2 <= 1e-12 * scale:
            break  # g_t = d: no step changes d (e.g. identical gradients)
        step = min_norm_2(v1v1, v1v2, v2v2)
        new_T = step * sol_T
        new_T[t] += 1.0 - step
        change = float(np.abs(new_T - sol_T).sum())
        sol_T = new_T
        if change < tol:
            break
    return sol_T


def min_norm_exact(gram_TT: np.ndarray, tol: float = 1e-12, max_iter: int = 1000) -> np.ndarray:
    """The min-norm point's weights gamma_T to round-off, by Wolfe's algorithm (1976) on the Gram.

    Keeps a corral S of tasks and the min-norm point x of their convex hull. Major cycle: add the
    task j with the least <g_j, x> unless |x|^2 - <g_j, x> <= tol * max |g_t|^2 (x is optimal: the
    KKT conditions of the simplex problem). Minor cycle: the affine minimiser mu of S (from the
    bordered system [G_SS 1; 1^T 0]); if mu > 0 it becomes x, otherwise move from x toward mu until
    a weight hits 0, drop that task, and repeat. Finite; each step an (|S|+1)-square solve.
    """
    T = _check_gram(gram_TT)
    if T <= 2:
        return min_norm_frank_wolfe(gram_TT)  # the closed form, ties split evenly
    scale = max(float(np.max(np.diag(gram_TT))), 1e-300)
    corral = [int(np.argmin(np.diag(gram_TT)))]
    lam_S = np.ones(1)
    for _ in range(max_iter):
        dots_T = gram_TT[:, corral] @ lam_S  # <g_t, x>
        j = int(np.argmin(dots_T))
        if float(lam_S @ dots_T[corral]) - float(dots_T[j]) <= tol * scale or j in corral:
            break
        corral.append(j)
        lam_S = np.append(lam_S, 0.0)
        for _ in range(max_iter):
            n = len(corral)
            system = np.zeros((n + 1, n + 1))
            system[:n, :n] = gram_TT[np.ix_(corral, corral)]
            system[:n, n] = system[n, :n] = 1.0
            rhs = np.zeros(n + 1)
            rhs[n] = 1.0
            # lstsq: affinely dependent gradients make the system singular; any minimiser will do
            mu_S = np.linalg.lstsq(system, rhs, rcond=None)[0][:n]
            if np.all(mu_S > 0.0):
                lam_S = mu_S
                break
            ratios = np.where(mu_S <= 0.0, lam_S / np.where(mu_S <= 0.0, lam_S - mu_S, 1.0), np.inf)
            k = int(np.argmin(ratios))
            lam_S = lam_S + ratios[k] * (mu_S - lam_S)
            lam_S[k] = 0.0
            keep = lam_S > 0.0
            corral = [t for t, kept in zip(corral, keep) if kept]
            lam_S = lam_S[keep] / lam_S[keep].sum()
    sol_T = np.zeros(T)
    sol_T[corral] = lam_S
    return sol_T


def pcgrad_coefficients(gram_TT: np.ndarray, orders: Sequence[Sequence[int]]) -> np.ndarray:
    """(T, T) matrix C with PCGrad's projected gradient of task i equal to sum_k C[i, k] g_k.

    orders[i]: the other tasks j != i in the order task i is projected against them. For each j in
    turn: if <g_i^PC, g_j> < 0, g_i^PC -= <g_i^PC, g_j> / |g_j|^2 g_j (zero-norm g_j are skipped:
    they conflict with nothing). Inner products come from the Gram: <C[i] g, g_j> = (C[i] @ gram)[j].
    """
    T = _check_gram(gram_TT)
    if len(orders) != T:
        raise ValueError(f"orders has {len(orders)} entries: expected one order per task ({T})")
    coef_TT = np.eye(T)
    for i in range(T):
        if sorted(orders[i]) != [j for j in range(T) if j != i]:
            raise ValueError(f"orders[{i}] = {list(orders[i])}: expected a permutation of the tasks other than {i}")
        for j in orders[i]:
            dot = float(coef_TT[i] @ gram_TT[:, j])
            if dot < 0.0 and gram_TT[j, j] > 0.0:
                coef_TT[i, j] -= dot / gram_TT[j, j]
    return coef_TT


def cagrad_weights(gram_TT: np.ndarray, c: float = 0.5, rescale: int = 1) -> np.ndarray:
    """Coefficients of CAGrad's direction (g0 + lambda g_w) / r in the task gradients.

    g0 = mean_t g_t. w minimises F(w) = <g_w, g0> + c |g0| |g_w| over the simplex (g_w = sum w_t g_t),
    lambda = c |g0| / |g_w|, and r = 1 + c^2 (rescale 1, the official default), 1 + c (rescale 2) or
    1 (rescale 0). The Gram is divided by its largest diagonal entry first: w and lambda do not
    change with the scale of the gradients, and the solver's tolerances then mean the same thing
    for gradients of any size.
    """
    T = _check_gram(gram_TT)
    mean_T = np.full(T, 1.0 / T)
    divisor = {0: 1.0, 1: 1.0 + c * c, 2: 1.0 + c}[rescale]
    scale = float(np.max(np.diag(gram_TT)))
    if not scale > 0.0:  # every gradient is zero: any direction is zero
        return mean_T / divisor
    A_TT = gram_TT / scale
    k = c * float(np.sqrt(max(mean_T @ A_TT @ mean_T, 0.0)))
    Ab_T = A_TT @ mean_T
    eps = 1e-20

    def objective(w_T):
        return float(w_T @ Ab_T + k * np.sqrt(max(w_T @ A_TT @ w_T, eps)))

    def jacobian(w_T):
        return Ab_T + k * (A_TT @ w_T) / np.sqrt(max(w_T @ A_TT @ w_T, eps))

    w_T = mean_T
    if T > 1 and k > 0.0:
        from scipy.optimize import minimize  # SciPy comes with scikit-learn; imported here to keep imports light

        result = minimize(
            objective, mean_T, jac=jacobian, method="SLSQP", bounds=[(0.0, 1.0)] * T,
            constraints=({"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)},),
            options={"ftol": 1e-12, "maxiter": 500},
        )
        w_T = np.clip(result.x, 0.0, None)
        w_T = w_T / w_T.sum() if w_T.sum() > 0 else mean_T
    gw_norm = float(np.sqrt(max(w_T @ A_TT @ w_T, 0.0)))
    # |g_w| = 0 only where 0 is in the hull; then the official 1e-8 guard makes lambda huge with a
    # zero g_w: the direction is g0 either way, so take lambda = 0 and keep the coefficients finite.
    lam = k / gw_norm if gw_norm > 1e-12 else 0.0
    return (mean_T + lam * w_T) / divisor


def imtl_g_weights(gram_TT: np.ndarray) -> np.ndarray:
    """IMTL-G's alpha_T: sum alpha = 1 and d = sum alpha_t g_t has equal projections on every u_t = g_t / |g_t|.

    alpha_{2..T} = g_1 U^T (D U^T)^{-1} with rows D_t = g_1 - g_t, U_t = u_1 - u_t (t = 2..T),
    alpha_1 = 1 - sum alpha_{2..T}; every product is a Gram entry over norms. All |g_t| must be > 0.
    A singular D U^T (linearly dependent gradients) falls back to the least-squares solution.
    """
    T = _check_gram(gram_TT)
    if T == 1:
        return np.ones(1)
    norm_T = np.sqrt(np.diag(gram_TT))
    if not np.all(norm_T > 0.0):
        raise ValueError(f"IMTL-G needs non-zero task gradients; norms = {norm_T.tolist()}")
    inv_T = 1.0 / norm_T
    # <g_i, u_j> = gram[i, j] / |g_j|
    proj_TT = gram_TT * inv_T[None, :]
    a_R = proj_TT[0, 0] - proj_TT[0, 1:]  # g_1 . (u_1 - u_j)
    # (g_1 - g_i) . (u_1 - u_j)
    M_RR = (proj_TT[0, 0] - proj_TT[0, 1:])[None, :] - (proj_TT[1:, 0][:, None] - proj_TT[1:, 1:])
    try:
        rest_R = np.linalg.solve(M_RR.T, a_R)
    except np.linalg.LinAlgError:
        rest_R = np.linalg.lstsq(M_RR.T, a_R, rcond=None)[0]
    return np.concatenate([[1.0 - rest_R.sum()], rest_R])


def _nash_newton(G_TT: np.ndarray, max_iter: int, tol: float) -> tuple[np.ndarray, bool]:
    """Damped Newton on f(alpha) = alpha^T G alpha / 2 - sum log alpha; (alpha, whether it converged)."""

    def f(a_T):
        return 0.5 * float(a_T @ G_TT @ a_T) - float(np.log(a_T).sum())

    diag_T = np.diag(G_TT)
    if not np.all(diag_T > 0.0):
        return np.ones(len(G_TT)), False
    alpha_T = 1.0 / np.sqrt(diag_T)
    for _ in range(max_iter):
        Ga_T = G_TT @ alpha_T
        if float(np.max(np.abs(alpha_T * Ga_T - 1.0))) < tol:
            return alpha_T, True
        grad_T = Ga_T - 1.0 / alpha_T
        try:
            step_T = -np.linalg.solve(G_TT + np.diag(1.0 / alpha_T**2), grad_T)
        except np.linalg.LinAlgError:
            return alpha_T, False
        t = 1.0
        shrinking = step_T < 0
        if shrinking.any():
            t = min(1.0, 0.99 * float(np.min(-alpha_T[shrinking] / step_T[shrinking])))
        f0, slope = f(alpha_T), float(grad_T @ step_T)
        # slope = -(Newton decrement)^2. Below 1/4 the full step of a self-concordant function
        # converges quadratically; there the change in f drowns in round-off, so skip the search.
        while -slope > 0.0625 and f(alpha_T + t * step_T) > f0 + 0.25 * t * slope and t > 1e-16:
            t *= 0.5
        alpha_T = alpha_T + t * step_T
        if not np.all(np.isfinite(alpha_T)):
            return np.ones(len(G_TT)), False
    Ga_T = G_TT @ alpha_T
    return alpha_T, float(np.max(np.abs(alpha_T * Ga_T - 1.0))) < tol


def nash_weights(gram_TT: np.ndarray, max_iter: int = 100, tol: float = 1e-10) -> np.ndarray | None:
    """alpha_T > 0 with alpha_i (G alpha)_i = 1 for G = gram_TT (Nash-MTL's bargaining solution), or None.

    The solution is the unique minimiser of f(alpha) = alpha^T G alpha / 2 - sum_i log alpha_i, which
    is strictly convex on alpha > 0 (Hessian G + diag(1 / alpha^2)) and self-concordant, so damped
    Newton converges from any positive start; the start 1 / sqrt(diag G) is exact for orthogonal
    gradients. Steps stay inside alpha > 0 (fraction to the boundary 0.99) and, while the Newton
    decrement is above 1/4, backtrack until f falls enough (Armijo, 1/4). Converged once
    max_i |alpha_i (G alpha)_i - 1| < tol.

    No solution exists when 0 lies in the gradients' convex cone (a Pareto-stationary point, or a
    zero gradient): f is unbounded below and the iterates run off to infinity. Then (or after
    max_iter steps without convergence) this returns None, and the caller keeps its previous
    weights, as the official code does when its solver fails.
    """
    _check_gram(gram_TT)
    alpha_T, converged = _nash_newton(gram_TT, max_iter, tol)
    return alpha_T if converged else None
