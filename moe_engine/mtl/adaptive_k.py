"""`AdaptiveTopK`: each task's number of experts k, moved by its validation loss (AdaMV-MoE, Chen et al. 2023).

AdaMV-MoE gives every task its own router and raises or lowers each task's k from the trend of that
task's validation loss; the paper does not pin down the exact schedule, so this module implements the
following rule, per task x, after every validation (`update`):

1. The first loss a task reports sets its baseline `best`; k does not move (there is no trend yet).
2. Afterwards the loss L *improved* when L < best - tolerance * |best| (a relative margin; tolerance 0:
   any decrease counts). Then best = L, the stall count resets to 0, and k falls by 1 (the task is
   learning well: try cheaper routing).
3. Otherwise the stall count rises by 1; when it reaches `patience`, k rises by 1 (the task has stalled:
   give it more capacity) and the stall count resets to 0, so another rise needs `patience` more
   stalled validations. `best` is not changed by a loss that did not improve. A loss that is not
   finite (NaN, inf: a diverged task) always counts as stalled and never becomes the baseline.
4. k stays in [k_min, k_max]: a step past a bound leaves k at the bound (the stall count still resets).

Example, patience 2, tolerance 0, k_min 1, k_max 4, k starting at 4, losses 1.0, 0.9, 0.8, 0.85, 0.84,
0.83, 0.7: k = 4 (baseline), 3, 2, 2 (1 stall), 3 (2 stalls), 3 (1 stall), 2 (improved).

The controller writes each new k into the router (`TaskGateRouter.set_task_top_k`), whose
task_top_k_X buffer goes into the model's checkpoint; the controller's own state (best losses, stall
counts, k) goes into `state_dict()` so a resumed run continues the same schedule. In data-parallel
training call `update` with the same (all-reduced) losses on every rank, so all replicas agree on k.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any

from moe_engine.mtl.gates import TaskGateRouter


class AdaptiveTopK:
    """Moves each task's k in a TaskGateRouter from its validation losses (rule: module docstring).

    Args:
        router: the TaskGateRouter whose per-task k this controls.
        k_min: the least k of any task, >= 1.
        k_max: the largest k, <= router.top_k; None for router.top_k.
        patience: validations without improvement before k rises, >= 1.
        tolerance: relative margin a loss must beat its best by to count as improved, >= 0.

    At construction each task's k is the router's current one, clamped into [k_min, k_max] (and written
    back to the router).
    """

    def __init__(
        self, router: TaskGateRouter, *, k_min: int = 1, k_max: int | None = None, patience: int = 1,
        tolerance: float = 0.0,
    ) -> None:
        if not isinstance(router, TaskGateRouter):
            raise ValueError(f"router = {type(router).__name__}: expected a TaskGateRouter (it holds the per-task k)")
        k_max = router.top_k if k_max is None else k_max
        if not 1 <= k_min <= router.top_k:
            raise ValueError(f"k_min = {k_min}: must be in [1, router.top_k = {router.top_k}]")
        if not k_min <= k_max <= router.top_k:
            raise ValueError(f"k_max = {k_max}: must be in [k_min = {k_min}, router.top_k = {router.top_k}]")
        if patience < 1:
            raise ValueError(f"patience = {patience}: must be >= 1")
        if not tolerance >= 0:
            raise ValueError(f"tolerance = {tolerance}: must be >= 0")
        self.router = router
        self.num_tasks = router.num_tasks
        self.k_min, self.k_max = k_min, k_max
        self.patience, self.tolerance = patience, tolerance
        self.best: list[float | None] = [None] * self.num_tasks
        self.num_stalled = [0] * self.num_tasks
        self.task_k = [min(max(int(k), k_min), k_max) for k in router.task_top_k_X.tolist()]
        self._write_router()

    @property
    def k(self) -> dict[int, int]:
        """The current k of each task."""
        return dict(enumerate(self.task_k))

    def update(self, val_losses: Mapping[int, float] | Sequence[float]) -> dict[int, int]:
        """Apply one validation's losses; returns the new k of every task.

        val_losses: a loss per task (a sequence of length num_tasks), or a mapping {task: loss} for the
        tasks validated this time (the others keep their state).
        """
        for task, loss in self._losses_by_task(val_losses).items():
            best = self.best[task]
            finite = math.isfinite(loss)
            if best is None and finite:
                self.best[task] = loss
            elif best is not None and finite and loss < best - self.tolerance * abs(best):
                self.best[task], self.num_stalled[task] = loss, 0
                self.task_k[task] = max(self.task_k[task] - 1, self.k_min)
            else:
                self.num_stalled[task] += 1
                if self.num_stalled[task] >= self.patience:
                    self.num_stalled[task] = 0
                    self.task_k[task] = min(self.task_k[task] + 1, self.k_max)
        self._write_router()
        return self.k

    def _losses_by_task(self, val_losses: Mapping[int, float] | Sequence[float]) -> dict[int, float]:
        if isinstance(val_losses, Mapping):
            losses = dict(val_losses)
        elif isinstance(val_losses, Sequence) and not isinstance(val_losses, str):
            if len(val_losses) != self.num_tasks:
                raise ValueError(f"val_losses has {len(val_losses)} losses: expected one per task ({self.num_tasks})")
            losses = dict(enumerate(val_losses))
        else:
            raise ValueError(
                f"val_losses = {type(val_losses).__name__}: expected a mapping {{task: loss}} or a sequence"
            )
        checked = {}
        for task, loss in losses.items():
            try:
                index = operator.index(task)
            except TypeError:
                index = -1
            if isinstance(task, bool) or not 0 <= index < self.num_tasks:
                raise ValueError(f"val_losses has task {task!r}: tasks are ints in [0, {self.num_tasks - 1}]")
            checked[index] = float(loss)
        return checked

    def _write_router(self) -> None:
        for task, k in enumerate(self.task_k):
            self.router.set_task_top_k(task, k)

    def state_dict(self) -> dict[str, Any]:
        """Best losses, stall counts and k per task (plain Python values)."""
        return {"best": list(self.best), "num_stalled": list(self.num_stalled), "task_k": list(self.task_k)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`'s output and write its k into the router."""
        missing = {"best", "num_stalled", "task_k"} - set(state)
        if missing:
            raise ValueError(f"AdaptiveTopK state lacks {', '.join(sorted(missing))}")
        for name in ("best", "num_stalled", "task_k"):
            if len(state[name]) != self.num_tasks:
                raise ValueError(
                    f"AdaptiveTopK state {name!r} has {len(state[name])} entries: expected {self.num_tasks}"
                )
        task_k = [int(k) for k in state["task_k"]]
        bad = [k for k in task_k if not self.k_min <= k <= self.k_max]
        if bad:
            raise ValueError(
                f"AdaptiveTopK state task_k = {task_k}: each must be in [k_min = {self.k_min}, k_max = {self.k_max}]"
            )
        self.best = [None if b is None else float(b) for b in state["best"]]
        self.num_stalled = [int(n) for n in state["num_stalled"]]
        self.task_k = task_k
        self._write_router()
