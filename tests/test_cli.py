"""End-to-end tests of the `moe-engine` console script and `python -m moe_engine.train`.

Commands run in their own processes, as a user would run them. The processes are started
together by one module fixture, so their imports (torch, datasets, sklearn: seconds each)
overlap on CI's cores; each test then checks one command's outputs. Variants that would only
repeat that import cost (`moe-engine config` without arguments, `train --help`) run in process.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from moe_engine import cli
from moe_engine.config import Config, load_config

SCRIPT = Path(sys.executable).with_name("moe-engine")
TASKS = ["digit", "parity", "left", "right"]
TINY = [
    "model.d_model=16", "model.num_layers=2", "model.num_heads=2", "model.ffn_hidden=16",
    "model.moe_every=1",  # both blocks are MoE: results hold two layers of expert counts
    "moe.num_experts=4", "moe.ffn_hidden=16",
    "data.batch_size=16", "data.eval_batch_size=128", "data.pairs_per_task=200", "data.eval_fraction=0.2",
    "optim.warmup_steps=5", "train.num_threads=1", "logging.progress_bar=false", "logging.tensorboard=false",
]
TRAIN_RUN = [
    *TINY, "train.max_steps=30", "train.eval_every=10", "train.checkpoint_every=10",
    "logging.log_every=5", "logging.tensorboard=true",
]
MODULE_RUN = [*TINY, "train.max_steps=4", "train.eval_every=2", "train.checkpoint_every=2", "logging.progress_bar=true"]
CONFIG_OVERRIDES = ["moe.num_experts=16", "optim.lr=1e-3", "data.tasks=[digit, left]", "optim.grad_clip=null"]
NUM_MOE_LAYERS, NUM_EXPERTS, TOP_K = 2, 4, 2
# 4 tasks x 200 test examples (the per-task minimum) x 25 tokens (task token + 4x6 patches).
TEST_TOKENS = 4 * 200 * 25


def set_args(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def runs(root: Path) -> dict[str, Finished]:
    """The subprocess commands of this module, started at once and waited for; keyed by a short name."""
    assert SCRIPT.is_file(), f"console script {SCRIPT} not installed"
    commands = {
        "train": [str(SCRIPT), "train", *set_args([*TRAIN_RUN, f"train.out_dir={root / 'train'}"])],
        "module": [sys.executable, "-m", "moe_engine.train", *set_args([*MODULE_RUN, f"train.out_dir={root / 'module'}"])],
        "config": [str(SCRIPT), "config", *set_args(CONFIG_OVERRIDES)],
        "help": [str(SCRIPT), "--help"],
    }
    procs = {}
    try:
        for name, argv in commands.items():
            with (root / f"{name}.out").open("w") as out, (root / f"{name}.err").open("w") as err:
                procs[name] = subprocess.Popen(argv, cwd=root, stdout=out, stderr=err)
        results = {}
        for name, proc in procs.items():
            returncode = proc.wait(timeout=300)
            results[name] = Finished(returncode, (root / f"{name}.out").read_text(), (root / f"{name}.err").read_text())
        return results
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------- moe-engine train


def test_train_exits_0(runs: dict[str, Finished]) -> None:
    run = runs["train"]
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr


def test_train_writes_results_json(runs: dict[str, Finished], root: Path) -> None:
    results = json.loads((root / "train" / "results.json").read_text())
    assert results["step"] == 30
    assert results["wall_seconds"] > 0
    assert set(results["eval"]) == {f"{metric}_{t}" for t in TASKS for metric in ("accuracy", "loss")}
    assert all(0.0 <= results["eval"][f"accuracy_{t}"] <= 1.0 for t in TASKS)
    assert set(results["chance"]) == set(TASKS)
    assert all(0.0 < results["chance"][t] < 1.0 for t in TASKS)
    counts = results["tokens_per_expert"]
    assert len(counts) == NUM_MOE_LAYERS and all(len(row) == NUM_EXPERTS for row in counts)
    assert all(isinstance(c, int) and c >= 0 for row in counts for c in row)
    # Dropless top-2 routing: every test token lands on exactly two experts in every MoE layer.
    assert [sum(row) for row in counts] == [TEST_TOKENS * TOP_K] * NUM_MOE_LAYERS
    assert Path(results["checkpoint"]) == root / "train" / "checkpoints" / "step_00000030.pt"


def test_train_prints_the_report(runs: dict[str, Finished], root: Path) -> None:
    out = runs["train"].stdout
    results = json.loads((root / "train" / "results.json").read_text())
    lines = out.splitlines()
    assert any(line.startswith("trained 30 steps") for line in lines)
    header = next(line for line in lines if line.startswith("task"))
    assert header.split()[:4] == ["task", "metric", "result", "chance"]
    for task in TASKS:
        row = next(line for line in lines if line.split()[:1] == [task]).split()
        assert row[1] == "accuracy"
        assert row[2] == f"{results['eval'][f'accuracy_{task}']:.3f}"
        assert row[3] == f"{results['chance'][task]:.3f}"
    assert "tokens per expert" in out
    for layer, counts in enumerate(results["tokens_per_expert"]):
        line = next(line for line in lines if line.startswith(f"moe layer {layer}:"))
        assert [int(c) for c in line.split(":")[1].split()[:NUM_EXPERTS]] == counts
    assert str(root / "train") in out


def test_train_writes_logs_config_and_checkpoints(runs: dict[str, Finished], root: Path) -> None:
    out_dir = root / "train"
    train_rows, eval_rows = read_rows(out_dir / "train.csv"), read_rows(out_dir / "eval.csv")
    assert [int(r["step"]) for r in train_rows] == [5, 10, 15, 20, 25, 30]
    assert [int(r["step"]) for r in eval_rows] == [10, 20, 30]
    assert {f"accuracy_{t}" for t in TASKS} <= set(eval_rows[0])
    assert load_config(out_dir / "config.yaml") == load_config(None, [*TRAIN_RUN, f"train.out_dir={out_dir}"])
    assert sorted(p.name for p in (out_dir / "checkpoints").iterdir()) == ["step_00000020.pt", "step_00000030.pt"]
    assert list((out_dir / "tensorboard").glob("events.out.tfevents.*"))


# --------------------------------------------------------------------- python -m moe_engine.train


def test_python_m_train(runs: dict[str, Finished], root: Path) -> None:
    run = runs["module"]
    assert run.returncode == 0, run.stderr
    assert "trained 4 steps" in run.stdout
    results = json.loads((root / "module" / "results.json").read_text())
    assert results["step"] == 4
    assert (root / "module" / "checkpoints" / "step_00000004.pt").is_file()


# --------------------------------------------------------------------- moe-engine config and --help


def test_config_round_trips(runs: dict[str, Finished], root: Path) -> None:
    run = runs["config"]
    assert run.returncode == 0, run.stderr
    printed = root / "config.yaml"
    printed.write_text(run.stdout)
    cfg = load_config(printed)
    assert cfg == load_config(None, CONFIG_OVERRIDES)
    assert cfg.moe.num_experts == 16 and cfg.optim.grad_clip is None


def test_config_without_arguments_prints_the_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # In process: a second console-script start would only repeat the import cost measured above.
    assert cli.main(["config"]) == 0
    printed = tmp_path / "config.yaml"
    printed.write_text(capsys.readouterr().out)
    assert load_config(printed) == Config()


def test_help(runs: dict[str, Finished]) -> None:
    run = runs["help"]
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("usage: moe-engine")
    assert "train" in run.stdout and "config" in run.stdout


def test_train_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: moe-engine train")
    for option in ("--config", "--set", "--resume", "--overwrite"):
        assert option in out


def test_baselines_reports_a_setup_error_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["baselines", "--set", f"data.path={tmp_path / 'nowhere'}", "--set", f"train.out_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "moe-engine baselines: error: no " in err and "tasks.json" in err
    assert "Traceback" not in err


def test_a_kernel_choice_that_cannot_run_is_refused_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import moe_engine.kernels.backend as backend

    sets = ["--set", f"train.out_dir={tmp_path / 'run'}"]
    monkeypatch.setenv("MOE_ENGINE_KERNELS", "cuda")
    assert cli.main(["train", *sets]) == 2
    assert "MOE_ENGINE_KERNELS='cuda': allowed: torch, triton" in capsys.readouterr().err
    # Triton asked for on a CPU without the interpreter (the tests run it under the interpreter).
    monkeypatch.setenv("MOE_ENGINE_KERNELS", "triton")
    monkeypatch.setattr(backend, "interpreting", lambda: False)
    assert cli.main(["train", *sets]) == 2
    err = capsys.readouterr().err
    assert "MOE_ENGINE_KERNELS=triton on cpu" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing written
