"""Metrics sinks of a run: one CSV file per split and TensorBoard scalars, both in the run directory."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path
from typing import Mapping


class MetricsLogger:
    """Appends rows of scalar metrics to `<out_dir>/<split>.csv` and to TensorBoard under `<split>/`.

    Each CSV's columns are fixed by its first row (a later row may leave some blank, never add
    new ones), so the files load straight into pandas. On resume from step s, rows after s
    that a killed run wrote past its last checkpoint are removed, and TensorBoard purges them too,
    so a resumed run's logs read as one uninterrupted run. A fresh run (resume_step None)
    removes the CSV files and TensorBoard events already in `out_dir` unless `clear` is False
    (the ranks other than 0 of a distributed run, which write no logs).
    """

    def __init__(
        self, out_dir: str | Path, *, csv_files: bool, tensorboard: bool, resume_step: int | None, clear: bool = True
    ) -> None:
        self.out_dir = Path(out_dir)
        if csv_files or tensorboard or clear:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.csv_files = csv_files
        self._columns: dict[str, list[str]] = {}
        self._writer = None
        if resume_step is None and clear:
            # A fresh run owns the directory's logs: drop those of an earlier run (e.g. one
            # killed before its first checkpoint), so they are not continued or mixed in.
            for path in self.out_dir.glob("*.csv"):
                path.unlink()
            shutil.rmtree(self.out_dir / "tensorboard", ignore_errors=True)
        elif csv_files:
            for path in self.out_dir.glob("*.csv"):
                self._truncate_after(path, resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when asked for

            purge = None if resume_step is None else resume_step + 1
            self._writer = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"), purge_step=purge)

    @property
    def writer(self):
        """The TensorBoard SummaryWriter, or None when TensorBoard logging is off (for images, figures)."""
        return self._writer

    def csv_path(self, split: str) -> Path:
        return self.out_dir / f"{split}.csv"

    def log(self, split: str, step: int, metrics: Mapping[str, float]) -> None:
        if self.csv_files:
            self._append_csv(split, step, metrics)
        if self._writer is not None:
            for name, value in metrics.items():
                if value is not None and not (isinstance(value, float) and math.isnan(value)):
                    self._writer.add_scalar(f"{split}/{name}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _append_csv(self, split: str, step: int, metrics: Mapping[str, float]) -> None:
        path = self.csv_path(split)
        if split not in self._columns:
            if path.exists() and path.stat().st_size:
                with path.open(newline="") as f:
                    self._columns[split] = next(csv.reader(f))
            else:
                self._columns[split] = ["step", *metrics]
                with path.open("w", newline="") as f:
                    csv.writer(f).writerow(self._columns[split])
        columns = self._columns[split]
        unknown = [k for k in metrics if k not in columns]
        if unknown:
            raise ValueError(f"metrics {unknown} are not columns of {path} ({columns})")
        row = {"step": step, **metrics}
        with path.open("a", newline="") as f:
            csv.writer(f).writerow(["" if row.get(c) is None else _format(row[c]) for c in columns])

    @staticmethod
    def _truncate_after(path: Path, step: int) -> None:
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            return
        kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step]
        if len(kept) != len(rows):
            with path.open("w", newline="") as f:
                csv.writer(f).writerows(kept)


def _format(value: float | int | str) -> str:
    # repr keeps every bit of a float, so logs of a resumed and an uninterrupted run compare exactly.
    return repr(value) if isinstance(value, float) else str(value)
