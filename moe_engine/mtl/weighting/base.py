"""`TaskWeighting`, the interface every multi-task loss weighting implements, and the Gram helpers.

Every method, loss-based or gradient-based, reduces to task weights on the losses: the trainer
calls `combine(losses_T, present_T, gram_TT)` once a step and backpropagates the one loss it
returns. A gradient method's update direction on the shared parameters is a linear combination
sum_t alpha_t g_t of the task gradients whose coefficients follow from inner products alone, so
weighting the losses by alpha_t gives that direction with one ordinary backward (every parameter,
experts under expert parallelism included, and no extra collective). Task-specific parameters then
get alpha_t times their task's gradient; in the papers' code they get the plain task gradient.

Data parallelism. `losses_T` are this rank's shares (the ranks' values add up to the global losses)
and gradients are SUM-all-reduced (moe_engine.parallel.runtime). The gradient of a term that does
not scale with the data (UW's s_t, IMTL-L's -s_t, GradNorm's own loss) is divided by `world_size`
so the sum over ranks counts it once: the trainer must SUM-all-reduce the gradients of this
module's parameters over the data-parallel group, as it does for the model's replicated ones.
`gram_TT`, `present_T`, `global_losses_T` and the losses given to `observe` are global and equal on
every rank, so every rank computes the same weights and the same state.

Helpers for the trainer: `task_gradients` (the per-task gradients of a list of shared parameters,
one row per task, to all-reduce) and `gram_matrix`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn


class TaskWeighting(nn.Module):
    """Base class: validates the arguments and handles absent tasks; subclasses implement `_weights`.

    Args:
        num_tasks: T, the number of tasks (>= 1).
        world_size: data-parallel ranks whose losses add up to the global loss (set by the trainer,
            not a user option); divides the gradients of data-independent terms (module docstring).

    Attributes:
        method: the name `build_weighting` knows the method by.
        needs_gram: True when `combine` needs the Gram matrix of the task gradients.
    """

    method: str = ""
    needs_gram: bool = False

    def __init__(self, num_tasks: int, *, world_size: int = 1) -> None:
        super().__init__()
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks = {num_tasks!r}: expected an int >= 1")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size = {world_size!r}: expected an int >= 1")
        self.num_tasks = num_tasks
        self.world_size = world_size

    @classmethod
    def options(cls) -> dict[str, Any]:
        """The method's keyword options and their defaults (world_size included)."""
        defaults = {}
        for klass in reversed(cls.__mro__):
            if "__init__" not in vars(klass) or not issubclass(klass, TaskWeighting):
                continue
            for name, param in inspect.signature(klass.__init__).parameters.items():
                if param.kind is inspect.Parameter.KEYWORD_ONLY:
                    defaults[name] = param.default
        return defaults

    # ---- the interface -------------------------------------------------------------------------

    def wants_gram(self, present_T: torch.Tensor) -> bool:
        """Whether the next `combine` with these present tasks uses gram_TT. Equal to `needs_gram`
        except for Nash-MTL with update_every > 1 and max_norm = 0, which reuses its weights between
        updates: the trainer may then skip the per-task gradients on the other steps."""
        return self.needs_gram

    def combine(
        self,
        losses_T: torch.Tensor,
        present_T: torch.Tensor,
        gram_TT: torch.Tensor | None = None,
        *,
        global_losses_T: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The weighted loss of one step and the task weights.

        Args:
            losses_T: (T,) float per-task losses with graph, this rank's shares (absent tasks: any
                value, usually 0; they get weight 0 and no gradient).
            present_T: (T,) bool, the tasks in this step's global batch (equal on every rank).
            gram_TT: (T, T) float, G G^T of the global task gradients of the shared parameters
                (rows of absent tasks zero); required when `wants_gram(present_T)` and some task is
                present, else ignored.
            global_losses_T: optional (T,) float, this step's global (all-reduced) task losses,
                detached. GradNorm's loss ratios and MGDA's 'loss'/'loss+' normalisation use them;
                without them they use the losses of the last `observe` (one step behind). Pass them
                when the trainer has them before the backward; in a single process,
                losses_T.detach() is exactly that.

        Returns:
            (loss, weights_T): loss = sum_t weights_T[t] * losses_T[t] + the method's own terms
            (UW's s_t, IMTL-L's and GradNorm's terms for their parameters), a scalar with graph;
            weights_T (T,) detached, in losses_T's dtype and device, 0 for absent tasks. With no
            task present, loss = 0 (with graph) and the weights are 0; no state changes.
        """
        T = self.num_tasks
        if not isinstance(losses_T, torch.Tensor) or losses_T.shape != (T,) or not losses_T.is_floating_point():
            raise ValueError(f"losses_T: expected a float tensor of shape ({T},); got {_describe(losses_T)}")
        present_cpu = self._check_present(present_T)
        needs_gram = bool(present_cpu.any()) and self.wants_gram(present_cpu)  # nothing to weigh: no Gram needed
        gram = None
        if gram_TT is not None:
            if not isinstance(gram_TT, torch.Tensor) or gram_TT.shape != (T, T) or not gram_TT.is_floating_point():
                raise ValueError(f"gram_TT: expected a float tensor of shape ({T}, {T}); got {_describe(gram_TT)}")
            # NOTE: device-to-host sync; the solvers are tiny CPU problems in float64
            gram = gram_TT.detach().to(device="cpu", dtype=torch.float64).numpy()
            gram = 0.5 * (gram + gram.T)  # an fp32 G @ G.T need not be exactly symmetric
        elif needs_gram:
            raise ValueError(
                f"{self.method} needs gram_TT (the ({T}, {T}) Gram matrix of the task gradients of the shared "
                "parameters); got None"
            )
        current = None
        if global_losses_T is not None:
            if not isinstance(global_losses_T, torch.Tensor) or global_losses_T.shape != (T,):
                raise ValueError(
                    f"global_losses_T: expected a tensor of shape ({T},); got {_describe(global_losses_T)}"
                )
            current = global_losses_T.detach().to(device="cpu", dtype=torch.float64).numpy()
        present_dev = present_cpu.to(losses_T.device)
        # Absent entries zeroed first: a NaN there then reaches neither the loss nor any gradient.
        losses_T = torch.where(present_dev, losses_T, torch.zeros_like(losses_T))
        if not bool(present_cpu.any()):
            return (losses_T * 0.0).sum(), torch.zeros_like(losses_T).detach()
        index = np.flatnonzero(present_cpu.numpy())
        if needs_gram and not np.all(np.isfinite(gram[np.ix_(index, index)])):
            # Non-finite gradients: NaN weights make the loss and its gradient NaN, so the trainer's
            # non-finite guard stops before the update; no solver runs and no state changes.
            nan_T = torch.where(present_dev, float("nan"), 0.0).to(losses_T)
            return (nan_T * losses_T).sum(), nan_T
        weights_T, extra = self._weights(losses_T, present_cpu, gram, current)
        loss = (weights_T * losses_T).sum()
        if extra is not None:
            loss = loss + extra
        return loss, torch.where(present_dev, weights_T.detach(), torch.zeros_like(losses_T)).detach()

    def observe(self, global_losses_T: torch.Tensor, present_T: torch.Tensor) -> None:
        """Record one finished step's global task losses (detached; entries of absent tasks are ignored).

        Deterministic and collective-free: every rank passes the same all-reduced losses.
        """
        T = self.num_tasks
        if not isinstance(global_losses_T, torch.Tensor) or global_losses_T.shape != (T,):
            raise ValueError(f"global_losses_T: expected a tensor of shape ({T},); got {_describe(global_losses_T)}")
        present_cpu = self._check_present(present_T)
        # NOTE: device-to-host sync (T numbers), unless the trainer passes host tensors
        self._observe(global_losses_T.detach().to(device="cpu", dtype=torch.float64).numpy(), present_cpu.numpy())

    def after_optimizer_step(self) -> None:
        """Called once after each optimizer step (GradNorm renormalises, Nash-MTL counts steps)."""

    # ---- for subclasses ------------------------------------------------------------------------

    def _weights(
        self, losses_T: torch.Tensor, present_T: torch.Tensor, gram_TT: np.ndarray | None, current_T: np.ndarray | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weights_T, extra): weights (T,) on losses_T's device (with graph where the loss must
        differentiate them, e.g. UW's exp(-s)), and an optional scalar term added to the loss.
        present_T: CPU bool with at least one True; gram_TT: float64 (T, T) or None; current_T:
        float64 global losses of this step or None."""
        raise NotImplementedError

    def _observe(self, global_losses_T: np.ndarray, present_T: np.ndarray) -> None:
        """Hook for `observe`: float64 (T,) losses and bool (T,) mask, both NumPy."""

    def _check_present(self, present_T: torch.Tensor) -> torch.Tensor:
        T = self.num_tasks
        if not isinstance(present_T, torch.Tensor) or present_T.shape != (T,) or present_T.dtype != torch.bool:
            raise ValueError(f"present_T: expected a bool tensor of shape ({T},); got {_describe(present_T)}")
        return present_T.detach().cpu()  # NOTE: device-to-host sync of T booleans when on an accelerator

    def _to_losses(self, values_T: np.ndarray, losses_T: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(values_T, dtype=torch.float64).to(device=losses_T.device, dtype=losses_T.dtype)

    def extra_repr(self) -> str:
        options = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.options() if hasattr(self, name))
        return f"num_tasks={self.num_tasks}" + (f", {options}" if options else "")


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return repr(value) if value is None else type(value).__name__


def check_choice(name: str, value: object, allowed: Sequence[object]) -> None:
    """Raise ValueError naming the option, its value and the allowed values unless value is one of them."""
    if value not in allowed:
        raise ValueError(f"{name} = {value!r}: expected one of {', '.join(repr(a) for a in allowed)}")


def check_number(name: str, value: object, *, low: float, low_open: bool = False, integer: bool = False) -> None:
    """Raise ValueError unless value is a finite (integer, if asked) number >= low (> low if low_open)."""
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and np.isfinite(value)
    ok = ok and (value > low if low_open else value >= low)
    if not ok:
        what = "an int" if integer else "a finite number"
        raise ValueError(f"{name} = {value!r}: expected {what} {'>' if low_open else '>='} {low}")


def task_gradients(
    losses_T: torch.Tensor, present_T: torch.Tensor, params: Sequence[torch.Tensor]
) -> torch.Tensor:
    """(T, P) float32: row t = the gradient of losses_T[t] w.r.t. params, flattened and concatenated.

    Rows of absent tasks are zero, and so are the entries of parameters a task's loss does not
    reach. The graph is kept (retain_graph) for the weighted backward that follows. This rank's
    rows; the trainer SUM-all-reduces them over the data-parallel group before `gram_matrix`.
    """
    params = list(params)
    if not params:
        raise ValueError("params is empty: expected the shared parameters whose task gradients form the Gram")
    sizes = [p.numel() for p in params]
    grads_TP = torch.zeros(len(losses_T), sum(sizes), dtype=torch.float32, device=params[0].device)
    for t in torch.nonzero(present_T.cpu()).flatten().tolist():
        grads = torch.autograd.grad(losses_T[t], params, retain_graph=True, allow_unused=True)
        grads_TP[t] = torch.cat([
            g.reshape(-1).float() if g is not None else torch.zeros(n, device=grads_TP.device)
            for g, n in zip(grads, sizes)
        ])
    return grads_TP


def gram_matrix(grads_TP: torch.Tensor) -> torch.Tensor:
    """(T, T) float32 Gram matrix G G^T of the rows of grads_TP (accumulated in float64)."""
    if grads_TP.ndim != 2:
        raise ValueError(f"grads_TP: expected a (T, P) tensor; got shape {tuple(grads_TP.shape)}")
    grads = grads_TP.double()
    return (grads @ grads.T).float()
