"""Weightings from the losses: equal (EW), uncertainty (UW), DWA, and GradNorm (which also reads the Gram's diagonal).

Scales (the sum of the weights when every task is alike): EW 1 (the mean over present tasks, as
the trainer had before); UW, DWA and GradNorm the number of tasks, as in their papers. Compare
methods at learning rates scaled accordingly.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from moe_engine.mtl.weighting.base import TaskWeighting, check_number


class EqualWeighting(TaskWeighting):
    """EW: weight 1 / num_present on every present task, the mean of the present tasks' losses."""

    method = "equal"

    def _weights(self, losses_T, present_T, gram_TT, current_T):
        weights_T = present_T.double() / present_T.sum()
        return self._to_losses(weights_T.numpy(), losses_T), None


class UncertaintyWeighting(TaskWeighting):
    """UW (Kendall et al. 2018): loss = sum over present tasks of exp(-s_t) L_t + s_t, s = log sigma^2.

    s_T (`log_var_T`, an nn.Parameter, initialised to 0) is learned with the model. Its gradient is
    1 - exp(-s_t) L_t, so s_t tends to log L_t. The weights are exp(-s_t). (LibMTL halves the loss:
    exp(-s) L / 2 + s / 2; same optimum in s, half the step.)
    """

    method = "uncertainty"

    def __init__(self, num_tasks: int, *, world_size: int = 1) -> None:
        super().__init__(num_tasks, world_size=world_size)
        self.log_var_T = nn.Parameter(torch.zeros(num_tasks))

    def _weights(self, losses_T, present_T, gram_TT, current_T):
        present = present_T.to(self.log_var_T.device)
        weights_T = torch.exp(-self.log_var_T).to(losses_T)
        # s_t is counted once over the ranks: each adds s_t / world_size
        regulariser = torch.where(present, self.log_var_T, torch.zeros_like(self.log_var_T)).sum() / self.world_size
        return weights_T, regulariser.to(losses_T)


class DynamicWeightAverage(TaskWeighting):
    """DWA (Liu et al. 2019): weights from each task's rate of loss descent over the last two epochs.

    lambda_t = K exp(w_t / temperature) / sum_present exp(w_i / temperature), w_t = Lbar_t(e-1) / Lbar_t(e-2),
    K = the number of present tasks, Lbar_t(e) = the mean of task t's global losses over epoch e.

    An epoch here is `window` calls of `observe` (optimizer steps): the paper averages each epoch's
    losses, and a single step's loss is too noisy for a ratio; set window to the steps of an epoch
    to match the paper. Each task's mean is over the steps it was present; a task absent for a whole
    window records no mean for it and keeps its older means. A task with fewer than two recorded
    means has w_t = 1 (no trend known), so the first two epochs give every task weight 1.

    Args:
        temperature: T in the paper (2); larger flattens the weights.
        window: steps per epoch (default 20).
    """

    method = "dwa"

    def __init__(self, num_tasks: int, *, temperature: float = 2.0, window: int = 20, world_size: int = 1) -> None:
        super().__init__(num_tasks, world_size=world_size)
        check_number("temperature", temperature, low=0.0, low_open=True)
        check_number("window", window, low=1, integer=True)
        self.temperature = float(temperature)
        self.window = window
        self.register_buffer("epoch_sum_T", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("epoch_count_T", torch.zeros(num_tasks, dtype=torch.int64))
        self.register_buffer("steps_in_epoch", torch.zeros((), dtype=torch.int64))
        self.register_buffer("mean_prev_T", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("mean_last_T", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("num_means_T", torch.zeros(num_tasks, dtype=torch.int64))

    def ratios(self) -> torch.Tensor:
        """(T,) float64 w_t = Lbar_t(e-1) / Lbar_t(e-2); 1 for tasks with fewer than two epoch means,
        and for a task whose earlier mean is 0 (a loss that reached exactly 0: no trend to read)."""
        prev, last = self.mean_prev_T.cpu(), self.mean_last_T.cpu()
        known = (self.num_means_T.cpu() >= 2) & (prev > 0)
        return torch.where(known, last / torch.where(known, prev, torch.ones_like(prev)), torch.ones_like(prev))

    def _weights(self, losses_T, present_T, gram_TT, current_T):
        logits_T = self.ratios() / self.temperature
        logits_T = torch.where(present_T, logits_T, torch.full_like(logits_T, -torch.inf))
        weights_T = present_T.sum() * torch.softmax(logits_T, dim=0)
        return self._to_losses(weights_T.numpy(), losses_T), None

    def _observe(self, global_losses_T, present_T):
        present = torch.from_numpy(present_T).to(self.epoch_sum_T.device)
        losses = torch.from_numpy(global_losses_T).to(self.epoch_sum_T.device)
        self.epoch_sum_T += torch.where(present, losses, torch.zeros_like(losses))
        self.epoch_count_T += present.long()
        self.steps_in_epoch += 1
        if int(self.steps_in_epoch) < self.window:
            return
        seen = self.epoch_count_T > 0
        mean_T = self.epoch_sum_T / self.epoch_count_T.clamp(min=1)
        self.mean_prev_T.copy_(torch.where(seen, self.mean_last_T, self.mean_prev_T))
        self.mean_last_T.copy_(torch.where(seen, mean_T, self.mean_last_T))
        self.num_means_T.copy_(torch.where(seen, (self.num_means_T + 1).clamp(max=2), self.num_means_T))
        self.epoch_sum_T.zero_()
        self.epoch_count_T.zero_()
        self.steps_in_epoch.zero_()


class GradNorm(TaskWeighting):
    """GradNorm (Chen et al. 2018): learned weights w_t that balance the tasks' gradient norms.

    G_t = |grad_W (w_t L_t)| = w_t sqrt(gram_tt) (exact: w_t is a scalar), Gbar = the mean over present
    tasks, r_t = Ltilde_t / mean_present(Ltilde), Ltilde_t = L_t / L_t(0), and GradNorm's loss
    L_grad = sum_present |G_t - Gbar r_t^alpha| with the target Gbar r_t^alpha held constant.

    - L_t(0): the task's first global loss given to `observe` (at its first present step). L_t: this
      step's global loss if `combine` gets global_losses_T, else the last observed one; a task
      with no known L_t(0) or L_t has Ltilde_t = 1 (as at step 0).
    - `weights_T` (an nn.Parameter, initialised to 1) gets its gradient from L_grad alone: the loss
      `combine` returns is sum_t w_t.detach() L_t + (L_grad - L_grad.detach()) / world_size, whose
      second term is 0 in value and whose backward reaches only the weights (the Gram is
      constant). This works with any optimizer.zero_grad() placement and under DeepSpeed, where
      writing .grad inside combine would not.
    - `after_optimizer_step` clamps the present tasks' weights to >= 1e-4 (a weight pushed below 0
      by a large step would maximise its task's loss) and rescales them so all weights sum to T,
      leaving absent tasks' weights untouched.

    Args:
        alpha: the asymmetry (1.5 in the paper); 0 balances the gradient norms exactly.
    """

    method = "gradnorm"
    needs_gram = True
    min_weight = 1e-4

    def __init__(self, num_tasks: int, *, alpha: float = 1.5, world_size: int = 1) -> None:
        super().__init__(num_tasks, world_size=world_size)
        check_number("alpha", alpha, low=0.0)
        self.alpha = float(alpha)
        self.weights_T = nn.Parameter(torch.ones(num_tasks))
        self.register_buffer("initial_loss_T", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("last_loss_T", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("seen_T", torch.zeros(num_tasks, dtype=torch.bool))
        self.register_buffer("last_present_T", torch.zeros(num_tasks, dtype=torch.bool))

    def loss_ratios(self, present_T: torch.Tensor, current_T: np.ndarray | None = None) -> np.ndarray:
        """(T,) float64 r_t over the present tasks (0 for absent ones)."""
        present = present_T.cpu().numpy()
        seen = self.seen_T.cpu().numpy()
        initial = self.initial_loss_T.cpu().numpy()
        current = self.last_loss_T.cpu().numpy() if current_T is None else current_T
        known = present & seen & (initial > 0) & np.isfinite(current)
        tilde = np.where(known, current / np.where(known, initial, 1.0), 1.0)
        tilde = np.where(present, tilde, 0.0)
        mean = tilde[present].mean()
        return tilde / mean if mean > 0 else np.where(present, 1.0, 0.0)

    def gradnorm_loss(self, present_T: torch.Tensor, gram_TT: np.ndarray, current_T: np.ndarray | None = None):
        """GradNorm's L_grad (a scalar whose graph reaches only weights_T)."""
        device = self.weights_T.device
        present = present_T.to(device)
        norm_T = torch.as_tensor(np.sqrt(np.clip(np.diag(gram_TT), 0.0, None)), dtype=torch.float32, device=device)
        G_T = self.weights_T * norm_T
        G_present = torch.where(present, G_T, torch.zeros_like(G_T))
        mean_G = G_present.detach().sum() / present.sum()
        r_T = torch.as_tensor(self.loss_ratios(present_T, current_T), dtype=torch.float32, device=device)
        target_T = (mean_G * r_T**self.alpha).detach()
        return torch.where(present, (G_T - target_T).abs(), torch.zeros_like(G_T)).sum()

    def _weights(self, losses_T, present_T, gram_TT, current_T):
        self.last_present_T.copy_(present_T.to(self.last_present_T.device))
        l_grad = self.gradnorm_loss(present_T, gram_TT, current_T)
        extra = (l_grad - l_grad.detach()) / self.world_size
        return self.weights_T.detach().to(losses_T), extra.to(losses_T)

    def _observe(self, global_losses_T, present_T):
        present = torch.from_numpy(present_T).to(self.seen_T.device)
        losses = torch.from_numpy(global_losses_T).to(self.initial_loss_T.device)
        first = present & ~self.seen_T
        self.initial_loss_T.copy_(torch.where(first, losses, self.initial_loss_T))
        self.last_loss_T.copy_(torch.where(present, losses, self.last_loss_T))
        self.seen_T |= present

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        present = self.last_present_T.to(self.weights_T.device)
        w = self.weights_T
        clamped = torch.where(present, w.clamp(min=self.min_weight), w)
        absent_sum = torch.where(present, torch.zeros_like(w), clamped).sum()
        present_sum = torch.where(present, clamped, torch.zeros_like(w)).sum()
        target = (self.num_tasks - absent_sum).clamp(min=self.min_weight)
        factor = torch.where(present_sum > 0, target / present_sum.clamp(min=1e-30), torch.ones_like(target))
        w.copy_(torch.where(present, clamped * factor, clamped))
