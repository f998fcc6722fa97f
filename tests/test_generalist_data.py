"""Generalist data: task records, embedded tasks, data folders, task mixing and batching."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import datasets
import numpy as np
import pytest
import torch

from moe_engine.mtl.digits import split_source_indices
from moe_engine.mtl.generalist import (
    DEFAULT_EMBEDDED_TASKS,
    EMBEDDED_TASKS,
    IMAGE_SHAPE,
    GeneralistData,
    GeneralistTask,
    MixedBatches,
    build_embedded_tasks,
    eval_batches,
    load_generalist_data,
    save_generalist_data,
    slice_for_rank,
    task_features,
    task_probabilities,
    task_split,
)
from moe_engine.mtl.generalist.embedded import DIGIT_NAMES, text_digit_phrases, text_parity_phrases
from moe_engine.mtl.generalist.tasks import KIND_METRICS

SEED = 3
EXAMPLES = 60  # train examples per task; test splits get the minimum of 200


@pytest.fixture(scope="module")
def data() -> GeneralistData:
    return build_embedded_tasks(EMBEDDED_TASKS, examples_per_task=EXAMPLES, seed=SEED)


@pytest.fixture(scope="module")
def small(data) -> GeneralistData:
    """Three tasks (image classification, image regression, text), a few rows each."""
    names = ("digit", "sum", "text_parity")
    return GeneralistData(
        tasks=tuple(data.task(n) for n in names),
        train={n: data.train[n].select(range(7)) for n in names},
        test={n: data.test[n].select(range(5)) for n in names},
    )


def make_task(name="t", kind="classification", modality="text", targets=("a", "b"), **over):
    metric, better = KIND_METRICS.get(kind, ("accuracy", True))
    fields = dict(name=name, kind=kind, modality=modality, targets=targets, metric=metric,
                  higher_is_better=better, chance=0.5, description="test task")  # fmt: skip
    fields.update(over)
    return GeneralistTask(**fields)


def numbered_text_split(task: GeneralistTask, n: int) -> datasets.Dataset:
    """A text split whose row i reads ``"row i"``: lets tests see which rows a batch holds."""
    return task_split(task, [f"row {i}" for i in range(n)], np.arange(n) % len(task.targets))


def row_ids(sub_batch) -> list[int]:
    return [int(text.split()[1]) for text in sub_batch["text"]]


# ----------------------------------------------------------------------------- task records


def test_task_round_trips_through_json():
    task = make_task(kind="retrieval", modality="image", targets=("x y", "y x", "z"))
    back = GeneralistTask.from_dict(json.loads(json.dumps(task.to_dict())))
    assert back == task and isinstance(back.targets, tuple)
    assert task.input_column == "image" and task.label_column == "label"
    regression = make_task(kind="regression", targets=(), chance=0.04)
    assert regression.label_column == "value" and regression.input_column == "text"


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(kind="ranking"), "kind 'ranking'"),
        (dict(modality="audio"), "modality 'audio'"),
        (dict(metric="f1"), "metric 'f1'"),
        (dict(higher_is_better=False), "higher_is_better"),
        (dict(targets=("a",)), ">= 2 targets"),
        (dict(targets=("a", "b", "a")), "repeated"),
        (dict(chance=1.5), "chance"),
        (dict(name=""), "name"),
        (dict(name="a/b"), "name"),
    ],
)
def test_task_rejects_bad_fields(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_task(**change)


def test_regression_task_has_no_targets():
    with pytest.raises(ValueError, match="no targets"):
        make_task(kind="regression", targets=("a", "b"))


def test_from_dict_names_missing_and_unknown_keys():
    d = make_task().to_dict()
    del d["metric"]
    d["colour"] = "red"
    with pytest.raises(ValueError, match=r"missing keys \['metric'\], unknown keys \['colour'\]"):
        GeneralistTask.from_dict(d)


# ------------------------------------------------------------------------------ containers


def test_data_lookup_subset_and_errors(data):
    assert data.task("sum").kind == "regression"
    with pytest.raises(ValueError, match=r"unknown task 'nope'; allowed: \['digit'"):
        data.task("nope")
    sub = data.subset(["sum", "digit"])
    assert sub.task_names == ("sum", "digit") and list(sub.train) == ["sum", "digit"]
    assert sub.test["sum"] is data.test["sum"]
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        data.subset(["digit", "nope"])
    with pytest.raises(ValueError, match="unique"):
        data.subset(["digit", "digit"])


def test_data_validates_splits(small):
    task = small.task("digit")
    good = dict(tasks=(task,), train={"digit": small.train["digit"]}, test={"digit": small.test["digit"]})
    with pytest.raises(ValueError, match=r"test splits are for tasks \[\], expected exactly \['digit'\]"):
        GeneralistData(**{**good, "test": {}})
    as_lists = datasets.Dataset.from_dict({"image": np.zeros((2, *IMAGE_SHAPE)), "label": [0, 1]})
    with pytest.raises(ValueError, match="column 'image' has feature"):
        GeneralistData(**{**good, "train": {"digit": as_lists}})
    no_label = small.train["digit"].remove_columns("label")
    with pytest.raises(ValueError, match="no column 'label'"):
        GeneralistData(**{**good, "train": {"digit": no_label}})
    with pytest.raises(ValueError, match=r"labels must lie in 0..9"):
        task_split(task, np.zeros((1, *IMAGE_SHAPE)), [10])
    with pytest.raises(ValueError, match=r"lie in \[0, 1\].*255"):
        task_split(task, np.full((1, *IMAGE_SHAPE), 255.0), [1])
    with pytest.raises(ValueError, match="non-finite"):
        task_split(small.task("sum"), np.zeros((1, *IMAGE_SHAPE)), [math.nan])
    # An empty test split is allowed (and eval walks it as zero batches).
    empty = task_split(task, np.zeros((0, *IMAGE_SHAPE)), [])
    GeneralistData(**{**good, "test": {"digit": empty}})
    assert list(eval_batches(empty, 4)) == []


# --------------------------------------------------------------------------- embedded tasks


def test_embedded_tasks_shapes_columns_and_defaults(data):
    assert DEFAULT_EMBEDDED_TASKS == ("digit", "caption", "sum", "text_digit") and "compare" not in DEFAULT_EMBEDDED_TASKS
    assert data.task_names == EMBEDDED_TASKS
    kinds = {t.name: (t.kind, t.modality) for t in data.tasks}
    assert kinds == {
        "digit": ("classification", "image"),
        "caption": ("retrieval", "image"),
        "sum": ("regression", "image"),
        "text_parity": ("classification", "text"),
        "compare": ("classification", "image"),
        "text_digit": ("classification", "text"),
    }
    assert data.task("text_digit").targets == data.task("digit").targets  # one label space, two modalities
    assert data.task("caption").targets[37] == "three and seven" and len(data.task("caption").targets) == 100
    assert data.task("compare").targets == ("left", "right", "same")
    for task in data.tasks:
        for split, n in ((data.train, EXAMPLES), (data.test, 200)):
            assert len(split[task.name]) == n
            assert split[task.name].features == task_features(task)
    row = data.train["digit"][0]
    assert row["image"].shape == IMAGE_SHAPE and row["image"].dtype == torch.float32
    assert data.train["sum"][:3]["value"].dtype == torch.float32
    default = build_embedded_tasks(examples_per_task=5, seed=SEED)
    assert default.task_names == DEFAULT_EMBEDDED_TASKS


def test_embedded_tasks_are_deterministic_and_independent(data):
    again = build_embedded_tasks(["sum", "compare"], examples_per_task=EXAMPLES, seed=SEED)
    other = build_embedded_tasks(["sum"], examples_per_task=EXAMPLES, seed=SEED + 1)
    for name in ("sum", "compare"):
        for split in ("train", "test"):
            a, b = getattr(data, split)[name][:], getattr(again, split)[name][:]
            assert all(torch.equal(a[c], b[c]) for c in a)
        assert data.task(name) == again.task(name)
    assert not torch.equal(data.train["sum"][:]["image"], other.train["sum"][:]["image"])


def _source_rows(canvases: np.ndarray, pool: np.ndarray, part: slice, source_part: slice) -> np.ndarray:
    """Index into ``pool`` whose columns ``source_part`` equal each canvas's columns ``part``;
    -1 where none does."""
    flat_pool = pool[:, :, source_part].reshape(len(pool), -1)
    flat = canvases[:, :, part].reshape(len(canvases), -1)
    hits = (flat[:, None, :] == flat_pool[None, :, :]).all(-1)
    return np.where(hits.any(1), hits.argmax(1), -1)


def test_embedded_splits_use_disjoint_source_images(data):
    # Imported here: a machine without scikit-learn (the GPU image) still collects this module's GPU tests.
    from sklearn.datasets import load_digits

    source = load_digits()
    images, classes = (source.images / 16.0).astype(np.float32), source.target
    train_idx, test_idx = split_source_indices(classes, 0.2, SEED)
    pools = {"train": train_idx, "test": test_idx}
    for split_name, own in pools.items():
        other = pools["test" if split_name == "train" else "train"]
        # Pairs: columns 0..3 show only the left digit, 8..11 only the right one (every
        # half-image of the 1,797 is unique, so a match identifies the source image).
        pairs = getattr(data, split_name)["caption"][:]
        canvases, labels = pairs["image"].numpy(), pairs["label"].numpy()
        left = _source_rows(canvases, images[own], slice(0, 4), slice(0, 4))
        right = _source_rows(canvases, images[own], slice(8, 12), slice(4, 8))
        assert (left >= 0).all() and (right >= 0).all()
        assert np.array_equal(classes[own][left] * 10 + classes[own][right], labels)
        assert (_source_rows(canvases, images[other], slice(0, 4), slice(0, 4)) < 0).all()
        # Single digits: the canvas is the image at one of 5 offsets.
        digits = getattr(data, split_name)["digit"][:]
        canvases = digits["image"].numpy()
        start = np.argmax(canvases.any(1), axis=1)  # first inked column
        found = np.zeros(len(canvases), bool)
        for offset in range(5):
            for cut in range(8):
                at = (start == offset + cut) & ~found
                if not at.any():
                    continue
                idx = _source_rows(canvases[at], images[own], slice(offset, offset + 8), slice(0, 8))
                ok = idx >= 0
                assert np.array_equal(classes[own][idx[ok]], digits["label"].numpy()[at][ok])
                found[np.flatnonzero(at)[ok]] = True
        assert found.all()


def test_embedded_labels_and_chance(data):
    for name in ("sum", "compare"):  # each task draws its pairs from its own stream
        assert not torch.equal(data.test[name][:]["image"], data.test["caption"][:]["image"])
    test = {name: data.test[name][:] for name in data.task_names}
    labels = test["digit"]["label"].numpy()
    assert data.task("digit").chance == pytest.approx(np.bincount(labels).max() / len(labels))
    assert 0.1 <= data.task("digit").chance <= 0.25
    assert data.task("caption").chance == pytest.approx(0.01)
    values = test["sum"]["value"].numpy().astype(np.float64)
    assert data.task("sum").chance == pytest.approx(values.var())
    assert set(np.round(values * 18, 4)) <= set(range(19))
    compare = np.bincount(test["compare"]["label"].numpy(), minlength=3)
    assert compare[2] < compare[0] and compare[2] < compare[1]  # "same" needs equal digits
    assert 0.3 <= data.task("compare").chance <= 0.6
    assert 0.5 <= data.task("text_parity").chance <= 0.65


def _parse_operands(phrase: str) -> tuple[int, int]:
    words = [w for w in phrase.split() if w not in ("plus", "and", "add", "sum", "with")]
    numbers = [int(w) if w.isdigit() else DIGIT_NAMES.index(w) for w in words]
    assert len(numbers) == 2, phrase
    return numbers[0], numbers[1]


def test_text_parity_strings(data):
    phrases = text_parity_phrases()
    assert len(phrases) == len({p for p, _ in phrases}) == 2400
    train, test = data.train["text_parity"][:], data.test["text_parity"][:]
    for split in (train, test):
        for text, label in zip(split["text"], split["label"].tolist()):
            assert re.fullmatch(r"[a-z0-9 ]{1,16}", text), text
            a, b = _parse_operands(text)
            assert label == (a + b) % 2
    # Test strings are unseen in training, but every test operand pair was trained on.
    assert not set(test["text"]) & set(train["text"])
    full_train = build_embedded_tasks(["text_parity"], examples_per_task=4000, seed=SEED)
    trained_pairs = {_parse_operands(t) for t in full_train.train["text_parity"][:]["text"]}
    assert {_parse_operands(t) for t in test["text"]} <= trained_pairs
    assert not set(full_train.test["text_parity"][:]["text"]) & set(full_train.train["text_parity"][:]["text"])


def test_text_digit_strings(data):
    phrases = text_digit_phrases()
    assert len(phrases) == len({p for p, _ in phrases}) == 160
    train, test = data.train["text_digit"][:], data.test["text_digit"][:]
    for split in (train, test):
        for text, label in zip(split["text"], split["label"].tolist()):
            assert re.fullmatch(r"[a-z0-9 ]{1,16}", text), text
            (number,) = [int(w) if w.isdigit() else DIGIT_NAMES.index(w) for w in text.split() if w.isdigit() or w in DIGIT_NAMES]
            assert label == number
    assert not set(test["text"]) & set(train["text"])  # test phrases are unseen in training
    assert set(test["label"].tolist()) <= set(train["label"].tolist())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(names=["digit", "colour"]), "unknown embedded task 'colour'"),
        (dict(names=["digit", "digit"]), "unique"),
        (dict(names=[]), "non-empty"),
        (dict(examples_per_task=0), "examples_per_task must be >= 1"),
        (dict(eval_fraction=1.0), "eval_fraction"),
        (dict(seed=-1), "seed"),
    ],
)
def test_embedded_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_embedded_tasks(**kwargs)
    with pytest.raises(TypeError, match="string"):
        build_embedded_tasks("digit")


# ----------------------------------------------------------------------------- data folders


@pytest.mark.parametrize("file_format", ["jsonl", "parquet", "arrow"])
def test_save_load_round_trip(small, tmp_path, file_format):
    save_generalist_data(small, tmp_path, file_format=file_format)
    assert (tmp_path / "digit" / f"train.{file_format}").is_file()
    loaded = load_generalist_data(tmp_path)
    assert loaded.tasks == small.tasks
    for split in ("train", "test"):
        for name in small.task_names:
            a, b = getattr(small, split)[name], getattr(loaded, split)[name]
            assert b.features == a.features
            a, b = a[:], b[:]
            for column in a:
                if isinstance(a[column], list):
                    assert a[column] == b[column]
                else:  # bit-exact, dtype included
                    assert a[column].dtype == b[column].dtype and torch.equal(a[column], b[column])
    picked = load_generalist_data(tmp_path, tasks=["text_parity", "digit"])
    assert picked.task_names == ("text_parity", "digit")


def test_load_user_written_jsonl_task(tmp_path):
    """The docstring's recipe: a text task written by hand, one JSON object per line."""
    folder = tmp_path / "sentiment"
    folder.mkdir()
    rows = ['{"text": "a great little film", "label": 1, "id": 7}', '{"text": "dull", "label": 0, "id": 8}']
    (folder / "train.jsonl").write_text("\n".join(rows) + "\n")
    (folder / "test.jsonl").write_text('{"text": "great fun", "label": 1, "id": 9}\n')
    task = make_task(name="sentiment", targets=("negative", "positive"))
    (tmp_path / "tasks.json").write_text(json.dumps([task.to_dict()]))
    loaded = load_generalist_data(tmp_path)
    assert loaded.train["sentiment"].column_names == ["text", "label"]  # extra "id" dropped
    assert loaded.train["sentiment"][:]["text"] == ["a great little film", "dull"]
    # Images given as integers and values as ints are cast to float32.
    image = make_task(name="img", kind="regression", modality="image", targets=(), chance=0.1)
    (tmp_path / "img").mkdir()
    line = json.dumps({"image": [[0] * 12] * 7 + [[1] * 12], "value": 2}) + "\n"
    for split in ("train", "test"):
        (tmp_path / "img" / f"{split}.jsonl").write_text(line)
    (tmp_path / "tasks.json").write_text(json.dumps([task.to_dict(), image.to_dict()]))
    row = load_generalist_data(tmp_path, ["img"]).train["img"][:]
    assert row["image"].dtype == torch.float32 and row["image"][0, 7].sum() == 12
    assert row["value"].dtype == torch.float32 and row["value"].item() == 2.0


def test_load_errors_name_the_problem(small, tmp_path):
    with pytest.raises(FileNotFoundError, match="tasks.json"):
        load_generalist_data(tmp_path)
    save_generalist_data(small.subset(["digit", "text_parity"]), tmp_path, file_format="jsonl")
    with pytest.raises(ValueError, match=r"task\(s\) \['sum'\] not in"):
        load_generalist_data(tmp_path, ["sum"])
    # Ambiguous: the same split in two formats.
    small.train["digit"].to_parquet(str(tmp_path / "digit" / "train.parquet"))
    with pytest.raises(ValueError, match="train split is ambiguous"):
        load_generalist_data(tmp_path)
    (tmp_path / "digit" / "train.parquet").unlink()
    # Missing split file: names the candidates.
    (tmp_path / "text_parity" / "test.jsonl").rename(tmp_path / "text_parity" / "tst.jsonl")
    with pytest.raises(FileNotFoundError, match=r"no test split: none of .*test\.jsonl"):
        load_generalist_data(tmp_path)
    (tmp_path / "text_parity" / "tst.jsonl").rename(tmp_path / "text_parity" / "test.jsonl")
    # Misspelt column.
    good = (tmp_path / "text_parity" / "train.jsonl").read_text()
    (tmp_path / "text_parity" / "train.jsonl").write_text(good.replace('"label"', '"lable"'))
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['label'\]"):
        load_generalist_data(tmp_path)
    (tmp_path / "text_parity" / "train.jsonl").write_text(good)
    # Images of the wrong shape (casting alone would not notice).
    row = json.dumps({"image": [[0.0] * 11] * 8, "label": 1})
    (tmp_path / "digit" / "test.jsonl").write_text(row + "\n")
    with pytest.raises(ValueError, match=r"8 lists of 12 numbers; pixel row 0"):
        load_generalist_data(tmp_path)
    (tmp_path / "digit" / "test.jsonl").write_text(json.dumps({"image": [[0.0] * 12] * 9, "label": 1}) + "\n")
    with pytest.raises(ValueError, match=r"8 lists of 12 numbers; row 0"):
        load_generalist_data(tmp_path)
    (tmp_path / "digit" / "test.jsonl").write_text(json.dumps({"image": [[0.0] * 12] * 8, "label": 12}) + "\n")
    with pytest.raises(ValueError, match=r"labels must lie in 0..9"):
        load_generalist_data(tmp_path)
    (tmp_path / "tasks.json").write_text('{"name": "digit"}')
    with pytest.raises(ValueError, match="JSON list"):
        load_generalist_data(tmp_path)
    with pytest.raises(ValueError, match="file_format"):
        save_generalist_data(small, tmp_path, file_format="csv")


def test_load_refuses_one_task_name_given_as_a_string(small, tmp_path):
    """tasks="digit" would be read as the names 'd', 'i', 'g', ...: refused by type, naming the string."""
    (tmp_path / "tasks.json").write_text(json.dumps([task.to_dict() for task in small.tasks]))
    with pytest.raises(TypeError, match="not the string 'digit'"):
        load_generalist_data(tmp_path, tasks="digit")


def test_load_refuses_a_tasks_file_naming_a_task_twice(small, tmp_path):
    """Two entries named 'digit' would collapse into one task silently (the last one winning)."""
    digit = small.task("digit").to_dict()
    (tmp_path / "tasks.json").write_text(json.dumps([digit, small.task("sum").to_dict(), dict(digit, description="again")]))
    with pytest.raises(ValueError, match=r"repeats task names: \['digit', 'sum', 'digit'\]"):
        load_generalist_data(tmp_path)


# ------------------------------------------------------------------------- mixing weights


def test_task_probabilities_closed_forms():
    sizes = {"a": 100, "b": 400, "c": 0}
    assert task_probabilities(sizes, "size") == pytest.approx({"a": 0.2, "b": 0.8, "c": 0.0})
    # T = 2: p ∝ sqrt(n) = 10, 20, 0.
    assert task_probabilities(sizes, "temperature") == pytest.approx({"a": 1 / 3, "b": 2 / 3, "c": 0.0})
    assert task_probabilities(sizes, "temperature", temperature=1.0) == pytest.approx(
        task_probabilities(sizes, "size")
    )
    hot = task_probabilities({"a": 10, "b": 10_000}, "temperature", temperature=1e6)
    assert hot["a"] == pytest.approx(0.5, abs=1e-5)
    fixed = task_probabilities(sizes, "fixed", weights={"a": 1, "b": 3, "c": 0})
    assert fixed == pytest.approx({"a": 0.25, "b": 0.75, "c": 0.0})
    assert list(fixed) == ["a", "b", "c"] and math.fsum(fixed.values()) == pytest.approx(1.0)
    assert task_probabilities({"only": 1}, "size") == {"only": 1.0}


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        (({"a": 1}, "uniform"), {}, "unknown mixing strategy 'uniform'"),
        (({"a": 1, "b": 2}, "fixed"), dict(weights={"a": 1}), r"missing \['b'\]"),
        (({"a": 1}, "fixed"), dict(weights={"a": 1, "z": 1}), r"unknown \['z'\]"),
        (({"a": 1}, "fixed"), dict(weights={"a": -1}), "weight of task 'a'"),
        (({"a": 1}, "fixed"), dict(weights={"a": 0}), "weight 0"),
        (({"a": 1}, "fixed"), {}, "needs weights"),
        (({"a": 1}, "size"), dict(weights={"a": 1}), "only used by strategy 'fixed'"),
        (({"a": 1}, "temperature"), dict(temperature=0.0), "temperature must be"),
        (({"a": 1}, "temperature"), dict(temperature=-2.0), "temperature must be"),
        (({"a": -1}, "size"), {}, "size of task 'a'"),
        (({}, "size"), {}, "at least one task"),
        (({"a": 0, "b": 3}, "fixed"), dict(weights={"a": 1, "b": 1}), r"\['a'\] have no training examples"),
    ],
)
def test_task_probabilities_errors(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        task_probabilities(*args, **kwargs)


# ------------------------------------------------------------------------------- batching


def test_mixed_batches_format_and_frequencies(data):
    names = ("digit", "sum", "text_parity")
    probs = task_probabilities({n: 1 for n in names}, "fixed", weights={"digit": 1, "sum": 3, "text_parity": 4})
    stream = MixedBatches(data.train, names, 64, probs, seed=1)
    counts = dict.fromkeys(names, 0)
    per_step = []
    for _ in range(150):
        batch = next(stream)
        assert list(batch) == [n for n in names if n in batch]  # task order of task_names
        assert sum(len(sub["label" if "label" in sub else "value"]) for sub in batch.values()) == 64
        for name, sub in batch.items():
            counts[name] += len(next(iter(sub.values())))
        per_step.append(len(batch.get("digit", {"label": []})["label"]))
    total = 150 * 64
    for name in names:  # within 4 binomial standard deviations
        p = probs[name]
        assert abs(counts[name] / total - p) < 4 * math.sqrt(p * (1 - p) / total)
    assert len(set(per_step)) > 3  # a task's share varies from step to step
    sub = next(stream)
    assert sub["sum"]["image"].shape[1:] == IMAGE_SHAPE and sub["sum"]["image"].dtype == torch.float32
    assert sub["sum"]["value"].dtype == torch.float32 and sub["text_parity"]["label"].dtype == torch.int64
    assert isinstance(sub["text_parity"]["text"], list) and isinstance(sub["text_parity"]["text"][0], str)


def test_per_task_batching(data):
    names = ("digit", "caption")
    probs = {"digit": 0.3, "caption": 0.7}
    stream = MixedBatches(data.train, names, 5, probs, batching="per_task", seed=2)
    picked = []
    for _ in range(400):
        batch = next(stream)
        assert len(batch) == 1
        (name, sub), = batch.items()
        assert sub["image"].shape == (5, *IMAGE_SHAPE) and sub["label"].shape == (5,)
        picked.append(name)
    share = picked.count("caption") / len(picked)
    assert abs(share - 0.7) < 4 * math.sqrt(0.21 / 400)


@pytest.mark.parametrize("batching", ["mixed", "per_task"])
def test_every_task_adds_zero_row_sub_batches_and_changes_no_draw(data, batching):
    names = ("digit", "sum", "text_parity")
    probs = {"digit": 0.2, "sum": 0.3, "text_parity": 0.5}
    plain = MixedBatches(data.train, names, 3, probs, batching=batching, seed=4)
    every = MixedBatches(data.train, names, 3, probs, batching=batching, seed=4, every_task=True)
    empty_seen = 0
    for _ in range(20):
        drawn, full = next(plain), next(every)
        assert list(full) == list(names)
        for name in names:
            if name in drawn:
                assert full[name].keys() == drawn[name].keys()
                for column in drawn[name]:
                    assert full[name][column] == drawn[name][column] if isinstance(drawn[name][column], list) \
                        else torch.equal(full[name][column], drawn[name][column])
                continue
            empty_seen += 1
            sub = full[name]
            if name == "text_parity":
                assert sub["text"] == [] and sub["label"].shape == (0,) and sub["label"].dtype == torch.int64
            else:
                assert sub["image"].shape == (0, *IMAGE_SHAPE) and sub["image"].dtype == torch.float32
                assert sub["value" if name == "sum" else "label"].shape == (0,)
    assert empty_seen > 0
    assert every.state_dict() == plain.state_dict()  # same draws, same positions: resumes alike
    with pytest.raises(TypeError, match="every_task must be True or False, got 1"):
        MixedBatches(data.train, names, 3, probs, every_task=1)


def test_rows_without_replacement_and_reshuffled_per_epoch():
    task = make_task(name="rows")
    train = {"rows": numbered_text_split(task, 10)}
    stream = MixedBatches(train, ["rows"], 3, {"rows": 1.0}, seed=0)
    seen = [i for _ in range(10) for i in row_ids(next(stream)["rows"])]  # 30 rows = 3 epochs
    epochs = [seen[0:10], seen[10:20], seen[20:30]]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    # A task smaller than the batch repeats its rows within a batch.
    tiny = {"one": numbered_text_split(make_task(name="one"), 1)}
    assert row_ids(next(MixedBatches(tiny, ["one"], 4, {"one": 1.0}))["one"]) == [0, 0, 0, 0]


def test_zero_probability_task_may_be_empty_and_never_appears(data):
    empty = numbered_text_split(make_task(name="empty"), 0)
    train = {"digit": data.train["digit"], "empty": empty}
    stream = MixedBatches(train, ["digit", "empty"], 8, {"digit": 1.0, "empty": 0.0})
    assert all(list(next(stream)) == ["digit"] for _ in range(20))
    with pytest.raises(ValueError, match=r"\['empty'\] have an empty train split"):
        MixedBatches(train, ["digit", "empty"], 8, {"digit": 1.0, "empty": 0.5})


def _same_batches(a, b) -> bool:
    if list(a) != list(b):
        return False
    for name in a:
        for column, value in a[name].items():
            other = b[name][column]
            if not (value == other if isinstance(value, list) else torch.equal(value, other)):
                return False
    return True


@pytest.mark.parametrize("batching", ["mixed", "per_task"])
def test_resume_is_bit_exact(data, batching):
    names = ("digit", "sum", "text_parity")
    probs = task_probabilities({n: len(data.train[n]) for n in names}, "temperature", temperature=3.0)
    # Batch 23 against 60-row tasks: positions cross epoch boundaries at odd places.
    stream = MixedBatches(data.train, names, 23, probs, batching=batching, seed=5)
    for _ in range(7):
        next(stream)
    state = json.loads(json.dumps(stream.state_dict()))  # survives JSON (and torch.save)
    expected = [next(stream) for _ in range(9)]
    fresh = MixedBatches(data.train, names, 23, probs, batching=batching, seed=5)
    fresh.load_state_dict(state)
    assert all(_same_batches(e, next(fresh)) for e in expected)
    # Same seed from scratch: same stream; another seed: another stream.
    a = MixedBatches(data.train, names, 23, probs, batching=batching, seed=5)
    b = MixedBatches(data.train, names, 23, probs, batching=batching, seed=6)
    first = [next(a) for _ in range(7)] + expected
    again = MixedBatches(data.train, names, 23, probs, batching=batching, seed=5)
    assert all(_same_batches(x, next(again)) for x in first)
    assert not all(_same_batches(x, next(b)) for x in first[:3])
    with pytest.raises(ValueError, match="state has seed=5 but this iterator has seed=6"):
        b.load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size"):
        MixedBatches(data.train, names, 22, probs, batching=batching, seed=5).load_state_dict(state)


def test_resume_from_a_state_at_the_end_of_an_epoch():
    # 6 rows, batches of 3: after two batches the position is 6 = the task's size (the next batch starts
    # epoch 1). That state is valid and resumes the same stream.
    train = {"rows": numbered_text_split(make_task(name="rows"), 6)}
    stream = MixedBatches(train, ["rows"], 3, {"rows": 1.0}, seed=7)
    next(stream), next(stream)
    state = stream.state_dict()
    assert state["positions"] == [6] and state["epochs"] == [0]
    fresh = MixedBatches(train, ["rows"], 3, {"rows": 1.0}, seed=7)
    fresh.load_state_dict(state)
    assert [row_ids(next(fresh)["rows"]) for _ in range(4)] == [row_ids(next(stream)["rows"]) for _ in range(4)]


def test_probabilities_are_normalised_here():
    # {a: 3, b: 1} draws as {a: 0.75, b: 0.25}: the same stream, the same state.
    names = ("a", "b")
    train = {n: numbered_text_split(make_task(name=n), 8) for n in names}
    raw = MixedBatches(train, names, 5, {"a": 3.0, "b": 1.0}, seed=2)
    unit = MixedBatches(train, names, 5, {"a": 0.75, "b": 0.25}, seed=2)
    assert raw.state_dict()["probabilities"] == [0.75, 0.25]
    assert all(_same_batches(next(raw), next(unit)) for _ in range(10))


def test_mixed_batches_rejects_bad_arguments(data):
    probs = {"digit": 1.0}
    with pytest.raises(ValueError, match=r"no train split for task\(s\) \['nope'\]"):
        MixedBatches(data.train, ["nope"], 4, {"nope": 1.0})
    with pytest.raises(ValueError, match=r"missing \['digit'\]"):
        MixedBatches(data.train, ["digit"], 4, {"sum": 1.0})
    with pytest.raises(ValueError, match="batch_size"):
        MixedBatches(data.train, ["digit"], 0, probs)
    with pytest.raises(ValueError, match="batching"):
        MixedBatches(data.train, ["digit"], 4, probs, batching="round_robin")
    with pytest.raises(ValueError, match=">= 0"):
        MixedBatches(data.train, ["digit"], 4, {"digit": -1.0})


def test_eval_batches_cover_the_split_once(data):
    for name in ("digit", "text_parity", "sum"):
        split = data.test[name]
        batches = list(eval_batches(split, 33))
        assert [len(next(iter(b.values()))) for b in batches] == [33] * 6 + [2]
        whole = split[:]
        for column, value in whole.items():
            parts = [b[column] for b in batches]
            joined = sum(parts, []) if isinstance(value, list) else torch.cat(parts)
            assert joined == value if isinstance(value, list) else torch.equal(joined, value)
    with pytest.raises(ValueError, match="batch_size"):
        eval_batches(data.test["digit"], 0)


def test_slice_for_rank():
    sub = {"text": [f"row {i}" for i in range(7)], "label": torch.arange(7)}
    parts = [slice_for_rank(sub, rank, 3) for rank in range(3)]
    assert [p["label"].tolist() for p in parts] == [[0, 3, 6], [1, 4], [2, 5]]
    assert [row_ids(p) for p in parts] == [[0, 3, 6], [1, 4], [2, 5]]
    one = {"image": torch.zeros(1, *IMAGE_SHAPE), "value": torch.ones(1)}
    assert slice_for_rank(one, 1, 2)["image"].shape == (0, *IMAGE_SHAPE)
    assert torch.equal(slice_for_rank(one, 0, 1)["value"], one["value"])
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        slice_for_rank(sub, 2, 2)
    with pytest.raises(TypeError, match="column 'label' is a ndarray"):
        slice_for_rank({"label": np.arange(3)}, 0, 2)


def test_task_record_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        make_task().name = "other"


def test_a_tasks_rows_do_not_depend_on_the_task_order() -> None:
    # Each task's example order is keyed by its name, not its position: reordering (or adding) tasks
    # keeps every task's data order.
    from moe_engine.mtl.generalist import GeneralistTask, MixedBatches, task_split

    def task(name: str) -> GeneralistTask:
        return GeneralistTask(name=name, kind="classification", modality="text", targets=("a", "b"), metric="accuracy",
                              higher_is_better=True, chance=0.5, description="t")

    train = {n: task_split(task(n), [f"row {i}" for i in range(10)], np.arange(10) % 2) for n in ("a", "b")}
    one = MixedBatches(train, ("a", "b"), 4, {"a": 1.0, "b": 0.0}, batching="per_task", seed=3)
    other = MixedBatches(train, ("b", "a"), 4, {"a": 1.0, "b": 0.0}, batching="per_task", seed=3)
    for _ in range(3):
        assert next(one)["a"]["text"] == next(other)["a"]["text"]
