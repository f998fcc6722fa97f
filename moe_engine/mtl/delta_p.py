"""Delta_p, the average relative gain of a multi-task model over single-task baselines (Maninis et al. 2019).

    Delta_p = 100 / T * sum_t 1 / M_t * sum_m (-1)^{w_tm} (B_tm - N_tm) / B_tm

B_tm: metric m of task t for the single-task baseline, N_tm: the same for the multi-task model,
w_tm = 1 when higher is better (so a gain counts positive either way), M_t the number of metrics
of task t, T the number of tasks. Returned in percent, as papers report it (LibMTL too).
"""

from __future__ import annotations

import math
from collections.abc import Mapping


def delta_p(
    baseline: Mapping[str, Mapping[str, float]],
    multi: Mapping[str, Mapping[str, float]],
    higher_is_better: Mapping[str, bool | Mapping[str, bool]],
) -> float:
    """Delta_p in percent (+1.5 means the multi-task model is 1.5 % better on average).

    Args:
        baseline: task name -> metric name -> the single-task model's value (non-zero, finite).
        multi: the multi-task model's values, with exactly the same tasks and metrics.
        higher_is_better: task name -> a bool for all the task's metrics, or metric name -> bool.

    Every task counts equally, whatever its number of metrics; each metric equally within a task.
    """
    if not baseline:
        raise ValueError("baseline is empty: expected at least one task with at least one metric")
    if set(multi) != set(baseline):
        raise ValueError(
            f"multi has tasks {sorted(multi)}, baseline {sorted(baseline)}: expected the same tasks"
        )
    total = 0.0
    for task, base_metrics in baseline.items():
        if not base_metrics:
            raise ValueError(f"baseline[{task!r}] has no metrics: expected at least one")
        if set(multi[task]) != set(base_metrics):
            raise ValueError(
                f"multi[{task!r}] has metrics {sorted(multi[task])}, baseline {sorted(base_metrics)}: expected the same"
            )
        if task not in higher_is_better:
            raise ValueError(f"higher_is_better has no entry for task {task!r}: it has {sorted(higher_is_better)}")
        direction = higher_is_better[task]
        task_sum = 0.0
        for metric, base in base_metrics.items():
            if isinstance(direction, Mapping):
                if metric not in direction:
                    raise ValueError(f"higher_is_better[{task!r}] has no entry for metric {metric!r}")
                higher = direction[metric]
            else:
                higher = direction
            if not isinstance(higher, bool):
                raise ValueError(f"higher_is_better for {task!r}/{metric!r} = {higher!r}: expected a bool")
            value = multi[task][metric]
            if not (math.isfinite(base) and math.isfinite(value)):
                raise ValueError(f"{task!r}/{metric!r}: baseline {base!r}, multi {value!r}: expected finite values")
            if base == 0:
                raise ValueError(f"baseline {task!r}/{metric!r} = 0: Delta_p divides by the baseline")
            sign = -1.0 if higher else 1.0
            task_sum += sign * (base - value) / base
        total += task_sum / len(base_metrics)
    return 100.0 * total / len(baseline)
