"""Task descriptions and the container for the generalist's multi-task, multi-modal data.

Every task has its own train and test ``datasets.Dataset`` with two columns, chosen by the
task's input modality and kind:

=========  ========================================  ==============================================
column     feature                                   when
=========  ========================================  ==============================================
``image``  ``Array2D(IMAGE_SHAPE, "float32")``       ``modality == "image"``; values in ``[0, 1]``
``text``   ``Value("string")``                       ``modality == "text"``
``label``  ``Value("int64")``                        classification / retrieval: index into
                                                     ``task.targets``
``value``  ``Value("float32")``                      regression; finite
=========  ========================================  ==============================================

:func:`task_features` gives that schema for a task and :func:`task_split` builds a split in it.
Other columns may be present; nothing here reads them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any, Literal, get_args

import datasets
import numpy as np

from moe_engine.mtl.tasks import CANVAS_SHAPE

# Height x width of every image input; the digit canvases of moe_engine.mtl.digits.
IMAGE_SHAPE: tuple[int, int] = CANVAS_SHAPE

TaskKind = Literal["classification", "retrieval", "regression"]
Modality = Literal["image", "text"]
TASK_KINDS: tuple[str, ...] = get_args(TaskKind)
MODALITIES: tuple[str, ...] = get_args(Modality)

# kind -> (metric, higher_is_better): the one metric each kind is evaluated with.
KIND_METRICS = MappingProxyType(
    {
        "classification": ("accuracy", True),
        "retrieval": ("recall@1", True),
        "regression": ("mse", False),
    }
)


@dataclass(frozen=True)
class GeneralistTask:
    """One task of the generalist: its input modality, what it predicts, how it is scored.

    Attributes:
        name: unique identifier, e.g. ``"digit"``; also a folder name on disk, so no ``/``.
        kind: ``"classification"`` or ``"retrieval"``: column ``label`` indexes ``targets``
            (class names, resp. the candidate set, e.g. all captions); ``"regression"``:
            column ``value``, ``targets == ()``.
        modality: of the *input*: ``"image"`` -> column ``image`` (``IMAGE_SHAPE`` float32 in
            ``[0, 1]``), ``"text"`` -> column ``text`` (str).
        targets: texts the model scores inputs against; unique; at least 2 unless regression.
        metric: ``"accuracy"`` / ``"recall@1"`` / ``"mse"``, fixed by ``kind``.
        higher_is_better: ``True`` for accuracy and recall@1, ``False`` for mse.
        chance: the metric of the trivial predictor on the test split (majority class,
            ``1 / len(targets)``, variance of the test values).
        description: one line, for tables and reports.
    """

    name: str
    kind: TaskKind
    modality: Modality
    targets: tuple[str, ...]
    metric: str
    higher_is_better: bool
    chance: float
    description: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise ValueError(f"task name must be a non-empty string without '/', got {self.name!r}")
        where = f"task {self.name!r}"
        if self.kind not in TASK_KINDS:
            raise ValueError(f"{where}: kind {self.kind!r} is not one of {list(TASK_KINDS)}")
        if self.modality not in MODALITIES:
            raise ValueError(f"{where}: modality {self.modality!r} is not one of {list(MODALITIES)}")
        # A list from JSON becomes the tuple the type promises (frozen: set it the hard way).
        object.__setattr__(self, "targets", tuple(self.targets))
        if not all(isinstance(t, str) for t in self.targets):
            raise ValueError(f"{where}: targets must be strings, got {list(self.targets)!r}")
        if self.kind == "regression":
            if self.targets:
                raise ValueError(f"{where}: a regression task has no targets, got {list(self.targets)}")
        else:
            if len(self.targets) < 2:
                raise ValueError(f"{where}: a {self.kind} task needs >= 2 targets, got {list(self.targets)}")
            if len(set(self.targets)) != len(self.targets):
                repeated = sorted({t for t in self.targets if self.targets.count(t) > 1})
                raise ValueError(f"{where}: targets must be unique, repeated: {repeated}")
        metric, higher_is_better = KIND_METRICS[self.kind]
        if self.metric != metric:
            raise ValueError(f"{where}: metric {self.metric!r} does not fit kind {self.kind!r}; expected {metric!r}")
        if self.higher_is_better is not higher_is_better:
            raise ValueError(
                f"{where}: higher_is_better={self.higher_is_better!r} but {metric} needs {higher_is_better}"
            )
        if isinstance(self.chance, bool) or not isinstance(self.chance, (int, float)):
            raise ValueError(f"{where}: chance must be a number, got {self.chance!r}")
        object.__setattr__(self, "chance", float(self.chance))
        upper = math.inf if self.kind == "regression" else 1.0
        if not 0.0 <= self.chance <= upper:
            raise ValueError(f"{where}: chance must lie in [0, {upper}] for {metric}, got {self.chance}")
        if not isinstance(self.description, str):
            raise ValueError(f"{where}: description must be a string, got {self.description!r}")

    @property
    def input_column(self) -> str:
        """``"image"`` or ``"text"``: the column holding this task's inputs."""
        return self.modality

    @property
    def label_column(self) -> str:
        """``"value"`` for regression, else ``"label"``."""
        return "value" if self.kind == "regression" else "label"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of all fields (``targets`` as a list); inverse of :meth:`from_dict`."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["targets"] = list(self.targets)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GeneralistTask:
        """Build a task from :meth:`to_dict`'s output, e.g. one entry of ``tasks.json``.

        Raises:
            ValueError: ``d`` is not a mapping, lacks or adds keys, or holds a bad value.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"a task description must be a JSON object, got {d!r}")
        expected = [f.name for f in fields(cls)]
        missing = [k for k in expected if k not in d]
        unknown = [k for k in d if k not in expected]
        if missing or unknown:
            raise ValueError(
                f"task description {dict(d).get('name', '?')!r}: missing keys {missing}, "
                f"unknown keys {unknown}; expected exactly {expected}"
            )
        return cls(**{k: d[k] for k in expected})


def task_features(task: GeneralistTask) -> datasets.Features:
    """The canonical ``datasets`` schema of ``task``'s splits (see the module docstring).

    A function rather than a constant because ``datasets.Features`` is a mutable dict.
    """
    inputs = (
        datasets.Array2D(IMAGE_SHAPE, "float32") if task.modality == "image" else datasets.Value("string")
    )
    labels = datasets.Value("float32") if task.kind == "regression" else datasets.Value("int64")
    return datasets.Features({task.input_column: inputs, task.label_column: labels})


def task_split(task: GeneralistTask, inputs: np.ndarray | Sequence[str], labels: np.ndarray) -> datasets.Dataset:
    """One split of ``task`` in the canonical schema, in memory and torch-formatted.

    Args:
        task: the task the rows belong to.
        inputs: ``(N, *IMAGE_SHAPE)`` float array in ``[0, 1]`` (image tasks) or ``N``
            strings (text tasks).
        labels: ``(N,)`` integer indices into ``task.targets`` (classification, retrieval)
            or real values (regression).

    Returns:
        ``datasets.Dataset`` with the task's two columns, ``.with_format("torch")``.
    """
    if task.modality == "image":
        inputs = np.asarray(inputs, dtype=np.float32).reshape(-1, *IMAGE_SHAPE)
    else:
        inputs = list(inputs)
    dtype = np.float32 if task.kind == "regression" else np.int64
    labels = np.asarray(labels, dtype=dtype).reshape(-1)
    if len(inputs) != len(labels):
        raise ValueError(f"task {task.name!r}: {len(inputs)} inputs but {len(labels)} labels")
    columns = {task.input_column: inputs, task.label_column: labels}
    split = datasets.Dataset.from_dict(columns, features=task_features(task))
    check_split(task, split, f"{task.name!r}")
    return split.with_format("torch")


def check_split(task: GeneralistTask, split: datasets.Dataset, where: str) -> None:
    """Raise ``ValueError`` unless ``split`` holds ``task``'s columns, features and valid values.

    Checks: both columns present with the canonical features, no nulls, images in ``[0, 1]``,
    labels in ``0..len(targets)-1``, values finite. ``where`` prefixes the messages.
    """
    expected = task_features(task)
    for column, feature in expected.items():
        if column not in split.column_names:
            raise ValueError(
                f"{where}: no column {column!r} for {task.modality} {task.kind} task {task.name!r}; "
                f"columns are {split.column_names}, expected {list(expected)}"
            )
        if split.features[column] != feature:
            raise ValueError(
                f"{where}: column {column!r} has feature {split.features[column]}, expected {feature} "
                "(build splits with task_split or cast with task_features)"
            )
    # One contiguous slice of just these columns: cheap, unlike per-row decoding.
    table = split.select_columns(list(expected)).with_format("arrow")[:]
    for column in expected:
        nulls = table.column(column).null_count
        if nulls:
            raise ValueError(f"{where}: column {column!r} has {nulls} null value(s)")
    if len(split) == 0:
        return
    columns = split.select_columns(list(expected)).with_format("numpy")[:]
    if task.modality == "image":
        pixels = columns["image"]
        if not (np.isfinite(pixels).all() and pixels.min() >= 0.0 and pixels.max() <= 1.0):
            raise ValueError(
                f"{where}: image values must be finite and lie in [0, 1], got range "
                f"[{np.nanmin(pixels)}, {np.nanmax(pixels)}] (scale 0..255 pixels by 1/255)"
            )
    labels = columns[task.label_column]
    if task.kind == "regression":
        if not np.isfinite(labels).all():
            raise ValueError(f"{where}: column 'value' has non-finite entries")
    elif labels.min() < 0 or labels.max() >= len(task.targets):
        raise ValueError(
            f"{where}: labels must lie in 0..{len(task.targets) - 1} (indices into targets), "
            f"got range [{labels.min()}, {labels.max()}]"
        )


# eq=False: equality and hashing by identity. Field-wise equality would compare Dataset
# objects, which these large tables do not support as values.
@dataclass(frozen=True, eq=False)
class GeneralistData:
    """Train and test splits of several generalist tasks, one ``Dataset`` per task and split.

    Attributes:
        tasks: the tasks, in the order batches list them.
        train: task name -> train split with the task's columns (module docstring).
        test: task name -> test split, built from source data disjoint from train's.

    ``train`` and ``test`` must have exactly the task names as keys; they are stored as
    read-only mappings in ``tasks`` order.
    """

    tasks: tuple[GeneralistTask, ...]
    train: Mapping[str, datasets.Dataset]
    test: Mapping[str, datasets.Dataset]

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        names = self.task_names
        if not names:
            raise ValueError("GeneralistData needs at least one task")
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {list(names)}")
        for split_name in ("train", "test"):
            splits = getattr(self, split_name)
            if set(splits) != set(names):
                raise ValueError(
                    f"{split_name} splits are for tasks {sorted(splits)}, expected exactly {sorted(names)}"
                )
            for task in self.tasks:
                check_split(task, splits[task.name], f"{split_name}[{task.name!r}]")
            ordered = MappingProxyType({name: splits[name] for name in names})
            object.__setattr__(self, split_name, ordered)

    @property
    def task_names(self) -> tuple[str, ...]:
        """Task names in order."""
        return tuple(task.name for task in self.tasks)

    def task(self, name: str) -> GeneralistTask:
        """The task called ``name``; ``ValueError`` listing the allowed names if none is."""
        for task in self.tasks:
            if task.name == name:
                return task
        raise ValueError(f"unknown task {name!r}; allowed: {list(self.task_names)}")

    def subset(self, names: Sequence[str]) -> GeneralistData:
        """The tasks ``names`` (in that order) with their splits; same ``Dataset`` objects.

        Raises:
            ValueError: an unknown or repeated name, or no names.
        """
        if isinstance(names, str):
            raise TypeError(f"names must be a sequence of task names, not the string {names!r}")
        names = tuple(names)
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {list(names)}")
        tasks = tuple(self.task(name) for name in names)
        return GeneralistData(
            tasks=tasks,
            train={name: self.train[name] for name in names},
            test={name: self.test[name] for name in names},
        )
