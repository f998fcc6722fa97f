"""Task descriptions and the container for multi-task classification data.

Every multi-task split in this package has the same three columns, one row per example:

=========  =====================================  =============================================
column     feature                                meaning
=========  =====================================  =============================================
``pixels`` ``Array2D(CANVAS_SHAPE, "float32")``   the input image, values in ``[0, 1]``
``task``   ``Value("int64")``                     index of the example's task in ``tasks``
``label``  ``Value("int64")``                     class in ``[0, tasks[task].num_classes)``
=========  =====================================  =============================================

With ``.with_format("torch")`` a single row gives ``pixels`` as an ``(8, 12)`` float32 tensor
and 0-d int64 tensors for ``task`` and ``label``; a batch of ``B`` rows gives ``(B, 8, 12)``
and ``(B,)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import datasets

# Height x width of every input image: an 8x8 digit fits at 5 horizontal offsets, and two
# digits overlap on 4 columns when placed at columns 0..7 and 4..11.
CANVAS_SHAPE: tuple[int, int] = (8, 12)

COLUMNS: tuple[str, ...] = ("pixels", "task", "label")


def example_features() -> datasets.Features:
    """The ``datasets`` schema of a multi-task split (see the module docstring).

    A function rather than a constant because ``datasets.Features`` is a mutable dict.
    """
    return datasets.Features(
        {
            "pixels": datasets.Array2D(CANVAS_SHAPE, "float32"),
            "task": datasets.Value("int64"),
            "label": datasets.Value("int64"),
        }
    )


@dataclass(frozen=True)
class TaskSpec:
    """One classification task of a multi-task data set.

    Attributes:
        name: short identifier, e.g. ``"digit"``; unique within a :class:`MultiTaskData`.
        num_classes: labels of this task lie in ``[0, num_classes)``.
        chance: accuracy of always predicting the most frequent class of the *train* split,
            the floor any trained model has to beat.
        description: one line, for tables and reports.
    """

    name: str
    num_classes: int
    chance: float
    description: str

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("TaskSpec.name must be a non-empty string")
        if self.num_classes < 2:
            raise ValueError(
                f"task {self.name!r}: num_classes must be >= 2, got {self.num_classes}"
            )
        if not 0.0 <= self.chance <= 1.0:
            raise ValueError(f"task {self.name!r}: chance must lie in [0, 1], got {self.chance}")


# eq=False: equality and hashing by identity. The generated field-wise __eq__ would compare
# Dataset objects (by identity anyway) and the generated __hash__ would hash them, which
# suggests a value semantics these large, lazily loaded tables do not have.
@dataclass(frozen=True, eq=False)
class MultiTaskData:
    """Train and test splits of several classification tasks mixed into one table each.

    Attributes:
        train: rows with the columns described in the module docstring.
        test: same columns; built from source data disjoint from ``train``'s.
        tasks: ``tasks[i]`` describes the rows whose ``task`` column equals ``i``.
    """

    train: datasets.Dataset
    test: datasets.Dataset
    tasks: tuple[TaskSpec, ...]

    def __post_init__(self) -> None:
        names = self.task_names
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {list(names)}")
        for split_name, split in (("train", self.train), ("test", self.test)):
            missing = [c for c in COLUMNS if c not in split.column_names]
            if missing:
                raise ValueError(
                    f"{split_name} split lacks column(s) {missing}; it has {split.column_names}"
                )

    @property
    def task_names(self) -> tuple[str, ...]:
        """Task names in index order."""
        return tuple(task.name for task in self.tasks)

    def task_index(self, name: str) -> int:
        """Index of the task called ``name``, i.e. its value in the ``task`` column.

        Raises:
            ValueError: no task has that name; the message lists the allowed names.
        """
        names = self.task_names
        if name not in names:
            raise ValueError(f"unknown task {name!r}; allowed: {list(names)}")
        return names.index(name)
