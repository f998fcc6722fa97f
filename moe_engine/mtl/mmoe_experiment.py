"""The synthetic experiment of the MMoE paper (Ma et al., KDD 2018, section 4): MMoE vs OMoE vs shared-bottom.

For each task correlation p, seed and model: draw the paper's two regression tasks
(`moe_engine.mtl.synthetic`; train and test sets from one draw, so they share the tasks), train
the model with Adam on the sum of the two tasks' MSE, and measure each task's test MSE. The
models are the paper's, of comparable size (`moe_engine.mtl.mmoe.build_model`). One seed fixes
the data, the initialisation and the batches, and is shared by the three models, so they are
compared on the same data. The paper's finding: MMoE <= OMoE <= shared-bottom, the gap growing
as p falls.

Writes out_dir/results.json (per-run records and the mean/std per (model, p)) and
out_dir/mmoe_synthetic.png (test loss against p, one line per model, std over seeds as error
bars); prints one line per run and a table. Run it as
    python -m moe_engine.mtl.mmoe_experiment --config configs/mmoe_synthetic.yaml --out runs/mmoe
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import yaml

from moe_engine.config import ConfigError
from moe_engine.mtl.mmoe import MODEL_KINDS, build_model, count_parameters
from moe_engine.mtl.synthetic import make_synthetic_tasks

LR_SCHEDULES = ("constant", "cosine")
RESULTS_FILE = "results.json"
PLOT_FILE = "mmoe_synthetic.png"
NUM_TASKS = 2


@dataclass(frozen=True)
class ExperimentConfig:
    """The experiment's settings; every field is a key of configs/mmoe_synthetic.yaml.

    correlations: task correlations p, each in [-1, 1]. models: kinds of `build_model`.
    seeds: one run per (model, p, seed). steps, batch_size, lr, lr_schedule: Adam's training
    ("cosine" decays the rate to 0 over the steps). num_train, num_test: samples per data set.
    d, c, m: the data's input width, weight scale and number of sine terms (the paper: 100, 1, 10).
    num_experts, expert_hidden, tower_hidden: the model sizes (the paper: 8, 16, 8).
    top_k: None (the paper's dense gates) or the sparse gates' K. num_threads: torch's CPU
    threads while training (None leaves torch's setting; these models are too small to gain
    from more than one, and oversubscribed threads slow them down many times).
    """

    correlations: tuple[float, ...] = (1.0, 0.9, 0.5)
    models: tuple[str, ...] = MODEL_KINDS
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 1500
    batch_size: int = 128
    lr: float = 3e-3
    lr_schedule: str = "cosine"
    num_train: int = 10_000
    num_test: int = 2_000
    d: int = 100
    c: float = 1.0
    m: int = 10
    num_experts: int = 8
    expert_hidden: int = 16
    tower_hidden: int = 8
    top_k: int | None = None
    num_threads: int | None = 1

    def __post_init__(self) -> None:
        for name in ("correlations", "models", "seeds"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
                _fail(name, value, "expected a non-empty list")
            object.__setattr__(self, name, tuple(value))
        for p in self.correlations:
            if not _is_number(p) or not -1.0 <= p <= 1.0:
                _fail("correlations", list(self.correlations), f"entry {p!r} is not a number in [-1, 1]")
        for kind in self.models:
            if kind not in MODEL_KINDS:
                _fail("models", list(self.models), f"entry {kind!r} is not one of {', '.join(MODEL_KINDS)}")
        for seed in self.seeds:
            if not _is_int(seed) or seed < 0:
                _fail("seeds", list(self.seeds), f"entry {seed!r} is not an integer >= 0")
        # After the entry checks: a nested list as an entry is unhashable and must be named, not raise.
        for name in ("correlations", "models", "seeds"):
            value = getattr(self, name)
            if len(set(value)) != len(value):
                _fail(name, list(value), "expected no repeated entries")
        for name in ("steps", "batch_size", "num_train", "num_test", "num_experts", "expert_hidden", "tower_hidden"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                _fail(name, getattr(self, name), "expected an integer >= 1")
        if not _is_int(self.d) or self.d < 2:
            _fail("d", self.d, "expected an integer >= 2")
        if not _is_int(self.m) or self.m < 0:
            _fail("m", self.m, "expected an integer >= 0")
        if not _is_number(self.lr) or not 0 < self.lr < math.inf:
            _fail("lr", self.lr, "expected a number > 0")
        if not _is_number(self.c) or not math.isfinite(self.c):
            _fail("c", self.c, "expected a finite number")
        if self.lr_schedule not in LR_SCHEDULES:
            _fail("lr_schedule", self.lr_schedule, f"allowed: {', '.join(LR_SCHEDULES)}")
        if self.top_k is not None and (not _is_int(self.top_k) or not 1 <= self.top_k <= self.num_experts):
            _fail("top_k", self.top_k, f"expected null (dense gates) or an integer in [1, num_experts = {self.num_experts}]")
        if self.num_threads is not None and (not _is_int(self.num_threads) or self.num_threads < 1):
            _fail("num_threads", self.num_threads, "expected null (torch's setting) or an integer >= 1")

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> ExperimentConfig:
        """Build from a YAML mapping; unknown keys and bad values raise ConfigError naming the key."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [key for key in data if key not in names]
        if unknown:
            raise ConfigError(f"{source}: unknown key {unknown[0]!r}; allowed: {', '.join(names)}")
        return cls(**data)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{name} = {value!r}: {allowed}")


def load_config(path: str | Path) -> ExperimentConfig:
    """Read an experiment config from YAML (yaml.safe_load); an empty file gives the defaults."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise ConfigError(f"cannot read the experiment config {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    return ExperimentConfig.from_dict(data, source=str(path))


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------


def train_and_evaluate(cfg: ExperimentConfig, kind: str, correlation: float, seed: int) -> dict[str, Any]:
    """Train one model on one data set; the record of the run (test MSE per task, parameters)."""
    x, y = make_synthetic_tasks(cfg.num_train + cfg.num_test, correlation, d=cfg.d, c=cfg.c, m=cfg.m, seed=seed)
    x_train, y_train, x_test, y_test = x[:cfg.num_train], y[:cfg.num_train], x[cfg.num_train:], y[cfg.num_train:]
    start = time.perf_counter()
    # The caller's RNG state is left as it was; the run's own draws come from `seed` alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(kind, cfg.d, NUM_TASKS, num_experts=cfg.num_experts, expert_hidden=cfg.expert_hidden,
                            tower_hidden=cfg.tower_hidden, top_k=cfg.top_k)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, (lambda step: 0.5 * (1 + math.cos(math.pi * step / cfg.steps))) if cfg.lr_schedule == "cosine" else (lambda step: 1.0)
    )
    batches = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(cfg.steps):
        index = torch.randint(0, cfg.num_train, (cfg.batch_size,), generator=batches)
        loss = ((model(x_train[index]) - y_train[index]) ** 2).mean(dim=0).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        test_mse = ((model(x_test) - y_test) ** 2).mean(dim=0).tolist()
        train_mse = ((model(x_train) - y_train) ** 2).mean(dim=0).tolist()
    return {
        "model": kind, "p": correlation, "seed": seed, "test_mse": test_mse, "test_loss": sum(test_mse) / NUM_TASKS,
        "train_loss": sum(train_mse) / NUM_TASKS, "params": count_parameters(model),
        "seconds": round(time.perf_counter() - start, 3),
    }


# ---------------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExperimentResults:
    """records: one dict per run. summary: {model: {p: {"mean", "std", "mean_per_task", "runs"}}} of
    the test loss (the mean over the tasks of their test MSE). table: rows p, columns model mean ± std."""

    config: ExperimentConfig
    records: list[dict[str, Any]]
    summary: dict[str, dict[float, dict[str, Any]]]
    table: str
    results_path: Path
    plot_path: Path


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[float, dict[str, Any]]]:
    """Mean and std (over seeds; 0 for one seed) of the test loss per (model, p)."""
    summary: dict[str, dict[float, dict[str, Any]]] = {}
    for record in records:
        summary.setdefault(record["model"], {}).setdefault(record["p"], {"runs": []})["runs"].append(record)
    for by_p in summary.values():
        for cell in by_p.values():
            runs = cell.pop("runs")
            losses = [r["test_loss"] for r in runs]
            cell["mean"] = statistics.fmean(losses)
            cell["std"] = statistics.stdev(losses) if len(losses) > 1 else 0.0
            cell["mean_per_task"] = [statistics.fmean(r["test_mse"][t] for r in runs) for t in range(NUM_TASKS)]
            cell["runs"] = len(runs)
    return summary


def format_table(summary: dict[str, dict[float, dict[str, Any]]], models: Sequence[str], correlations: Sequence[float]) -> str:
    """Rows p (as given), columns model: the test loss's mean ± std over seeds."""
    header = ["p", *models]
    rows = [[f"{p:g}", *(f"{summary[m][p]['mean']:.4f} ± {summary[m][p]['std']:.4f}" for m in models)] for p in correlations]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def save_plot(summary: dict[str, dict[float, dict[str, Any]]], models: Sequence[str], correlations: Sequence[float],
              path: Path) -> None:
    """Test loss against p, one line per model with the std over seeds as error bars (matplotlib, Agg)."""
    # The Agg canvas directly, not pyplot: no global backend switch, no figure registry.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    ps = sorted(correlations, reverse=True)
    # Each model's points are shifted a little sideways so that the error bars do not hide each other.
    dodge = 0.008 * ((max(ps) - min(ps)) or 1.0)
    for i, model in enumerate(models):
        shift = (i - (len(models) - 1) / 2) * dodge
        axes.errorbar([p + shift for p in ps], [summary[model][p]["mean"] for p in ps],
                      yerr=[summary[model][p]["std"] for p in ps], marker="o", capsize=3, label=model)
    axes.set_xlabel("task correlation p")
    axes.set_ylabel("test MSE (mean over the 2 tasks)")
    axes.set_title("MMoE synthetic experiment")
    axes.invert_xaxis()
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)


def run_experiment(
    out_dir: str | Path, progress: Callable[[str], None] | None = print, **settings: Any
) -> ExperimentResults:
    """Train every (model, p, seed) and write results.json and mmoe_synthetic.png into out_dir.

    settings: the fields of `ExperimentConfig` (correlations, models, seeds, steps, batch_size,
    lr, num_train, num_test, ...); missing ones take its defaults. progress: called with one
    line per run (None: silent). Returns the records, the summary and the printed table.
    """
    cfg = ExperimentConfig(**settings)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [(kind, p, seed) for p in cfg.correlations for seed in cfg.seeds for kind in cfg.models]
    records = []
    threads = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    try:
        for i, (kind, p, seed) in enumerate(runs, start=1):
            record = train_and_evaluate(cfg, kind, p, seed)
            records.append(record)
            if progress is not None:
                task_losses = " ".join(f"{v:.4f}" for v in record["test_mse"])
                progress(f"[{i}/{len(runs)}] model={kind} p={p:g} seed={seed} test_mse={task_losses} "
                         f"params={record['params']} ({record['seconds']:.1f} s)")
    finally:
        torch.set_num_threads(threads)

    summary = summarize(records)
    table = format_table(summary, cfg.models, cfg.correlations)
    results_path, plot_path = out_dir / RESULTS_FILE, out_dir / PLOT_FILE
    results_path.write_text(json.dumps({
        "config": dataclasses.asdict(cfg),
        "records": records,
        "summary": [{"model": m, "p": p, **cell} for m, by_p in summary.items() for p, cell in by_p.items()],
    }, indent=2) + "\n")
    save_plot(summary, cfg.models, cfg.correlations, plot_path)
    return ExperimentResults(cfg, records, summary, table, results_path, plot_path)


DESCRIPTION = "Reproduce the MMoE paper's synthetic experiment: MMoE vs OMoE vs shared-bottom over task correlations."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The experiment's options, for this module's parser and for `moe-engine mmoe-synthetic`."""
    parser.add_argument("--config", type=Path, default=None, help="experiment YAML, e.g. configs/mmoe_synthetic.yaml (default: the built-in settings)")
    parser.add_argument("--out", type=Path, default=Path("runs/mmoe_synthetic"), help="folder for results.json and the plot")
    parser.add_argument("--quiet", action="store_true", help="no line per run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m moe_engine.mtl.mmoe_experiment", description=DESCRIPTION)
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; argv without the program name (None: sys.argv[1:])."""
    return run_from_args(build_parser().parse_args(argv))


def run_from_args(args: argparse.Namespace) -> int:
    """Run the experiment `add_arguments`' options describe; print the table and where files went."""
    cfg = load_config(args.config) if args.config is not None else ExperimentConfig()
    results = run_experiment(args.out, progress=None if args.quiet else print, **dataclasses.asdict(cfg))
    print(results.table)
    print(f"results: {results.results_path}\nplot: {results.plot_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
