"""Gradient-manipulation weightings: PCGrad, MGDA, CAGrad, IMTL and Nash-MTL, each from the Gram matrix.

Each computes coefficients alpha_T on the present tasks such that its update direction on the
shared parameters equals sum_t alpha_t g_t (the g_t being the global task gradients whose Gram
the trainer passes), and weights the losses by them; the problems themselves are in solvers.py.

Scales (sum of the weights when the gradients agree): PCGrad (reduction 'mean') and MGDA 1, IMTL 1
(always), CAGrad (1 + c) / (1 + c^2) when all gradients are equal (0.5: 1.2), Nash-MTL its own
(|direction| = sqrt(T |Gram|_F) before clipping to max_norm, as in the official code).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from moe_engine.mtl.weighting import solvers
from moe_engine.mtl.weighting.base import TaskWeighting, check_choice, check_number


class GramWeighting(TaskWeighting):
    """A weighting whose coefficients come from the present tasks' block of the Gram matrix."""

    needs_gram = True

    def _weights(self, losses_T, present_T, gram_TT, current_T):
        index = np.flatnonzero(present_T.numpy())
        coef = self._coefficients(gram_TT[np.ix_(index, index)], index, current_T)
        weights_T = np.zeros(self.num_tasks)
        weights_T[index] = coef
        return self._to_losses(weights_T, losses_T), None

    def _coefficients(self, gram_PP: np.ndarray, index: np.ndarray, current_T: np.ndarray | None) -> np.ndarray:
        """(P,) float64 coefficients for the P present tasks `index` from their (P, P) Gram block."""
        raise NotImplementedError


class PCGrad(GramWeighting):
    """PCGrad (Yu et al. 2020): project each task gradient off the others it conflicts with, then add.

    For each present task i, in a fresh random order of the other present tasks j: if <g_i^PC, g_j> < 0,
    g_i^PC -= <g_i^PC, g_j> / |g_j|^2 g_j. The direction is sum_i g_i^PC (reduction 'sum', the paper)
    or its mean (reduction 'mean', the default, as the official PyTorch port): without conflicts,
    'mean' equals EW and 'sum' equals the sum of the losses. The orders come from a torch.Generator
    seeded at construction; its state is in state_dict (extra state), so a resumed run draws the
    same orders, and every rank (same seed, same calls) draws the same ones.

    Args:
        reduction: 'mean' or 'sum'.
        seed: the seed of the order generator.
    """

    method = "pcgrad"

    def __init__(self, num_tasks: int, *, reduction: str = "mean", seed: int = 0, world_size: int = 1) -> None:
        super().__init__(num_tasks, world_size=world_size)
        check_choice("reduction", reduction, ("mean", "sum"))
        check_number("seed", seed, low=0, integer=True)
        self.reduction, self.seed = reduction, seed
        self.generator = torch.Generator().manual_seed(seed)

    def _coefficients(self, gram_PP, index, current_T):
        P = len(index)
        orders = []
        for i in range(P):
            others = [j for j in range(P) if j != i]
            perm = torch.randperm(P - 1, generator=self.generator).tolist() if P > 1 else []
            orders.append([others[k] for k in perm])
        coef_PP = solvers.pcgrad_coefficients(gram_PP, orders)
        total_P = coef_PP.sum(axis=0)
        return total_P / P if self.reduction == "mean" else total_P

    def get_extra_state(self) -> dict:
        return {"generator_state": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["generator_state"])


class MGDA(GramWeighting):
    """MGDA (Sener & Koltun 2018): the min-norm point of the convex hull of the (normalised) task gradients.

    With normalisers n_t, gamma = argmin over the simplex |sum_t gamma_t g_t / n_t| and the direction
    is that min-norm point, so the coefficients are gamma_t / n_t (as LibMTL; Sener's code instead
    puts gamma_t on the raw losses, which is not the min-norm point once n_t != 1).
    n_t: 'none' 1; 'l2' |g_t|; 'loss' L_t; 'loss+' L_t |g_t| (Sener's options). L_t is the global
    loss of this step (combine's global_losses_T) or else the last observed; a task with no known
    or a non-positive normaliser uses 1.

    Args:
        normalization: 'none' (default, the paper), 'l2', 'loss' or 'loss+'.
        solver: 'frank_wolfe' (Sener's MinNormSolver, T = 2 in closed form; default) or 'exact'
            (Wolfe's active-set algorithm: the min-norm point to round-off).
        max_iter, tol: Frank-Wolfe's step limit and stopping change (Sener's 250 and 1e-5).
    """

    method = "mgda"

    def __init__(
        self, num_tasks: int, *, normalization: str = "none", solver: str = "frank_wolfe", max_iter: int = 250,
        tol: float = 1e-5, world_size: int = 1,
    ) -> None:
        super().__init__(num_tasks, world_size=world_size)
        check_choice("normalization", normalization, ("none", "l2", "loss", "loss+"))
        check_choice("solver", solver, ("frank_wolfe", "exact"))
        check_number("max_iter", max_iter, low=0, integer=True)
        check_number("tol", tol, low=0.0)
        self.normalization, self.solver, self.max_iter, self.tol = normalization, solver, max_iter, float(tol)
        self.register_buffer("last_loss_T", torch.full((num_tasks,), float("nan"), dtype=torch.float64))

    def normalizers(self, gram_PP: np.ndarray, index: np.ndarray, current_T: np.ndarray | None) -> np.ndarray:
        """(P,) float64 n_t of the present tasks."""
        norm_P = np.sqrt(np.clip(np.diag(gram_PP), 0.0, None))
        losses_P = (self.last_loss_T.cpu().numpy() if current_T is None else current_T)[index]
        choices = {"none": np.ones_like(norm_P), "l2": norm_P, "loss": losses_P, "loss+": losses_P * norm_P}
        n_P = choices[self.normalization]
        return np.where(np.isfinite(n_P) & (n_P > 0), n_P, 1.0)

    def _coefficients(self, gram_PP, index, current_T):
        n_P = self.normalizers(gram_PP, index, current_T)
        scaled_PP = gram_PP / np.outer(n_P, n_P)
        if self.solver == "exact":
            gamma_P = solvers.min_norm_exact(scaled_PP)
        else:
            gamma_P = solvers.min_norm_frank_wolfe(scaled_PP, self.max_iter, self.tol)
        return gamma_P / n_P

    def _observe(self, global_losses_T, present_T):
        losses = torch.from_numpy(global_losses_T).to(self.last_loss_T.device)
        self.last_loss_T.copy_(torch.where(torch.from_numpy(present_T).to(losses.device), losses, self.last_loss_T))


class CAGrad(GramWeighting):
    """CAGrad (Liu et al. 2021): the best worst-task improvement within a ball around the mean gradient.

    g0 = mean of the present g_t; w = argmin over the simplex <g_w, g0> + c |g0| |g_w|; the direction
    is (g0 + lambda g_w) / r with lambda = c |g0| / |g_w| (official code; solvers.cagrad_weights).

    Args:
        c: the ball's radius relative to |g0| (0.5 in the paper; 0 gives EW).
        rescale: the official code's divisor r: 0 none, 1 (default) 1 + c^2, 2 1 + c.
    """

    method = "cagrad"

    def __init__(self, num_tasks: int, *, c: float = 0.5, rescale: int = 1, world_size: int = 1) -> None:
        super().__init__(num_tasks, world_size=world_size)
        check_number("c", c, low=0.0)
        check_choice("rescale", rescale, (0, 1, 2))
        self.c, self.rescale = float(c), rescale

    def _coefficients(self, gram_PP, index, current_T):
        return solvers.cagrad_weights(gram_PP, self.c, self.rescale)


class IMTL(TaskWeighting):
    """IMTL (Liu et al. 2021): IMTL-G's impartial gradient combination and IMTL-L's learned loss scales.

    IMTL-L scales each loss by e^{s_t} and adds -s_t: loss_t = e^{s_t} L_t - s_t, s_T (`log_scale_T`, an
    nn.Parameter, initialised to 0), so s_t tends to -log L_t. IMTL-G then takes the scaled gradients
    e^{s_t} g_t (Gram entries times e^{s_i + s_j}) and returns alpha with sum alpha = 1 and equal
    projections of the direction on every unit gradient (solvers.imtl_g_weights); the weight of
    L_t is alpha_t e^{s_t}. A task whose gradient is zero gets alpha 1/P (P present tasks) and the
    others' alphas, still impartial among themselves, sum to the rest, so sum alpha = 1 always.

    Modes: 'hybrid' (default: both, as the paper and LibMTL), 'gradient' (IMTL-G alone, weights
    alpha_t) and 'loss' (IMTL-L alone: loss = sum e^{s_t} L_t - s_t, needs no Gram).
    In 'hybrid' the loss is sum_t alpha_t e^{s_t} L_t plus a term that is 0 in value and gives s_t its
    IMTL-L gradient e^{s_t} L_t - 1 (LibMTL's: the scale's gradient from the scaled loss itself).
    """

    method = "imtl"

    def __init__(self, num_tasks: int, *, mode: str = "hybrid", world_size: int = 1) -> None:
        super().__init__(num_tasks, world_size=world_size)
        check_choice("mode", mode, ("hybrid", "gradient", "loss"))
        self.mode = mode
        self.needs_gram = mode != "loss"
        if mode != "gradient":
            self.log_scale_T = nn.Parameter(torch.zeros(num_tasks))

    def _weights(self, losses_T, present_T, gram_TT, current_T):
        if self.mode == "loss":
            present = present_T.to(self.log_scale_T.device)
            term = -torch.where(present, self.log_scale_T, torch.zeros_like(self.log_scale_T)).sum() / self.world_size
            return torch.exp(self.log_scale_T).to(losses_T), term.to(losses_T)
        index = np.flatnonzero(present_T.numpy())
        scale_T = np.ones(self.num_tasks)
        if self.mode == "hybrid":
            scale_T = np.exp(self.log_scale_T.detach().double().cpu().numpy())  # NOTE: device-to-host sync
        gram_PP = gram_TT[np.ix_(index, index)] * np.outer(scale_T[index], scale_T[index])
        # Tasks with a zero gradient (e.g. all shared parameters frozen) take no part in IMTL-G's
        # equations; each gets 1/P and the others share the rest, so all-zero gradients give EW.
        alpha_T = np.zeros(self.num_tasks)
        alpha_T[index] = 1.0 / len(index)
        nonzero = np.diag(gram_PP) > 0.0
        if nonzero.any():
            share = nonzero.sum() / len(index)
            alpha_T[index[nonzero]] = share * solvers.imtl_g_weights(gram_PP[np.ix_(nonzero, nonzero)])
        weights_T = self._to_losses(alpha_T * scale_T, losses_T)
        if self.mode == "gradient":
            return weights_T, None
        s_T = self.log_scale_T
        present = present_T.to(s_T.device)
        loss_d = losses_T.detach().to(s_T)
        # value 0; d/ds_t = e^{s_t} L_t - 1/world_size per rank, e^{s_t} L_t - 1 summed over ranks
        term_T = (torch.exp(s_T) - torch.exp(s_T).detach()) * loss_d - (s_T - s_T.detach()) / self.world_size
        term = torch.where(present, term_T, torch.zeros_like(term_T)).sum()
        return weights_T, term.to(losses_T)


class NashMTL(TaskWeighting):
    """Nash-MTL (Navon et al. 2022): the Nash bargaining solution alpha > 0, alpha_i (G alpha)_i = 1.

    G is the Gram of the present tasks' raw gradients, so the direction sum_i alpha_i g_i has
    norm sqrt(alpha^T G alpha) = sqrt(P) for P present tasks, whatever the gradients' scale. As the
    official code, the equations are solved on G / |G|_F for conditioning and the solution is
    mapped back: if beta_i (G/f beta)_i = 1 then alpha = beta / sqrt(f) solves alpha_i (G alpha)_i = 1
    (the official convex program keeps the raw scale in its constraint log(alpha_i f) +
    log((G/f alpha)_i) >= 0). Here the equations are solved exactly, by Newton (solvers.nash_weights;
    the official code iterates a convex program to a 1e-3 residual). The direction's norm on the
    shared parameters is then clipped to max_norm (official: clip_grad_norm_ of the shared parameters
    after the backward; here the norm sqrt(alpha^T G alpha) comes from the Gram, and the factor
    min(1, max_norm / (norm + 1e-6)) multiplies the weights, so task-specific parameters are scaled
    too). Where no solution exists (0 in the gradients' cone), each task keeps its previous alpha
    (initially 1), as the official code does when its solver fails.

    Args:
        max_norm: clip of the direction's norm; 0 turns it off (official default 1.0).
        update_every: solve every this many optimizer steps (counted by after_optimizer_step) and
            reuse alpha in between (official default 1). A change of the present tasks forces a solve.
    """

    method = "nash_mtl"
    needs_gram = True

    def __init__(self, num_tasks: int, *, max_norm: float = 1.0, update_every: int = 1, world_size: int = 1) -> None:
        super().__init__(num_tasks, world_size=world_size)
        check_number("max_norm", max_norm, low=0.0)
        check_number("update_every", update_every, low=1, integer=True)
        self.max_norm, self.update_every = float(max_norm), update_every
        self.register_buffer("alpha_T", torch.ones(num_tasks, dtype=torch.float64))
        self.register_buffer("solved_present_T", torch.zeros(num_tasks, dtype=torch.bool))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        # Marks alpha_T as on the raw gradients' scale (states saved before it held G/|G|_F's alpha).
        self.register_buffer("raw_scale", torch.ones((), dtype=torch.bool))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        if prefix + "raw_scale" not in state_dict:
            # An older state: its alpha is on the normalised Gram's scale. Keep it only as the fallback
            # for a failed solve and force a solve on the next step (a present-task set never seen).
            state_dict = {**state_dict, prefix + "raw_scale": torch.ones((), dtype=torch.bool)}
            if prefix + "solved_present_T" in state_dict:
                state_dict[prefix + "solved_present_T"] = torch.zeros_like(state_dict[prefix + "solved_present_T"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _solves_now(self, present_T: torch.Tensor) -> bool:
        due = int(self.step) % self.update_every == 0
        return due or not torch.equal(present_T.cpu(), self.solved_present_T.cpu())

    def wants_gram(self, present_T: torch.Tensor) -> bool:
        return self.max_norm > 0 or self._solves_now(present_T)

    def _weights(self, losses_T, present_T, gram_TT, current_T):
        index = np.flatnonzero(present_T.numpy())
        alpha_T = self.alpha_T.cpu().numpy().copy()
        if self._solves_now(present_T):
            gram_PP = gram_TT[np.ix_(index, index)]
            frobenius = float(np.linalg.norm(gram_PP))
            solution = solvers.nash_weights(gram_PP / frobenius) if frobenius > 0 else None
            if solution is not None:
                alpha_T[index] = solution / np.sqrt(frobenius)  # back to the raw gradients' scale
                self.alpha_T.copy_(torch.from_numpy(alpha_T))
            self.solved_present_T.copy_(present_T.to(self.solved_present_T.device))
        weights_T = np.where(present_T.numpy(), alpha_T, 0.0)
        if self.max_norm > 0:
            alpha_P = weights_T[index]
            norm = float(np.sqrt(max(alpha_P @ gram_TT[np.ix_(index, index)] @ alpha_P, 0.0)))
            weights_T = weights_T * min(1.0, self.max_norm / (norm + 1e-6))
        return self._to_losses(weights_T, losses_T), None

    def after_optimizer_step(self) -> None:
        self.step += 1
