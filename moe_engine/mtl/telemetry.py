"""Task x expert routing telemetry: which experts each task's tokens use, accumulated over steps.

Per MoE layer l, task t and expert e the accumulators hold
    C[l, t, e] = kept choices of task t's tokens routed to expert e   (choices dropped as -1 are not counted)
    N[l, t]    = tokens of task t
    S[l, t]    = sum over task t's tokens of H(p_token) = -sum_e p_e log p_e   (nats; p = the router's scores)
from which
    utilisation U[t, e] = C[t, e] / sum_e C[t, e]            (0 for a task with no routed choice)
    token entropy       = S[t] / N[t]                         (how undecided the router is per token)
    usage entropy       = H(U[t, :])                          (low: task t specialises on few experts)
    task_expert_mi      = sum P log(P / (P(t) P(e))), P = C / sum(C)   (Mod-Squad's I(task; expert))
Accumulation stays on the routing's device and never syncs with the host; reading the numbers
(`scalars`, `utilisation`, ...) does. Nothing here calls torch.distributed: a data-parallel trainer
sums `tensors()` over ranks itself (see `tensors` and `copy`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch

from moe_engine.mtl.statistics import check_task_ids
from moe_engine.routing.types import Routing

_WHO = "TaskExpertTelemetry"
# Heatmaps with more cells than this get no numbers in their cells: they would not be legible.
_MAX_ANNOTATED_CELLS = 256


class TaskExpertTelemetry:
    """Accumulates task x expert routing counts and routing entropy for `num_layers` MoE layers.

    num_layers: MoE layers, in the order of the model's `routings`; num_experts: E of every layer;
    num_tasks: X; task_names: X distinct names for logs and heatmaps (default task0, task1, ...).
    The accumulators (float64, exact for counts below 2**53) start on the CPU and move, once, to
    the device of the first routing passed to `update`.
    """

    def __init__(self, num_layers: int, num_experts: int, num_tasks: int, task_names: Sequence[str] | None = None) -> None:
        for name, value in (("num_layers", num_layers), ("num_experts", num_experts), ("num_tasks", num_tasks)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} = {value!r}: expected an int >= 1")
        names = [f"task{t}" for t in range(num_tasks)] if task_names is None else list(task_names)
        if len(names) != num_tasks:
            raise ValueError(f"task_names = {names}: expected {num_tasks} names, one per task")
        if any(not isinstance(n, str) or not n for n in names) or len(set(names)) != len(names):
            raise ValueError(f"task_names = {names}: expected distinct non-empty strings (they name log entries)")
        self.num_layers, self.num_experts, self.num_tasks = num_layers, num_experts, num_tasks
        self.task_names = names
        L, X, E = num_layers, num_tasks, num_experts
        self.counts_LXE = torch.zeros(L, X, E, dtype=torch.float64)
        self.tokens_LX = torch.zeros(L, X, dtype=torch.float64)
        self.entropy_sum_LX = torch.zeros(L, X, dtype=torch.float64)

    @classmethod
    def from_counts(cls, counts_LXE: torch.Tensor, task_names: Sequence[str] | None = None) -> TaskExpertTelemetry:
        """Statistics of given choice counts (L, X, E), e.g. of an evaluation, for heatmaps, JSON and
        MI; no token entropies (they need the router's scores)."""
        if counts_LXE.dim() != 3 or (counts_LXE < 0).any():
            raise ValueError(f"counts_LXE has shape {tuple(counts_LXE.shape)}: expected (layers, tasks, experts) of counts >= 0")
        L, X, E = counts_LXE.shape
        telemetry = cls(L, E, X, task_names)
        telemetry.counts_LXE = counts_LXE.detach().double().cpu().clone()
        return telemetry

    # ------------------------------------------------------------------ accumulation

    @torch.no_grad()
    def update(self, routings: Sequence[Routing], task_ids_T: torch.Tensor, *, check_task_range: bool = True) -> None:
        """Add one step's routings (one per MoE layer, each over the same T tokens) to the totals.

        task_ids_T: (T,) integer, the task of each token, in [0, num_tasks). Everything is
        validated before anything is added, so a bad call leaves the totals as they were.
        Checking the task ids' range costs one device-to-host sync (see check_task_ids); a caller
        whose task ids were already checked (a task-conditional router does) passes
        check_task_range=False, and then the update runs without any sync.
        """
        if len(routings) != self.num_layers:
            raise ValueError(f"{_WHO}.update got {len(routings)} routings: expected {self.num_layers}, one per MoE layer")
        num_tokens = task_ids_T.shape[0] if task_ids_T is not None and task_ids_T.dim() == 1 else -1
        for layer, routing in enumerate(routings):
            if routing.scores_TE.dim() != 2 or routing.num_experts != self.num_experts:
                raise ValueError(
                    f"{_WHO}: layer {layer} has scores_TE of shape {tuple(routing.scores_TE.shape)}: "
                    f"expected (T, {self.num_experts}), one column per expert"
                )
            if routing.experts_TK.dim() != 2 or routing.experts_TK.shape[0] != routing.scores_TE.shape[0]:
                raise ValueError(
                    f"{_WHO}: layer {layer} has experts_TK of shape {tuple(routing.experts_TK.shape)} and scores_TE of "
                    f"shape {tuple(routing.scores_TE.shape)}: expected (T, K) and (T, E) with the same T"
                )
            if num_tokens >= 0 and routing.scores_TE.shape[0] != num_tokens:
                raise ValueError(
                    f"{_WHO}: layer {layer} routes {routing.scores_TE.shape[0]} tokens but task_ids_T has "
                    f"{num_tokens}: expected one task id per routed token"
                )
        T = routings[0].scores_TE.shape[0]
        task_ids_T = check_task_ids(task_ids_T, T, self.num_tasks, _WHO, check_range=check_task_range)
        self._move_to(routings[0].scores_TE.device)
        task_ids_T = task_ids_T.to(self.counts_LXE.device, torch.long)
        ones_T = torch.ones(T, dtype=torch.float64, device=task_ids_T.device)
        for layer, routing in enumerate(routings):
            experts_TK = routing.experts_TK.detach().to(task_ids_T.device, torch.long)
            kept_TK = experts_TK >= 0
            # Flat (task, expert) cells and index_add_: O(T*K) work, and no bincount, whose output
            # size would need a device-to-host sync. Dropped choices add 0 to cell (task, 0).
            cell_TK = task_ids_T[:, None] * self.num_experts + experts_TK.clamp_min(0)
            self.counts_LXE[layer].view(-1).index_add_(0, cell_TK.flatten(), kept_TK.flatten().double())
            self.tokens_LX[layer].index_add_(0, task_ids_T, ones_T)
            entropy_T = _entropy(routing.scores_TE.detach().to(task_ids_T.device).float())
            self.entropy_sum_LX[layer].index_add_(0, task_ids_T, entropy_T.double())

    def reset(self) -> None:
        """Zero the totals (e.g. at the start of each evaluation or logging window)."""
        for accumulator in self.tensors():
            accumulator.zero_()

    def tensors(self) -> list[torch.Tensor]:
        """The live accumulators [counts_LXE, tokens_LX, entropy_sum_LX], all float64 on one device.

        A data-parallel trainer sums them in place over its ranks to get the global totals. Summing
        the same totals twice counts the earlier steps twice: reduce a `copy()` at each log
        interval and keep each rank's own totals accumulating.
        """
        return [self.counts_LXE, self.tokens_LX, self.entropy_sum_LX]

    def copy(self) -> TaskExpertTelemetry:
        """An independent telemetry with the same totals (to reduce over ranks without touching these)."""
        other = TaskExpertTelemetry(self.num_layers, self.num_experts, self.num_tasks, self.task_names)
        other.counts_LXE, other.tokens_LX, other.entropy_sum_LX = (t.clone() for t in self.tensors())
        return other

    def state_dict(self) -> dict[str, Any]:
        """The totals on the CPU and the task names, for a checkpoint."""
        return {
            "task_names": list(self.task_names),
            "counts_LXE": self.counts_LXE.cpu().clone(),
            "tokens_LX": self.tokens_LX.cpu().clone(),
            "entropy_sum_LX": self.entropy_sum_LX.cpu().clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the totals of `state_dict()`; raises ValueError if they belong to another set-up."""
        if list(state.get("task_names", [])) != self.task_names:
            raise ValueError(f"{_WHO} checkpoint has task_names = {state.get('task_names')}: expected {self.task_names}")
        for name, own in zip(("counts_LXE", "tokens_LX", "entropy_sum_LX"), self.tensors()):
            if name not in state:
                raise ValueError(f"{_WHO} checkpoint lacks {name!r}: expected keys {list(self.state_dict())}")
            if tuple(state[name].shape) != tuple(own.shape):
                raise ValueError(
                    f"{_WHO} checkpoint has {name} of shape {tuple(state[name].shape)}: expected {tuple(own.shape)} "
                    f"(layers={self.num_layers}, tasks={self.num_tasks}, experts={self.num_experts})"
                )
        for name, own in zip(("counts_LXE", "tokens_LX", "entropy_sum_LX"), self.tensors()):
            own.copy_(state[name])

    # ------------------------------------------------------------------ statistics

    def utilisation(self, layer: int) -> torch.Tensor:
        """(num_tasks, E) float64: the fraction of each task's routed choices that went to each expert.

        Rows sum to 1; the row of a task with no routed choice is 0.
        """
        self._check_layer(layer)
        return _row_normalise(self.counts_LXE[layer])

    def mean_entropy(self) -> torch.Tensor:
        """(L, num_tasks) float64: the mean over each task's tokens of H(router scores), in nats; NaN without tokens."""
        return torch.where(self.tokens_LX > 0, self.entropy_sum_LX / self.tokens_LX.clamp_min(1), math.nan)

    def usage_entropy(self) -> torch.Tensor:
        """(L, num_tasks) float64: H(utilisation row) in nats, 0 when a task uses one expert, log E when
        it spreads evenly; NaN for a task with no routed choice."""
        usage_LXE = _row_normalise(self.counts_LXE)
        entropy_LX = torch.special.entr(usage_LXE).sum(-1)
        return torch.where(self.counts_LXE.sum(-1) > 0, entropy_LX, math.nan)

    def mutual_information(self) -> torch.Tensor:
        """(L,) float64: I(task; expert) in nats of the normalised joint of the counts; NaN while empty.

        0 when every task uses the experts alike; at most min(log X, log E).
        """
        total_L11 = self.counts_LXE.sum((1, 2), keepdim=True)
        p_LXE = self.counts_LXE / total_L11.clamp_min(1)
        p_LX1 = p_LXE.sum(2, keepdim=True)
        p_L1E = p_LXE.sum(1, keepdim=True)
        # Empty cells contribute 0 log 0 = 0; where P(t,e) > 0 both marginals are > 0 too.
        ratio_LXE = torch.where(p_LXE > 0, p_LXE / (p_LX1 * p_L1E).clamp_min(1e-300), 1.0)
        mi_L = (p_LXE * torch.log(ratio_LXE)).sum((1, 2))
        return torch.where(total_L11.flatten() > 0, mi_L, math.nan)

    def scalars(self, prefix: str = "routing") -> dict[str, float | None]:
        """Flat log entries: `<prefix>/layer<l>/token_entropy/<task>`, `.../usage_entropy/<task>` and
        `<prefix>/layer<l>/task_expert_mi` (no `<prefix>/` when prefix is ""). None where a task has no tokens yet (MetricsLogger writes
        a blank), so the set of names never changes. One device-to-host sync."""
        L, X = self.num_layers, self.num_tasks
        flat = torch.cat([self.mean_entropy().flatten(), self.usage_entropy().flatten(), self.mutual_information()])
        values = [None if math.isnan(v) else v for v in flat.tolist()]  # NOTE: device-to-host sync
        out: dict[str, float | None] = {}
        head = f"{prefix}/" if prefix else ""
        for layer in range(L):
            for t, task in enumerate(self.task_names):
                out[f"{head}layer{layer}/token_entropy/{task}"] = values[layer * X + t]
                out[f"{head}layer{layer}/usage_entropy/{task}"] = values[L * X + layer * X + t]
            out[f"{head}layer{layer}/task_expert_mi"] = values[2 * L * X + layer]
        return out

    # ------------------------------------------------------------------ output

    def log_tensorboard(
        self, writer: Any, step: int, prefix: str = "routing", images: bool = True, scalars: bool = True
    ) -> None:
        """Write `scalars(prefix)` with `writer.add_scalar` and, if `images`, each layer's heatmap
        with `writer.add_image` (`<prefix>/layer<l>/task_expert`). `writer` is a
        torch.utils.tensorboard SummaryWriter, such as the one MetricsLogger opens.

        add_scalar per name rather than add_scalars: add_scalars opens one event file per name.
        """
        for name, value in (self.scalars(prefix) if scalars else {}).items():
            if value is not None:
                writer.add_scalar(name, value, step)
        if images:
            for layer in range(self.num_layers):
                writer.add_image(f"{prefix}/layer{layer}/task_expert", self._render(layer), step, dataformats="HWC")

    def save_heatmaps(self, out_dir: str | Path, stem: str = "task_expert", caption: str = "") -> list[Path]:
        """One PNG per MoE layer, `<out_dir>/<stem>_layer<l>.png`: rows are tasks, columns experts,
        cells the utilisation; `caption` goes into the titles. Returns the paths, in layer order."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        mi_L = self.mutual_information().tolist()  # NOTE: device-to-host sync
        paths = []
        for layer in range(self.num_layers):
            path = out_dir / f"{stem}_layer{layer}.png"
            self._figure(layer, mi_L[layer], caption).savefig(path)
            paths.append(path)
        return paths

    def save_json(self, path: str | Path) -> Path:
        """Dump names, totals and the statistics of every layer to a JSON file (NaN written as null)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        token_entropy, usage_entropy = self.mean_entropy().tolist(), self.usage_entropy().tolist()
        mi = self.mutual_information().tolist()
        layers = [
            {
                "layer": layer,
                "counts": self.counts_LXE[layer].tolist(),
                "tokens": self.tokens_LX[layer].tolist(),
                "utilisation": self.utilisation(layer).tolist(),
                "token_entropy": token_entropy[layer],
                "usage_entropy": usage_entropy[layer],
                "task_expert_mi": mi[layer],
            }
            for layer in range(self.num_layers)
        ]
        doc = {"num_layers": self.num_layers, "num_experts": self.num_experts, "task_names": self.task_names, "layers": layers}
        path.write_text(json.dumps(_nan_to_none(doc), indent=1) + "\n")
        return path

    # ------------------------------------------------------------------ helpers

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer = {layer}: expected 0 <= layer < {self.num_layers}")

    def _move_to(self, device: torch.device) -> None:
        if self.counts_LXE.device != device:
            self.counts_LXE, self.tokens_LX, self.entropy_sum_LX = (t.to(device) for t in self.tensors())

    def _figure(self, layer: int, mi: float, caption: str = ""):
        # A bare Figure draws on the Agg canvas without pyplot: no global backend is chosen or changed.
        from matplotlib.figure import Figure

        usage_XE = self.utilisation(layer).cpu().numpy()
        X, E = usage_XE.shape
        fig = Figure(figsize=(min(max(4.0, 0.5 * E + 3.0), 16.0), min(max(2.5, 0.45 * X + 1.6), 12.0)), dpi=100)
        ax = fig.add_subplot()
        # The colour scale ends at the largest cell, not at 1: balanced routing (cells near 1/E)
        # would otherwise be one flat colour.
        vmax = float(usage_XE.max()) if usage_XE.max() > 0 else 1.0
        image = ax.imshow(usage_XE, vmin=0.0, vmax=vmax, cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_yticks(range(X), self.task_names)
        if E <= 32:
            ax.set_xticks(range(E))
        ax.set_xlabel("expert")
        ax.set_ylabel("task")
        mi_text = "n/a" if math.isnan(mi) else f"{mi:.3f} nats"
        ax.set_title(f"MoE layer {layer}: task x expert utilisation{caption} (MI = {mi_text})", fontsize=9)
        if X * E <= _MAX_ANNOTATED_CELLS:
            for t in range(X):
                for e in range(E):
                    value = usage_XE[t, e]
                    ax.text(e, t, f"{value:.2f}", ha="center", va="center", fontsize=7, color="black" if value > 0.6 * vmax else "white")
        fig.colorbar(image, ax=ax, label="fraction of the task's choices")
        fig.tight_layout()
        return fig

    def _render(self, layer: int):
        """(H, W, 3) uint8 numpy image of one layer's heatmap."""
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        fig = self._figure(layer, float(self.mutual_information()[layer]))  # NOTE: device-to-host sync
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _entropy(scores_TE: torch.Tensor) -> torch.Tensor:
    """(T,) H of each row of non-negative scores, normalised to sum 1 first (a no-op for softmax
    scores; sigmoid routers' scores then read as the distribution they imply)."""
    p_TE = scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(torch.finfo(scores_TE.dtype).tiny)
    return torch.special.entr(p_TE).sum(-1)


def _row_normalise(counts_XE: torch.Tensor) -> torch.Tensor:
    total_X1 = counts_XE.sum(-1, keepdim=True)
    return torch.where(total_X1 > 0, counts_XE / total_X1.clamp_min(1e-300), 0.0)


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    return value
