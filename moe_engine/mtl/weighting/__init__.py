"""Multi-task loss weighting, selectable by name: `build_weighting(name, num_tasks, **options)`.

    name           class                  options (defaults)
    equal          EqualWeighting         -
    uncertainty    UncertaintyWeighting   -
    dwa            DynamicWeightAverage   temperature=2.0, window=20
    gradnorm       GradNorm               alpha=1.5
    pcgrad         PCGrad                 reduction='mean', seed=0
    mgda           MGDA                   normalization='none', solver='frank_wolfe', max_iter=250, tol=1e-5
    cagrad         CAGrad                 c=0.5, rescale=1
    imtl           IMTL                   mode='hybrid'
    nash_mtl       NashMTL                max_norm=1.0, update_every=1
Every method also takes world_size=1, which the trainer sets (base.py). The trainer's step:
optimizer.zero_grad(); losses; gram (if `wants_gram`); loss, weights = w.combine(...);
loss.backward(); all-reduce (the weighting's parameters too); optimizer.step();
w.after_optimizer_step(); w.observe(global_losses_T, present_T).
"""

from __future__ import annotations

from typing import Any

from moe_engine.mtl.weighting.base import TaskWeighting, gram_matrix, task_gradients
from moe_engine.mtl.weighting.gradient_based import CAGrad, IMTL, MGDA, NashMTL, PCGrad
from moe_engine.mtl.weighting.loss_based import DynamicWeightAverage, EqualWeighting, GradNorm, UncertaintyWeighting

METHODS = ("equal", "uncertainty", "dwa", "gradnorm", "pcgrad", "mgda", "cagrad", "imtl", "nash_mtl")

_CLASSES: dict[str, type[TaskWeighting]] = {
    cls.method: cls
    for cls in (
        EqualWeighting, UncertaintyWeighting, DynamicWeightAverage, GradNorm, PCGrad, MGDA, CAGrad, IMTL, NashMTL,
    )
}


def weighting_class(name: str) -> type[TaskWeighting]:
    """The class of method `name`; ValueError listing METHODS for an unknown name."""
    if name not in _CLASSES:
        raise ValueError(f"weighting method {name!r}: expected one of {', '.join(METHODS)}")
    return _CLASSES[name]


def method_options(name: str) -> dict[str, Any]:
    """The options of method `name` and their defaults (world_size included)."""
    return weighting_class(name).options()


def build_weighting(name: str, num_tasks: int, **options: Any) -> TaskWeighting:
    """The TaskWeighting of method `name` for num_tasks tasks; ValueError for an unknown name or option."""
    cls = weighting_class(name)
    allowed = cls.options()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"weighting {name!r} has no option {', '.join(map(repr, unknown))}: "
            f"its options are {', '.join(allowed) or 'none'}"
        )
    return cls(num_tasks, **options)


__all__ = [
    "CAGrad",
    "DynamicWeightAverage",
    "EqualWeighting",
    "GradNorm",
    "IMTL",
    "METHODS",
    "MGDA",
    "NashMTL",
    "PCGrad",
    "TaskWeighting",
    "UncertaintyWeighting",
    "build_weighting",
    "gram_matrix",
    "method_options",
    "task_gradients",
    "weighting_class",
]
