"""The synthetic two-task regression data of the MMoE paper (Ma et al., KDD 2018, section 3.2).

Recipe, for task correlation p in [-1, 1], scale c and m sine terms:
    u1, u2        orthonormal in R^d (Gram-Schmidt of two Gaussian vectors)
    w1 = c u1,    w2 = c (p u1 + sqrt(1 - p^2) u2)          so cos(w1, w2) = p
    alpha_i, beta_i ~ N(0, 1), i = 1..m, drawn once per data set
    x ~ N(0, I_d)
    y_t = w_t . x + sum_{i=1..m} sin(alpha_i w_t . x + beta_i) + eps_t,  eps_t ~ N(0, 0.01)
N(0, 0.01) is read as variance 0.01 (standard deviation 0.1). The labels' Pearson correlation is
not p: the sine terms make it lower (the paper's figure 2), but it still falls as p falls.

The task weights and sine parameters (`SyntheticTasks`) are drawn from the seed alone, so a train
and a test set drawn with one seed share them; `make_synthetic_tasks` draws both from one call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NOISE_STD = 0.1  # N(0, 0.01): variance 0.01


@dataclass(frozen=True)
class SyntheticTasks:
    """The fixed parameters of one synthetic data set (float64).

    u_2D: (2, d) orthonormal rows; w_2D: (2, d) task weights; alpha_M, beta_M: (m,) sine parameters.
    """

    correlation: float
    u_2D: torch.Tensor
    w_2D: torch.Tensor
    alpha_M: torch.Tensor
    beta_M: torch.Tensor

    def labels(self, x_ND: torch.Tensor, noise_N2: torch.Tensor) -> torch.Tensor:
        """(N, 2) float64 labels of inputs x_ND (N, d) with the given noise (N, 2)."""
        z_N2 = x_ND.double() @ self.w_2D.t()
        sines_N2 = torch.sin(self.alpha_M[:, None, None] * z_N2 + self.beta_M[:, None, None]).sum(dim=0)
        return z_N2 + sines_N2 + noise_N2.double()


def _check_args(correlation: float, d: int, c: float, m: int) -> None:
    if not isinstance(correlation, (int, float)) or isinstance(correlation, bool) or not -1.0 <= correlation <= 1.0:
        raise ValueError(f"correlation = {correlation!r}: expected a number in [-1, 1]")
    if isinstance(d, bool) or not isinstance(d, int) or d < 2:
        raise ValueError(f"d = {d!r}: expected an integer >= 2 (two orthonormal directions are needed)")
    if not isinstance(c, (int, float)) or isinstance(c, bool) or not math.isfinite(c):
        raise ValueError(f"c = {c!r}: expected a finite number")
    if isinstance(m, bool) or not isinstance(m, int) or m < 0:
        raise ValueError(f"m = {m!r}: expected an integer >= 0")


def synthetic_tasks(correlation: float, *, d: int = 100, c: float = 1.0, m: int = 10, seed: int) -> SyntheticTasks:
    """Draw the task weights (u1, u2, w1, w2) and the sine parameters of one data set from `seed`."""
    _check_args(correlation, d, c, m)
    gen = torch.Generator().manual_seed(seed)
    a_D, b_D = torch.randn(2, d, generator=gen, dtype=torch.float64)
    u1_D = a_D / a_D.norm()
    b_D = b_D - (b_D @ u1_D) * u1_D
    u2_D = b_D / b_D.norm()
    w1_D = c * u1_D
    w2_D = c * (correlation * u1_D + math.sqrt(1.0 - correlation**2) * u2_D)
    alpha_M = torch.randn(m, generator=gen, dtype=torch.float64)
    beta_M = torch.randn(m, generator=gen, dtype=torch.float64)
    return SyntheticTasks(float(correlation), torch.stack([u1_D, u2_D]), torch.stack([w1_D, w2_D]), alpha_M, beta_M)


def make_synthetic_tasks(
    num_samples: int, correlation: float, *, d: int = 100, c: float = 1.0, m: int = 10, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (N, d) float32, y (N, 2) float32): N samples of the paper's two regression tasks.

    The same seed gives the same task weights and sine parameters and the same samples; split one
    call's samples into train and test sets so that both come from the same tasks.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples = {num_samples!r}: expected an integer >= 1")
    tasks = synthetic_tasks(correlation, d=d, c=c, m=m, seed=seed)
    # The samples have their own stream: the tasks of a seed do not depend on num_samples.
    gen = torch.Generator().manual_seed(seed + 1_000_003)
    x_ND = torch.randn(num_samples, d, generator=gen, dtype=torch.float64)
    noise_N2 = NOISE_STD * torch.randn(num_samples, 2, generator=gen, dtype=torch.float64)
    return x_ND.float(), tasks.labels(x_ND, noise_N2).float()
