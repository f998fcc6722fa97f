"""Uni-Perceiver-style generalist: task descriptions, embedded tasks, data folders, mixing."""

from moe_engine.mtl.generalist.data import load_generalist_data, save_generalist_data
from moe_engine.mtl.generalist.embedded import (
    DEFAULT_EMBEDDED_TASKS,
    EMBEDDED_TASKS,
    build_embedded_tasks,
)
from moe_engine.mtl.generalist.mixing import (
    MixedBatches,
    eval_batches,
    slice_for_rank,
    task_probabilities,
)
from moe_engine.mtl.generalist.losses import task_loss_sums, task_metric_sums
from moe_engine.mtl.generalist.model import GeneralistModel, GeneralistOutput, concat_routings
from moe_engine.mtl.generalist.tasks import (
    IMAGE_SHAPE,
    GeneralistData,
    GeneralistTask,
    task_features,
    task_split,
)

__all__ = [
    "DEFAULT_EMBEDDED_TASKS",
    "EMBEDDED_TASKS",
    "IMAGE_SHAPE",
    "GeneralistData",
    "GeneralistModel",
    "GeneralistOutput",
    "GeneralistTask",
    "MixedBatches",
    "build_embedded_tasks",
    "concat_routings",
    "eval_batches",
    "load_generalist_data",
    "save_generalist_data",
    "slice_for_rank",
    "task_features",
    "task_loss_sums",
    "task_metric_sums",
    "task_probabilities",
    "task_split",
]
