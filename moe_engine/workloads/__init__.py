"""Workloads: what the trainer trains (data, model, per-task losses and metrics); see base.py."""

from moe_engine.config import Config
from moe_engine.workloads.base import StepForward, Workload, count_routed_choices


def build_workload(cfg: Config) -> Workload:
    """The workload model.architecture asks for (its data built or loaded)."""
    if cfg.model.architecture == "causal_lm":
        from moe_engine.workloads.causal_lm import CausalLMWorkload

        return CausalLMWorkload(cfg)
    if cfg.model.architecture == "generalist":
        from moe_engine.workloads.generalist import GeneralistWorkload

        return GeneralistWorkload(cfg)
    from moe_engine.workloads.classifier import ClassifierWorkload

    return ClassifierWorkload(cfg)


__all__ = ["StepForward", "Workload", "build_workload", "count_routed_choices"]
