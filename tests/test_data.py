"""Tests of moe_engine.mtl: digit task construction, save/load, and batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset

from moe_engine.mtl.data import ResumableBatches, eval_batches, load_task_data, save_task_data, select_tasks
from moe_engine.mtl.digits import (
    DIGIT_TASKS,
    build_digits_tasks,
    overlay,
    place,
    split_source_indices,
)
from moe_engine.mtl.tasks import MultiTaskData, TaskSpec, example_features

PAIRS = 400  # train examples per task in these tests; test splits get the minimum of 200


@pytest.fixture(scope="module")
def data() -> MultiTaskData:
    return build_digits_tasks(pairs_per_task=PAIRS, seed=0)


@pytest.fixture(scope="module")
def sources() -> tuple[np.ndarray, np.ndarray]:
    # Imported here: a machine without scikit-learn (the GPU image) still collects this module's GPU tests.
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target


def columns(split: Dataset) -> dict[str, torch.Tensor]:
    return dict(split[:])


def assert_splits_equal(a: Dataset, b: Dataset) -> None:
    assert a.features == b.features
    ca, cb = columns(a), columns(b)
    assert ca.keys() == cb.keys()
    for name in ca:
        assert ca[name].dtype == cb[name].dtype
        assert torch.equal(ca[name], cb[name]), name


def toy(n: int) -> Dataset:
    """Dataset whose label is the row index, to track which rows a batch holds."""
    pixels = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None], (n, 8, 12))
    body = {"pixels": pixels, "task": np.zeros(n, np.int64), "label": np.arange(n)}
    return Dataset.from_dict(body, features=example_features()).with_format("torch")


# --------------------------------------------------------------------- build_digits_tasks


def test_shipped_digits_are_scikit_learns(sources) -> None:
    # The package reads its own copy of scikit-learn's digits file (no scikit-learn at run time, e.g.
    # on the GPU image); it must be the same images and classes, bit for bit.
    from moe_engine.mtl.digits import load_digit_images

    images, classes = load_digit_images()
    assert images.dtype == np.float32 and classes.dtype == np.int64 and images.shape == (1797, 8, 8)
    np.testing.assert_array_equal(images, sources[0])
    np.testing.assert_array_equal(classes, sources[1])


def test_schema_sizes_and_ranges(data: MultiTaskData) -> None:
    assert data.task_names == DIGIT_TASKS
    assert len(data.train) == 4 * PAIRS and len(data.test) == 4 * 200
    for split in (data.train, data.test):
        assert split.features == example_features()
        row = split[0]
        assert row["pixels"].shape == (8, 12) and row["pixels"].dtype == torch.float32
        c = columns(split)
        assert c["task"].dtype == c["label"].dtype == torch.int64
        assert 0.0 <= c["pixels"].min() and c["pixels"].max() <= 1.0
        assert torch.equal(torch.bincount(c["task"]), torch.full((4,), len(split) // 4))
    assert [t.num_classes for t in data.tasks] == [10, 2, 10, 10]
    assert data.task_index("left") == 2


def test_same_seed_is_bit_identical_and_seeds_differ() -> None:
    a = build_digits_tasks(pairs_per_task=300, seed=3)
    b = build_digits_tasks(pairs_per_task=300, seed=3)
    c = build_digits_tasks(pairs_per_task=300, seed=4)
    assert_splits_equal(a.train, b.train)
    assert_splits_equal(a.test, b.test)
    assert a.tasks == b.tasks
    assert not torch.equal(columns(a.train)["pixels"], columns(c.train)["pixels"])


def test_task_data_does_not_depend_on_other_tasks(data: MultiTaskData) -> None:
    alone = build_digits_tasks(("right",), pairs_per_task=PAIRS, seed=0)
    full = columns(data.train)
    rows = full["task"] == data.task_index("right")
    assert torch.equal(columns(alone.train)["pixels"], full["pixels"][rows])
    assert torch.equal(columns(alone.train)["task"], torch.zeros(PAIRS, dtype=torch.int64))


def test_source_split_is_disjoint_stratified_and_covering(sources) -> None:
    _, targets = sources
    train, test = split_source_indices(targets, 0.2, seed=0)
    assert not set(train.tolist()) & set(test.tolist())
    assert sorted([*train, *test]) == list(range(len(targets)))
    assert len(test) == pytest.approx(0.2 * len(targets), abs=10)
    assert set(targets[train]) == set(targets[test]) == set(range(10))
    other_train, _ = split_source_indices(targets, 0.2, seed=1)
    assert not np.array_equal(train, other_train)


@pytest.mark.parametrize("eval_fraction, n_test", [(0.001, 3), (0.999, 3 * 4)])  # rounds to 0 / to all of a class
def test_source_split_keeps_one_image_per_class_in_each_split(eval_fraction: float, n_test: int) -> None:
    """The clamp: a fraction that rounds to no (or every) image of a class still leaves one in
    test (or train), so every label stays drawable in both splits."""
    targets = np.repeat(np.arange(3), 5)  # 3 classes of 5 images
    train, test = split_source_indices(targets, eval_fraction, seed=0)
    assert len(test) == n_test and len(train) == len(targets) - n_test
    assert set(targets[train]) == set(targets[test]) == {0, 1, 2}


def test_single_digits_take_every_offset(data: MultiTaskData, sources) -> None:
    """"digit" and "parity" draw the offset uniformly from 0..4: each one occurs, the last included."""
    images, _ = sources
    offset_of = {place(images[i], o).tobytes(): o for i in range(len(images)) for o in range(5)}
    c = columns(data.train)
    single = (c["task"] == data.task_index("digit")) | (c["task"] == data.task_index("parity"))
    offsets = [offset_of[canvas.tobytes()] for canvas in c["pixels"][single].numpy()]
    assert sorted(set(offsets)) == [0, 1, 2, 3, 4]
    assert min(offsets.count(o) for o in range(5)) > len(offsets) / 10  # roughly uniform: 1/5 each


def test_place_and_overlay_helpers() -> None:
    left = np.arange(64, dtype=np.float32).reshape(8, 8) / 64
    right = np.full((8, 8), 0.5, dtype=np.float32)
    placed = place(left, 3)
    assert placed.shape == (8, 12)
    assert np.array_equal(placed[:, 3:11], left)
    assert not placed[:, :3].any() and not placed[:, 11:].any()
    pair = overlay(left, right)
    assert np.array_equal(pair[:, :4], left[:, :4])  # only the left digit
    assert np.array_equal(pair[:, 8:], right[:, 4:])  # only the right digit
    assert np.array_equal(pair[:, 4:8], np.maximum(left[:, 4:], right[:, :4]))
    assert overlay(np.stack([left, left]), np.stack([right, right])).shape == (2, 8, 12)
    with pytest.raises(ValueError, match="got 5"):
        place(left, 5)


def _check_split_reconstructs(split: Dataset, tasks, images, targets, pool, other_pool) -> None:
    """Every example is rebuilt from `pool` source images, with the right label, and none
    matches a placement of an `other_pool` image."""

    def placements(indices):
        return {place(images[i], o).tobytes(): i for i in indices for o in range(5)}

    singles, foreign = placements(pool), placements(other_pool)
    # 8x8 digits' columns 0..3 (resp. 4..7) are unique in load_digits, so the canvas' own
    # columns 0..3 (8..11) identify the left (right) source image of an overlay.
    by_left = {images[i][:, :4].tobytes(): i for i in pool}
    by_right = {images[i][:, 4:].tobytes(): i for i in pool}
    c = columns(split)
    for canvas, task, label in zip(c["pixels"].numpy(), c["task"].tolist(), c["label"].tolist()):
        name = tasks[task].name
        if name in ("digit", "parity"):
            source = singles[canvas.tobytes()]  # KeyError: not built from this split's pool
            assert canvas.tobytes() not in foreign
            assert label == (targets[source] % 2 if name == "parity" else targets[source])
        else:
            left = by_left[np.ascontiguousarray(canvas[:, :4]).tobytes()]
            right = by_right[np.ascontiguousarray(canvas[:, 8:]).tobytes()]
            assert np.array_equal(overlay(images[left], images[right]), canvas)
            assert label == targets[left if name == "left" else right]


def test_examples_come_from_own_split_with_correct_labels(data, sources) -> None:
    images, targets = sources
    train_pool, test_pool = split_source_indices(targets, 0.2, seed=0)
    _check_split_reconstructs(data.train, data.tasks, images, targets, train_pool, test_pool)
    _check_split_reconstructs(data.test, data.tasks, images, targets, test_pool, train_pool)


def test_chance_is_majority_class_share_of_train(data: MultiTaskData) -> None:
    c = columns(data.train)
    for i, spec in enumerate(data.tasks):
        labels = c["label"][c["task"] == i]
        counts = torch.bincount(labels, minlength=spec.num_classes)
        assert spec.chance == pytest.approx(counts.max().item() / len(labels))
        assert 1 / spec.num_classes <= spec.chance < 2 / spec.num_classes


def test_invalid_arguments_are_named() -> None:
    with pytest.raises(ValueError, match=r"'colour'.*'digit', 'parity', 'left', 'right'"):
        build_digits_tasks(("digit", "colour"))
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=f"got {bad}"):
            build_digits_tasks(eval_fraction=bad)
    with pytest.raises(ValueError, match="unique"):
        build_digits_tasks(("left", "left"))
    with pytest.raises(TypeError, match="'digit'"):
        build_digits_tasks("digit")


def test_task_specs_and_multi_task_data_are_validated(data: MultiTaskData) -> None:
    with pytest.raises(ValueError, match="num_classes must be >= 2, got 1"):
        TaskSpec("one", 1, 1.0, "a single class is no task")
    with pytest.raises(ValueError, match="chance must lie in"):
        TaskSpec("two", 2, 1.5, "chance above 1")
    TaskSpec("two", 2, 1.0, "the bounds are allowed")
    with pytest.raises(ValueError, match=r"task names must be unique, got \['digit', 'digit'\]"):
        MultiTaskData(data.train, data.test, (data.tasks[0], data.tasks[0]))


def test_task_index_rejects_unknown_name(data: MultiTaskData) -> None:
    with pytest.raises(ValueError, match=r"'middle'.*\['digit', 'parity', 'left', 'right'\]"):
        data.task_index("middle")


# ------------------------------------------------------------------------------ save / load


@pytest.mark.parametrize("file_format", ["parquet", "jsonl"])
def test_save_load_round_trip_is_bit_exact(data, tmp_path, file_format) -> None:
    save_task_data(data, tmp_path, file_format=file_format)
    assert (tmp_path / f"train.{file_format}").is_file() and (tmp_path / "tasks.json").is_file()
    loaded = load_task_data(tmp_path)
    assert loaded.tasks == data.tasks
    for mine, theirs in ((data.train, loaded.train), (data.test, loaded.test)):
        assert theirs.format["type"] == "torch"
        assert theirs[0]["pixels"].shape == (8, 12)
        assert_splits_equal(mine, theirs)


def test_load_reports_missing_and_ambiguous_files(data, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="tasks.json"):
        load_task_data(tmp_path)
    save_task_data(data, tmp_path)
    (tmp_path / "test.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}.*test\.parquet\|test\.jsonl"):
        load_task_data(tmp_path)
    save_task_data(data, tmp_path, file_format="jsonl")
    with pytest.raises(ValueError, match="ambiguous"):
        load_task_data(tmp_path)


def test_load_names_the_first_row_whose_task_or_label_does_not_fit(data, tmp_path) -> None:
    import json

    save_task_data(data, tmp_path)
    specs = json.loads((tmp_path / "tasks.json").read_text())
    (tmp_path / "tasks.json").write_text(json.dumps(specs[:2]))  # rows of tasks 2 and 3 have no task now
    row = int(np.flatnonzero(np.asarray(data.train["task"]) >= 2)[0])
    with pytest.raises(ValueError, match=rf"train: row {row} has task index \d; allowed: 0..1 \(digit, parity\)"):
        load_task_data(tmp_path)
    specs[0]["num_classes"] = 3  # digit labels 3..9 no longer fit
    (tmp_path / "tasks.json").write_text(json.dumps(specs))
    with pytest.raises(ValueError, match=r"train: row \d+ has label \d for task 'digit'; allowed: 0..2"):
        load_task_data(tmp_path)


def test_load_refuses_a_label_equal_to_num_classes(data, tmp_path) -> None:
    """Labels lie in [0, num_classes): a label equal to num_classes is the off-by-one to catch."""
    import json

    save_task_data(data, tmp_path)
    specs = json.loads((tmp_path / "tasks.json").read_text())
    specs[0]["num_classes"] = 9  # digit label 9 is now one past the last class
    (tmp_path / "tasks.json").write_text(json.dumps(specs))
    c = columns(data.train)
    row = int(np.flatnonzero(((c["task"] == 0) & (c["label"] == 9)).numpy())[0])
    with pytest.raises(ValueError, match=rf"train: row {row} has label 9 for task 'digit'; allowed: 0..8"):
        load_task_data(tmp_path)


def test_select_tasks_keeps_their_rows_renumbered_in_the_asked_order(data, tmp_path) -> None:
    save_task_data(data, tmp_path)
    chosen = select_tasks(load_task_data(tmp_path), ["right", "digit"], str(tmp_path))
    alone = build_digits_tasks(["right", "digit"], pairs_per_task=PAIRS, seed=0)  # a task's data is its own
    assert chosen.task_names == ("right", "digit") and chosen.tasks == alone.tasks
    for mine, theirs in ((chosen.train, alone.train), (chosen.test, alone.test)):
        assert mine.features == theirs.features and mine.format["type"] == "torch"
        got, want = columns(mine), columns(theirs)
        for t in range(2):
            rows_got, rows_want = got["task"] == t, want["task"] == t
            assert rows_got.sum() == rows_want.sum() > 0
            for name in ("pixels", "label"):
                assert torch.equal(got[name][rows_got], want[name][rows_want]), name
        assert set(got["task"].tolist()) == {0, 1}
    same = select_tasks(data, list(data.task_names), "memory")
    assert same.train is data.train and same.tasks == data.tasks  # all tasks in order: nothing copied
    with pytest.raises(ValueError, match=r"\['nine'\] not in memory \(has \['digit', 'parity', 'left', 'right'\]\)"):
        select_tasks(data, ["digit", "nine"], "memory")
    no_parity_test = MultiTaskData(data.train, data.test.filter(lambda row: row["task"] != 1), data.tasks)
    with pytest.raises(ValueError, match=r"memory: task\(s\) \['parity'\] have no rows in the test split"):
        select_tasks(no_parity_test, ["digit", "parity"], "memory")


# ---------------------------------------------------------------------------------- batching


def take(batches: ResumableBatches, n: int) -> list[dict[str, torch.Tensor]]:
    return [next(batches) for _ in range(n)]


def test_batches_cover_each_example_once_per_epoch() -> None:
    batches = ResumableBatches(toy(100), batch_size=10, seed=0)
    epochs = []
    for epoch in range(3):
        assert batches.epoch == epoch
        epochs.append(torch.cat([b["label"] for b in take(batches, 10)]))
        assert torch.equal(epochs[-1].sort().values, torch.arange(100))
    assert not torch.equal(epochs[0], epochs[1])


def test_partial_batch_is_dropped_and_order_is_documented_permutation() -> None:
    torch.manual_seed(123)  # global RNG must not matter
    batches = ResumableBatches(toy(103), batch_size=10, seed=7)
    seen = torch.cat([b["label"] for b in take(batches, 10)])
    expected = torch.randperm(103, generator=torch.Generator().manual_seed(7 * 1_000_003))
    assert torch.equal(seen, expected[:100])
    assert batches.state_dict() == {"epoch": 1, "position": 0, "seed": 7, "batch_size": 10}


def test_real_batches_have_documented_shapes(data: MultiTaskData) -> None:
    batch = next(ResumableBatches(data.train, batch_size=32, seed=0))
    assert batch["pixels"].shape == (32, 8, 12) and batch["pixels"].dtype == torch.float32
    assert batch["task"].shape == batch["label"].shape == (32,)
    assert batch["task"].dtype == batch["label"].dtype == torch.int64


@pytest.mark.parametrize("consumed", [0, 4, 10, 13])  # start, mid-epoch, epoch end, later
def test_resuming_from_state_continues_identically(consumed: int) -> None:
    reference = ResumableBatches(toy(103), batch_size=10, seed=1)
    take(reference, consumed)
    state = reference.state_dict()
    expected = take(reference, 15)  # crosses at least one epoch boundary

    resumed = ResumableBatches(toy(103), batch_size=10, seed=1)
    take(resumed, 2)  # its own position must be overwritten
    resumed.load_state_dict(state)
    for want, got in zip(expected, take(resumed, 15)):
        assert all(torch.equal(want[k], got[k]) for k in want)


def test_seeds_differ_and_mismatched_state_is_refused() -> None:
    a, b = ResumableBatches(toy(50), 10, seed=0), ResumableBatches(toy(50), 10, seed=1)
    assert not torch.equal(next(a)["label"], next(b)["label"])
    with pytest.raises(ValueError, match="seed=0.*seed=1"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="batch_size=10.*batch_size=5"):
        ResumableBatches(toy(50), 5, seed=0).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="51.*50"):
        ResumableBatches(toy(50), 51, seed=0)


@pytest.mark.parametrize(
    "epoch, position",
    [(0, 5), (0, 15), (-1, 0), (0, 50), (0, 41)],  # mid-batch, mid-batch, negative epoch, past the last full batch
)
def test_invalid_resume_positions_are_refused(epoch: int, position: int) -> None:
    """Resumable states sit on batch boundaries at most len - batch_size into an epoch; any
    other position would shift every later batch, so it is refused."""
    batches = ResumableBatches(toy(50), 10, seed=0)
    with pytest.raises(ValueError, match=rf"invalid state epoch={epoch}, position={position} for 50 examples"):
        batches.load_state_dict({"epoch": epoch, "position": position, "seed": 0, "batch_size": 10})
    batches.load_state_dict({"epoch": 2, "position": 40, "seed": 0, "batch_size": 10})  # the last full batch
    assert batches.state_dict()["position"] == 40 and len(next(batches)["label"]) == 10 and batches.epoch == 3


def test_eval_batches_cover_split_once_in_order() -> None:
    got = list(eval_batches(toy(23), batch_size=10))
    assert [len(b["label"]) for b in got] == [10, 10, 3]
    assert torch.equal(torch.cat([b["label"] for b in got]), torch.arange(23))
    assert got[0]["pixels"].shape == (10, 8, 12)
    with pytest.raises(ValueError, match="got 0"):
        eval_batches(toy(5), 0)


def test_select_tasks_in_another_order_renumbers_the_rows(data: MultiTaskData) -> None:
    # The same tasks reversed: each row must carry its task's new id, or it trains as another task.
    names = list(reversed(data.task_names))
    chosen = select_tasks(data, names, "memory")
    old, new = dict(data.train[:]), dict(chosen.train[:])
    n = len(names)
    for t_new in range(n):
        assert torch.equal(torch.as_tensor(new["label"])[torch.as_tensor(new["task"]) == t_new],
                           torch.as_tensor(old["label"])[torch.as_tensor(old["task"]) == n - 1 - t_new])
