"""Text corpora for language-model fine-tuning: local files, tokenized and cut into rows of S tokens.

Layout of data.path::

    path/
        train.jsonl  or  train.parquet    one document per row: a `text` column, optionally `task`
        test.jsonl   or  test.parquet

Without a `task` column every document belongs to the task "lm" (`DEFAULT_TASK`). With one, each
task of data.tasks is a language-modelling task with its own loss; documents of other tasks are
left out, and a task of data.tasks with no document in a split is refused.

Rows: a task's documents, each followed by the tokenizer's end-of-text id, are tokenized and
either packed (concatenated and cut every S tokens: only a task's last row is short) or kept one
document per row (truncated to S tokens). A split becomes a `datasets.Dataset` with the columns

    input_ids  (N, S) int64   right-padded with the tokenizer's pad id
    length     (N,)   int64   real tokens of each row (2..S; shorter rows predict nothing and are dropped)
    task       (N,)   int64   index into the task list

Tokenizer (`build_tokenizer`): a Hugging Face tokenizer folder (data.tokenizer, else the model's
folder, else data.path, the first that holds tokenizer files), or, with none, UTF-8 bytes
(`ByteTokenizer`: ids 2..257, 0 pads, 1 ends a document), which needs a vocabulary of 258 ids.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import datasets
import numpy as np

DEFAULT_TASK = "lm"
FILE_FORMATS = {"jsonl": "json", "parquet": "parquet"}
# Files any of which makes a folder a Hugging Face tokenizer folder.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_SPLITS = ("train", "test")


@dataclass(frozen=True)
class TextTokenizer:
    """Texts to token ids.

    name: where it came from, for messages. encode_batch: list of B texts -> B lists of ids (with
    the tokenizer's own special tokens, e.g. a BOS). eos_id: appended after every document (None:
    nothing). pad_id: fills short rows (never attended, never predicted). num_ids: ids it can emit;
    the model's vocabulary must hold at least this many.
    """

    name: str
    encode_batch: Callable[[list[str]], list[list[int]]]
    eos_id: int | None
    pad_id: int
    num_ids: int


class ByteTokenizer:
    """UTF-8 bytes as ids OFFSET..OFFSET+255; PAD_ID pads, EOS_ID ends a document."""

    PAD_ID, EOS_ID, OFFSET = 0, 1, 2
    NUM_IDS = OFFSET + 256

    @classmethod
    def encode_batch(cls, texts: list[str]) -> list[list[int]]:
        return [[b + cls.OFFSET for b in text.encode("utf-8")] for text in texts]

    @classmethod
    def decode(cls, ids: Sequence[int]) -> str:
        """The text of byte ids (other ids skipped; broken UTF-8 replaced)."""
        return bytes(i - cls.OFFSET for i in ids if cls.OFFSET <= i < cls.NUM_IDS).decode("utf-8", errors="replace")

    @classmethod
    def as_text_tokenizer(cls) -> TextTokenizer:
        return TextTokenizer("bytes (UTF-8)", cls.encode_batch, cls.EOS_ID, cls.PAD_ID, cls.NUM_IDS)


def has_tokenizer(folder: str | Path | None) -> bool:
    """Whether `folder` holds Hugging Face tokenizer files."""
    return folder is not None and Path(folder).is_dir() and any((Path(folder) / f).is_file() for f in TOKENIZER_FILES)


def hf_tokenizer(folder: str | Path) -> TextTokenizer:
    """A local Hugging Face tokenizer folder (AutoTokenizer, local files only)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)

    def encode_batch(texts: list[str]) -> list[list[int]]:
        return [list(ids) for ids in tok(texts, add_special_tokens=True)["input_ids"]] if texts else []

    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos if eos is not None else 0)
    return TextTokenizer(f"Hugging Face tokenizer {folder}", encode_batch, eos, pad, len(tok))


def build_tokenizer(choice: str | None, search: Sequence[str | Path | None]) -> TextTokenizer:
    """choice (data.tokenizer): "bytes", a tokenizer folder, or None: the first folder of `search`
    (the model's folder, data.path) that holds tokenizer files, else bytes."""
    if choice == "bytes":
        return ByteTokenizer.as_text_tokenizer()
    if choice is not None:
        if not has_tokenizer(choice):
            raise FileNotFoundError(
                f"data.tokenizer = {choice!r}: not a folder with Hugging Face tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                "give such a folder, 'bytes' for the byte-level tokenizer, or null to look next to the model and the data"
            )
        return hf_tokenizer(choice)
    for folder in search:
        if has_tokenizer(folder):
            return hf_tokenizer(folder)
    return ByteTokenizer.as_text_tokenizer()


@dataclass(frozen=True)
class TextTask:
    """One language-modelling task: its name and a line describing its data."""

    name: str
    description: str


@dataclass(frozen=True)
class TextData:
    """Tokenized rows of every task (columns in the module docstring) and how they were made."""

    tasks: tuple[TextTask, ...]
    train: datasets.Dataset
    test: datasets.Dataset
    seq_len: int
    tokenizer: TextTokenizer

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> TextTask:
        return next(t for t in self.tasks if t.name == name)


def split_file(folder: Path, split: str) -> Path:
    """The one file of `split` in `folder`; FileNotFoundError / ValueError naming what was looked for."""
    candidates = [folder / f"{split}.{suffix}" for suffix in FILE_FORMATS]
    present = [f for f in candidates if f.is_file()]
    if not present:
        raise FileNotFoundError(f"data.path = {str(folder)!r}: no {split} split; expected one of {[str(f) for f in candidates]}")
    if len(present) > 1:
        raise ValueError(
            f"data.path = {str(folder)!r}: the {split} split is ambiguous, several files exist: {[str(f) for f in present]}"
        )
    return present[0]


def read_documents(file: Path, tasks: Sequence[str]) -> dict[str, list[str]]:
    """task name -> its documents in file order, for the tasks of `tasks` (others left out).

    Read with `datasets.load_dataset` into memory through a throwaway cache (neither ~/.cache nor
    the data folder is written). ValueError for a missing or non-string column and for a task of
    `tasks` with no document.
    """
    with tempfile.TemporaryDirectory(prefix="moe_engine_text_") as cache_dir:
        loaded = datasets.load_dataset(
            FILE_FORMATS[file.suffix[1:]], data_files={"split": str(file)}, split="split",
            cache_dir=cache_dir, keep_in_memory=True,
        )
    if "text" not in loaded.column_names:
        raise ValueError(f"{file}: no `text` column (it has {loaded.column_names})")
    texts = loaded["text"]
    labels = loaded["task"] if "task" in loaded.column_names else [DEFAULT_TASK] * len(texts)
    wanted = set(tasks)
    documents: dict[str, list[str]] = {name: [] for name in tasks}
    for row, (text, task) in enumerate(zip(texts, labels)):
        if not isinstance(text, str) or not isinstance(task, str):
            raise ValueError(f"{file}: row {row} has text {text!r} and task {task!r}; both must be strings")
        if task in wanted:
            documents[task].append(text)
    empty = [name for name, docs in documents.items() if not docs]
    if empty:
        found = sorted(set(labels))
        raise ValueError(f"data.tasks = {list(tasks)}: {empty} have no document in {file} (its tasks: {found})")
    return documents


def pack_rows(
    documents: list[list[int]], seq_len: int, eos_id: int | None, pad_id: int, packing: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """(ids (N, seq_len) int64, lengths (N,) int64) of one task's tokenized documents (module docstring).
    Rows of fewer than 2 tokens are dropped: they predict nothing."""
    ending = [eos_id] if eos_id is not None else []
    if packing:
        stream = np.fromiter((i for doc in documents for i in (*doc, *ending)), dtype=np.int64)
        lengths = np.full(-(-len(stream) // seq_len), seq_len, dtype=np.int64)
        if len(lengths):
            lengths[-1] = len(stream) - seq_len * (len(lengths) - 1)
        pieces = [stream[i * seq_len : (i + 1) * seq_len] for i in range(len(lengths))]
    else:
        pieces = [np.asarray([*doc, *ending][:seq_len], dtype=np.int64) for doc in documents]
        lengths = np.asarray([len(p) for p in pieces], dtype=np.int64)
    ids = np.full((len(pieces), seq_len), pad_id, dtype=np.int64)
    for row, piece in enumerate(pieces):
        ids[row, : len(piece)] = piece
    kept = lengths >= 2
    return ids[kept], lengths[kept]


def _features(seq_len: int) -> datasets.Features:
    return datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int64"), length=seq_len),
        "length": datasets.Value("int64"),
        "task": datasets.Value("int64"),
    })


def load_text_data(
    path: str | Path, tasks: Sequence[str], tokenizer: TextTokenizer, seq_len: int, *, packing: bool = True,
) -> TextData:
    """Read, tokenize and cut both splits of `path` (module docstring) for `tasks`, in that order."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"data.path = {str(path)!r}: no such folder (expected train.jsonl|parquet and test.jsonl|parquet)"
        )
    if seq_len < 2:
        raise ValueError(f"model.max_text_len = {seq_len}: a row needs at least 2 tokens (one to read, one to predict)")
    splits, described = {}, {}
    for split in _SPLITS:
        file = split_file(folder, split)
        documents = read_documents(file, tasks)
        columns = {"input_ids": [], "length": [], "task": []}
        for t, name in enumerate(tasks):
            encoded = tokenizer.encode_batch(documents[name])
            ids, lengths = pack_rows(encoded, seq_len, tokenizer.eos_id, tokenizer.pad_id, packing)
            if not len(ids):
                raise ValueError(f"{file}: the documents of task {name!r} hold fewer than 2 tokens; nothing to predict")
            columns["input_ids"].append(ids)
            columns["length"].append(lengths)
            columns["task"].append(np.full(len(ids), t, dtype=np.int64))
            if split == "train":
                described[name] = f"next-token prediction: {len(documents[name])} documents, {int(lengths.sum())} tokens"
        joined = {k: np.concatenate(v) for k, v in columns.items()}
        splits[split] = datasets.Dataset.from_dict(joined, features=_features(seq_len)).with_format("torch")
    return TextData(tuple(TextTask(n, described[n]) for n in tasks), splits["train"], splits["test"], seq_len, tokenizer)
