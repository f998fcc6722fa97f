"""Saving and loading generalist data: a folder of per-task splits a user can point at.

Layout::

    path/
        tasks.json              list of GeneralistTask.to_dict(), in task order
        <task>/train.jsonl      or train.parquet or train.arrow: the task's train split
        <task>/test.jsonl       or test.parquet  or test.arrow:  the task's test split

Each split exists in exactly one of the three formats (formats may differ between splits
and tasks). Its columns are the task's (see :mod:`moe_engine.mtl.generalist.tasks`): ``image``
(8 rows of 12 pixels in ``[0, 1]``) or ``text``, plus ``label`` (index into the task's
``targets``) or ``value`` (regression). Other columns are ignored. ``.arrow`` is an Arrow IPC
stream or file, e.g. the ``data-*.arrow`` of ``Dataset.save_to_disk``.

Adding your own task: one JSON object per line, e.g. a sentiment task on text::

    $ mkdir -p data/sentiment
    $ cat data/sentiment/train.jsonl
    {"text": "a great little film", "label": 1}
    {"text": "dull and far too long", "label": 0}
    $ cat data/sentiment/test.jsonl
    {"text": "great fun", "label": 1}

and its entry in ``data/tasks.json`` (an image task writes ``"image": [[...12 floats], ...8
rows]`` per line instead; a regression task writes ``"value": 0.25`` and has
``"targets": []``, ``"metric": "mse"``, ``"higher_is_better": false``)::

    [{"name": "sentiment", "kind": "classification", "modality": "text",
      "targets": ["negative", "positive"], "metric": "accuracy", "higher_is_better": true,
      "chance": 0.5, "description": "sentiment of a short review"}]

then ``load_generalist_data("data")``. Splits are read with ``datasets.load_dataset`` from
local files only and cast to the canonical features.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets.table import table_cast

from moe_engine.mtl.generalist.tasks import (
    IMAGE_SHAPE,
    GeneralistData,
    GeneralistTask,
    task_features,
)

FILE_FORMATS: tuple[str, ...] = ("jsonl", "parquet", "arrow")
TASKS_FILE = "tasks.json"

_SPLITS = ("train", "test")
_BUILDERS = {"jsonl": "json", "parquet": "parquet", "arrow": "arrow"}
_LAYOUT = (
    "expected path/tasks.json and path/<task>/{train,test}.{jsonl|parquet|arrow} "
    "(see moe_engine.mtl.generalist.data's docstring)"
)


def save_generalist_data(
    data: GeneralistData,
    path: str | os.PathLike[str],
    file_format: Literal["parquet", "jsonl", "arrow"] = "parquet",
) -> None:
    """Write ``data`` to folder ``path`` (created if needed) in the layout above.

    Files of the same names are overwritten; a split already saved in *another* format is
    left alone and makes :func:`load_generalist_data` refuse it as ambiguous.
    """
    if file_format not in FILE_FORMATS:
        raise ValueError(f"file_format must be one of {list(FILE_FORMATS)}, got {file_format!r}")
    folder = Path(path)
    for task in data.tasks:
        (folder / task.name).mkdir(parents=True, exist_ok=True)
        for split_name in _SPLITS:
            split = getattr(data, split_name)[task.name]
            split = split.select_columns([task.input_column, task.label_column])
            target = folder / task.name / f"{split_name}.{file_format}"
            if file_format == "parquet":
                split.to_parquet(str(target))
            elif file_format == "arrow":
                _write_arrow(split, target)
            else:
                _write_jsonl(split, task, target)
    specs = [task.to_dict() for task in data.tasks]
    (folder / TASKS_FILE).write_text(json.dumps(specs, indent=2) + "\n")


def load_generalist_data(
    path: str | os.PathLike[str], tasks: Sequence[str] | None = None
) -> GeneralistData:
    """Read a folder laid out as above (e.g. written by :func:`save_generalist_data`).

    Args:
        path: the folder holding ``tasks.json``.
        tasks: names of the tasks to load, in the order wanted; ``None`` loads all of
            ``tasks.json`` in its order. Folders of tasks not asked for are not read.

    Returns:
        :class:`GeneralistData` with in-memory, torch-formatted splits in the canonical
        features (extra columns dropped).

    Raises:
        FileNotFoundError: no ``tasks.json`` or no file for a split; names the file(s)
            looked for.
        ValueError: bad ``tasks.json`` entry, unknown task name, a split in several formats,
            a missing column, an image of the wrong shape, or values out of range.
    """
    folder = Path(path)
    tasks_file = folder / TASKS_FILE
    if not tasks_file.is_file():
        raise FileNotFoundError(f"no {tasks_file}; {_LAYOUT}")
    try:
        entries = json.loads(tasks_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{tasks_file} is not valid JSON: {error}") from error
    if not isinstance(entries, list):
        raise ValueError(f"{tasks_file} must hold a JSON list of task objects, got {type(entries).__name__}")
    all_tasks = [GeneralistTask.from_dict(entry) for entry in entries]
    by_name = {task.name: task for task in all_tasks}
    if len(by_name) != len(all_tasks):
        raise ValueError(f"{tasks_file} repeats task names: {[t.name for t in all_tasks]}")
    if isinstance(tasks, str):
        raise TypeError(f"tasks must be a sequence of task names, not the string {tasks!r}")
    names = list(by_name) if tasks is None else list(tasks)
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise ValueError(f"task(s) {unknown} not in {tasks_file}; it lists {list(by_name)}")
    chosen = [by_name[name] for name in names]
    splits = {
        split: {task.name: _load_split(folder / task.name, split, task) for task in chosen}
        for split in _SPLITS
    }
    return GeneralistData(tasks=tuple(chosen), train=splits["train"], test=splits["test"])


def _load_split(folder: Path, split: str, task: GeneralistTask) -> datasets.Dataset:
    candidates = [folder / f"{split}.{suffix}" for suffix in FILE_FORMATS]
    present = [file for file in candidates if file.is_file()]
    if not present:
        raise FileNotFoundError(
            f"task {task.name!r} has no {split} split: none of {[str(f) for f in candidates]} exists"
        )
    if len(present) > 1:
        raise ValueError(
            f"task {task.name!r}: {split} split is ambiguous, several formats exist: "
            f"{[str(f) for f in present]}; keep exactly one"
        )
    file = present[0]
    # load_dataset always prepares an Arrow copy in a cache; a throwaway cache plus
    # keep_in_memory leaves neither ~/.cache nor the data folder touched.
    with tempfile.TemporaryDirectory(prefix="moe_engine_load_") as cache_dir:
        loaded = datasets.load_dataset(
            _BUILDERS[file.suffix[1:]],
            data_files={split: str(file)},
            split=split,
            cache_dir=cache_dir,
            keep_in_memory=True,
        )
    features = task_features(task)
    missing = [column for column in features if column not in loaded.column_names]
    if missing:
        raise ValueError(
            f"{file} lacks column(s) {missing} needed by {task.modality} {task.kind} task "
            f"{task.name!r}; it has {loaded.column_names}, expected {list(features)}"
        )
    loaded = loaded.select_columns(list(features))
    if task.modality == "image":
        _check_image_shape(loaded, file)
    try:
        # Cast at the Arrow level: Dataset.cast would draw a progress bar per split.
        table = table_cast(loaded.with_format("arrow")[:], features.arrow_schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, ValueError) as error:
        raise ValueError(
            f"{file}: cannot cast columns {dict(loaded.features)} to {dict(features)}: {error}"
        ) from error
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features)).with_format("torch")


def _check_image_shape(split: datasets.Dataset, file: Path) -> None:
    """Every ``image`` must be ``IMAGE_SHAPE``: casting does not check nested list lengths."""
    feature = split.features["image"]
    if isinstance(feature, datasets.Array2D):
        if tuple(feature.shape) != IMAGE_SHAPE:
            raise ValueError(f"{file}: images have shape {feature.shape}, expected {IMAGE_SHAPE}")
        return
    column = split.with_format("arrow")[:].column("image")
    if not (pa.types.is_list(column.type) and pa.types.is_list(column.type.value_type)):
        raise ValueError(
            f"{file}: column 'image' has type {column.type}, expected {IMAGE_SHAPE[0]} lists of "
            f"{IMAGE_SHAPE[1]} numbers per row"
        )
    if column.null_count:
        raise ValueError(f"{file}: column 'image' has {column.null_count} null row(s)")
    rows = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    cols = pc.list_value_length(pc.list_flatten(column)).to_numpy(zero_copy_only=False)
    bad_rows = np.flatnonzero(rows != IMAGE_SHAPE[0])
    if len(bad_rows) or (cols != IMAGE_SHAPE[1]).any():
        first = int(bad_rows[0]) if len(bad_rows) else int(np.flatnonzero(cols != IMAGE_SHAPE[1])[0])
        which = f"row {first}" if len(bad_rows) else f"pixel row {first} (counting all images' rows)"
        raise ValueError(
            f"{file}: every image must be {IMAGE_SHAPE[0]} lists of {IMAGE_SHAPE[1]} numbers; "
            f"{which} does not match"
        )


def _write_arrow(split: datasets.Dataset, target: Path) -> None:
    """The split as an Arrow IPC stream, schema metadata (the features) included."""
    table = split.with_format("arrow")[:]
    with pa.OSFile(str(target), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def _write_jsonl(split: datasets.Dataset, task: GeneralistTask, target: Path) -> None:
    """One JSON object per row, ``image`` as nested lists.

    Hand-written because ``Dataset.to_json`` (datasets 5.2) mangles ``Array2D`` columns.
    Python floats print float32 values exactly (shortest repr of the same double), so
    reloading is bit-exact.
    """
    columns = split.with_format("numpy")[:]
    inputs, labels = columns[task.input_column], columns[task.label_column]
    as_label = float if task.kind == "regression" else int
    with target.open("w") as out:
        for x, y in zip(inputs, labels):
            x = x.tolist() if task.modality == "image" else str(x)
            out.write(json.dumps({task.input_column: x, task.label_column: as_label(y)}) + "\n")
