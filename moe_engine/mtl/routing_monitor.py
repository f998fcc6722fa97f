"""What a training run does for task-conditional routing besides the forward pass: the task x expert
telemetry (logged every few steps, drawn as heatmaps at the end) and AdaMV-MoE's per-task k.

The trainer owns one `RoutingMonitor`; it calls `observe` after every forward, `log` at log
intervals, `adapt` after each evaluation, `finish` at the end of a run, and saves `state_dict`
in checkpoints. Sums over data-parallel ranks go through moe_engine.parallel.runtime, so every
rank must call `log`, `finish` and `state_dict` together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from moe_engine.mtl.adaptive_k import AdaptiveTopK
from moe_engine.mtl.gates import TaskGateRouter
from moe_engine.mtl.telemetry import TaskExpertTelemetry
from moe_engine.parallel.runtime import DistributedRun, all_reduce_sum
from moe_engine.routing import Routing


class RoutingMonitor:
    """Telemetry and adaptive k for the MoE layers of one model.

    routers: the router of each routing decision of a forward, in the order of the routings the
    model returns (MultiTaskTransformer.routers). task_names: one per task id. telemetry: keep the
    task x expert statistics. adaptive_k: None, or (k_min, patience) to give each TaskGateRouter an
    AdaMV-MoE controller.
    """

    def __init__(
        self, routers: Sequence[torch.nn.Module], num_experts: int, task_names: Sequence[str], run: DistributedRun,
        *, telemetry: bool = True, adaptive_k: tuple[int, int] | None = None,
    ) -> None:
        self.run = run
        self.task_names = list(task_names)
        self.telemetry = (
            TaskExpertTelemetry(len(routers), num_experts, len(task_names), task_names)
            if telemetry and routers else None
        )
        self.controllers: list[AdaptiveTopK] = []
        if adaptive_k is not None:
            k_min, patience = adaptive_k
            for i, router in enumerate(routers):
                if not isinstance(router, TaskGateRouter):
                    raise ValueError(
                        f"adaptive k: router {i} is a {type(router).__name__}: it needs a TaskGateRouter "
                        "(moe.router.type task_gate or mod_squad)"
                    )
                self.controllers.append(AdaptiveTopK(router, k_min=k_min, patience=patience))

    def observe(self, routings: Sequence[Routing], task_ids_T: torch.Tensor) -> None:
        """Add one forward's routings; task_ids_T (T,) int64 is the task of each routed token."""
        if self.telemetry is None or not routings:
            return
        # The ids come from the data loader, already checked against the task list: skip the sync.
        self.telemetry.update(routings, task_ids_T, check_task_range=False)

    def _global(self) -> TaskExpertTelemetry:
        """A copy of the telemetry summed over all ranks (collective)."""
        snapshot = self.telemetry.copy()
        for tensor in snapshot.tensors():
            tensor.copy_(all_reduce_sum(tensor, self.run))
        return snapshot

    def log(self, logger: Any, step: int) -> None:
        """The run's statistics so far as the "routing" split of the metrics log (collective)."""
        if self.telemetry is None:
            return
        snapshot = self._global()
        if self.run.is_main:
            logger.log("routing", step, snapshot.scalars(prefix=""))

    def adapt(self, eval_metrics: Mapping[str, float], update: bool = True) -> dict[str, float]:
        """AdaMV-MoE: move each task's k from its validation loss (eval_metrics["loss_<task>"], equal on
        every rank). Returns {"top_k_<task>": k} of the first MoE layer after the move, for the eval log.
        update=False moves nothing (after the last step, nothing is left to train with a new k)."""
        if not self.controllers:
            return {}
        if update:
            losses = [eval_metrics[f"loss_{name}"] for name in self.task_names]
            for controller in self.controllers:
                controller.update(losses)
        return {f"top_k_{name}": float(k) for name, k in zip(self.task_names, self.controllers[0].task_k)}

    def finish(self, logger: Any, out_dir: Path, step: int, test_counts_LXE: torch.Tensor | None = None) -> list[Path]:
        """Heatmap PNGs and a JSON of the matrices in out_dir/routing, and the heatmaps in TensorBoard
        (collective; rank 0 writes). Returns the files written.

        The training statistics cover the whole run, the routers' early phase included;
        test_counts_LXE, the final evaluation's choices per (router, task, expert) summed over
        ranks, adds test_task_expert_layer<l>.png: where each task's tokens go at the end."""
        if self.telemetry is None:
            return []
        snapshot = self._global()
        if not self.run.is_main:
            return []
        directory = Path(out_dir) / "routing"
        paths = snapshot.save_heatmaps(directory, caption=" in training")
        paths.append(snapshot.save_json(directory / "task_expert.json"))
        if test_counts_LXE is not None:
            final = TaskExpertTelemetry.from_counts(test_counts_LXE, self.task_names)
            paths.extend(final.save_heatmaps(directory, stem="test_task_expert", caption=" on the test split"))
            paths.append(final.save_json(directory / "test_task_expert.json"))
        if getattr(logger, "writer", None) is not None:
            snapshot.log_tensorboard(logger.writer, step, scalars=False)
        return paths

    def state_dict(self) -> dict[str, Any]:
        """Telemetry summed over ranks and the controllers' state (collective)."""
        return {
            "telemetry": self._global().state_dict() if self.telemetry is not None else None,
            "adaptive_k": [c.state_dict() for c in self.controllers],
        }

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Restore `state_dict()`. The summed telemetry goes to rank 0 only (the others start from
        zero), so the next sum over ranks counts it once. None (an older checkpoint): start fresh."""
        if state is None:
            return
        if self.telemetry is not None and state.get("telemetry") is not None and self.run.is_main:
            self.telemetry.load_state_dict(state["telemetry"])
        saved = state.get("adaptive_k", [])
        if self.controllers and len(saved) != len(self.controllers):
            raise ValueError(f"the checkpoint has adaptive-k state for {len(saved)} MoE layers: this model has {len(self.controllers)}")
        for controller, controller_state in zip(self.controllers, saved):
            controller.load_state_dict(controller_state)
