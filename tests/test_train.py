"""Tests of moe_engine.train: exact resume, checkpoint checks, the run-directory guard, NaN and
signal handling, metrics files and the learning-rate schedule.

Every run uses a tiny model (d_model 16, two blocks, four experts) on 200 examples per task,
so a Trainer builds in well under a second and trains a few dozen steps per second on one
CPU thread.
"""

from __future__ import annotations

import dataclasses

import csv
import math
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

import moe_engine.train

import moe_engine.train as train_module
from moe_engine import cli
from moe_engine.checkpoint import CheckpointMismatchError, load_checkpoint
from moe_engine.config import Config, ConfigError, load_config
from moe_engine.metrics import MetricsLogger
from moe_engine.parallel.runtime import DistributedRun
from moe_engine.train import (
    NonFiniteLossError,
    RunDirectoryError,
    Trainer,
    TrainingInterrupted,
    lr_lambda,
)

TINY = [
    "model.d_model=16", "model.num_layers=2", "model.num_heads=2", "model.ffn_hidden=16", "model.dropout=0.0",
    "moe.num_experts=4", "moe.ffn_hidden=16",
    "data.batch_size=16", "data.eval_batch_size=128", "data.pairs_per_task=200", "data.eval_fraction=0.2",
    "optim.warmup_steps=3",
    "train.max_steps=8", "train.eval_every=4", "train.checkpoint_every=4", "train.num_threads=1",
    "logging.log_every=1", "logging.progress_bar=false", "logging.tensorboard=false",
]
# Wall-clock columns: the only ones that differ between two runs of the same config.
TIMING_COLUMNS = ("samples_per_s", "tokens_per_s")
SIGNALS = [signal.SIGINT, signal.SIGTERM]

MakeConfig = Callable[..., Config]


@pytest.fixture
def make_cfg(tmp_path: Path) -> MakeConfig:
    """make_cfg(name, *overrides): the tiny config with train.out_dir = tmp_path / name."""

    def make(name: str, *overrides: str) -> Config:
        return load_config(None, [*TINY, f"train.out_dir={tmp_path / name}", *overrides])

    return make


@pytest.fixture(autouse=True)
def restore_torch_threads() -> Iterator[None]:
    # train.num_threads=1 calls torch.set_num_threads for the whole process; give other tests theirs back.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def recording_handlers() -> Iterator[list[int]]:
    """Installs SIGINT/SIGTERM handlers that only record, so a signal the trainer fails to catch
    fails the test instead of killing pytest; restores the original handlers afterwards."""
    received: list[int] = []
    originals = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        for s, handler in originals.items():
            signal.signal(s, handler)


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def steps_of(path: Path) -> list[int]:
    return [int(row["step"]) for row in read_rows(path)]


def without_timing(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in rows]


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def checkpoint_names(trainer: Trainer) -> list[str]:
    return [p.name for p in trainer.checkpoints.list()]


def current_handlers() -> dict[int, object]:
    return {s: signal.getsignal(s) for s in SIGNALS}


# --------------------------------------------------------------------- resume


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["moe.router.capacity_factor=1.0"],  # tokens dropped by capacity: routing must resume identically
        ["model.dropout=0.1"],               # draws from torch's RNG every step: its state must be restored
        # AdaMV-MoE's controllers and the routing telemetry live in the checkpoint too.
        ["moe.router.type=task_gate", "moe.router.top_k=3", "moe.router.task.adaptive_k=true"],
    ],
    ids=["dropless", "capacity", "dropout", "adaptive_k"],
)
def test_resume_is_bit_exact(make_cfg: MakeConfig, extra: list[str]) -> None:
    schedule = ["train.max_steps=12", "train.checkpoint_every=4", "train.eval_every=6", *extra]
    uninterrupted = Trainer(make_cfg("a", *schedule))
    uninterrupted.run()

    cfg_b = make_cfg("b", *schedule)
    first = Trainer(cfg_b)
    first.run(until_step=5)
    assert first.step == 5
    # Step 5 is not a checkpoint step; a preempted job saves there through the signal path.
    saved = first.save_checkpoint()
    assert saved.name == "step_00000005.pt"
    del first

    resumed = Trainer(cfg_b, resume="auto")
    assert resumed.step == 5 and resumed.last_checkpoint == saved
    resumed.run()

    out_a, out_b = Path(cfg_b.train.out_dir).with_name("a"), Path(cfg_b.train.out_dir)
    rows_a, rows_b = read_rows(out_a / "train.csv"), read_rows(out_b / "train.csv")
    assert [int(r["step"]) for r in rows_b] == list(range(1, 13))
    for row_a, row_b in zip(without_timing(rows_a), without_timing(rows_b), strict=True):
        assert row_a == row_b, f"step {row_a['step']}"
    assert read_rows(out_a / "eval.csv") == read_rows(out_b / "eval.csv")
    # Accumulated since step 1: the resumed run's statistics continue those of the checkpoint.
    assert read_rows(out_a / "routing.csv") == read_rows(out_b / "routing.csv")
    assert steps_of(out_b / "eval.csv") == [6, 12]  # step 6 is evaluated by the resumed run
    assert_same_state(uninterrupted.model.state_dict(), resumed.model.state_dict())


def test_resume_from_a_checkpoint_file_into_a_new_directory(make_cfg: MakeConfig) -> None:
    source = Trainer(make_cfg("source"))
    source.run()
    step_4 = source.checkpoints.path_for(4)
    assert step_4.is_file()

    branch = Trainer(make_cfg("branch"), resume=str(step_4))
    assert branch.step == 4
    branch.run()
    assert branch.step == 8
    assert_same_state(source.model.state_dict(), branch.model.state_dict())


# --------------------------------------------------------------------- checkpoint mismatch


@pytest.fixture
def saved_run(make_cfg: MakeConfig) -> Config:
    """A finished 2-step run (num_experts 4, d_model 16) with a checkpoint at step 2."""
    cfg = make_cfg("saved", "train.max_steps=2", "train.checkpoint_every=2")
    Trainer(cfg).run()
    return cfg


def test_resume_with_other_num_experts_is_refused(make_cfg: MakeConfig, saved_run: Config) -> None:
    out_dir = Path(saved_run.train.out_dir)
    before = {name: (out_dir / name).read_text() for name in ("config.yaml", "train.csv", "eval.csv")}
    with pytest.raises(CheckpointMismatchError) as info:
        Trainer(make_cfg("saved", "train.max_steps=2", "moe.num_experts=8"), resume="auto")
    message = str(info.value)
    assert "moe.num_experts: checkpoint has 4, config has 8" in message
    assert "step_00000002.pt" in message
    assert "model.d_model" not in message  # only the fields that differ
    # Refused before anything in the run directory changed.
    assert {name: (out_dir / name).read_text() for name in before} == before


def test_resume_with_other_d_model_is_refused(make_cfg: MakeConfig, saved_run: Config) -> None:
    checkpoint = Path(saved_run.train.out_dir) / "checkpoints" / "step_00000002.pt"
    cfg = make_cfg("other", "model.d_model=32")
    with pytest.raises(CheckpointMismatchError, match=r"model\.d_model: checkpoint has 16, config has 32"):
        Trainer(cfg, resume=str(checkpoint))
    assert not (Path(cfg.train.out_dir) / "config.yaml").exists()


def test_resume_with_other_weighting_is_refused(make_cfg: MakeConfig, saved_run: Config) -> None:
    with pytest.raises(CheckpointMismatchError, match=r"mtl\.weighting: checkpoint has 'equal', config has 'dwa'"):
        Trainer(make_cfg("saved", "train.max_steps=4", "mtl.weighting=dwa"), resume="auto")


def test_resume_with_weighting_options_that_change_its_state_is_refused(make_cfg: MakeConfig) -> None:
    Trainer(make_cfg("imtl", "train.max_steps=2", "train.checkpoint_every=2", "mtl.weighting=imtl")).run()
    # The message names the checkpoint's own options (here imtl's defaults: none set).
    with pytest.raises(CheckpointMismatchError, match=r"mtl\.weighting_options = \{'mode': 'gradient'\}.*own options \(\{\}\)"):
        Trainer(make_cfg("imtl", "train.max_steps=4", "mtl.weighting=imtl", "mtl.weighting_options.mode=gradient"), resume="auto")


def test_checkpoint_from_before_loss_weighting_reads_as_equal() -> None:
    from moe_engine.checkpoint import config_mismatches

    current = load_config(None, []).to_dict()
    older = {k: v for k, v in current.items() if k != "mtl"}
    assert config_mismatches(older, current) == []


def test_cli_mismatch_exits_2(saved_run: Config, capsys: pytest.CaptureFixture[str]) -> None:
    sets = [a for o in [*TINY, f"train.out_dir={saved_run.train.out_dir}", "moe.num_experts=8"] for a in ("--set", o)]
    assert cli.main(["train", *sets, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "moe.num_experts: checkpoint has 4, config has 8" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------- run directory guard


def test_second_fresh_run_into_a_used_directory_is_refused(saved_run: Config, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = saved_run.train.out_dir
    with pytest.raises(RunDirectoryError) as info:
        Trainer(saved_run)
    message = str(info.value)
    assert repr(out_dir) in message and "step_00000002.pt" in message
    assert "--resume" in message and "--overwrite" in message

    sets = [a for o in [*TINY, f"train.out_dir={out_dir}"] for a in ("--set", o)]
    assert cli.main(["train", *sets]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err


def test_overwrite_starts_over(make_cfg: MakeConfig) -> None:
    first = Trainer(make_cfg("run", "train.max_steps=4", "train.checkpoint_every=2"))
    first.run()
    assert checkpoint_names(first) == ["step_00000002.pt", "step_00000004.pt"]
    first_rows = without_timing(read_rows(first.out_dir / "train.csv"))

    again = Trainer(make_cfg("run", "train.max_steps=2", "train.checkpoint_every=2"), overwrite=True)
    assert again.step == 0
    assert checkpoint_names(again) == []                # the old run's checkpoints are gone
    assert not (again.out_dir / "train.csv").exists()   # and so are its logs
    again.run()
    assert checkpoint_names(again) == ["step_00000002.pt"]
    # The same seed gives the same first two steps as the run it replaced.
    assert without_timing(read_rows(again.out_dir / "train.csv")) == first_rows[:2]


@pytest.mark.parametrize("mistake", [
    ["--set", "model.patch_size=5"],                     # refused while the workload builds
    ["--set", "finetune.init_from=/nonexistent"],        # refused while the weights load
    ["--baselines", "nonexistent.json"],                 # refused before the Trainer
])
def test_overwrite_with_a_mistake_keeps_the_old_run(
    make_cfg: MakeConfig, mistake: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # --overwrite must delete nothing until the new settings have passed every check.
    first = Trainer(make_cfg("run", "train.max_steps=2", "train.checkpoint_every=2"))
    first.run()
    sets = [a for o in [*TINY, f"train.out_dir={first.out_dir}"] for a in ("--set", o)]
    assert cli.main(["train", *sets, *mistake, "--overwrite"]) == 2
    assert "error: " in capsys.readouterr().err
    assert checkpoint_names(first) == ["step_00000002.pt"]
    assert steps_of(first.out_dir / "train.csv") == [1, 2]


def test_nccl_without_cuda_is_one_line(
    make_cfg: MakeConfig, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # train.device = 'auto' on a machine without CUDA: only the Trainer knows the run is on the CPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out_dir = make_cfg("run").train.out_dir
    sets = [a for o in [*TINY, f"train.out_dir={out_dir}", "parallel.dispatcher=all_to_all", "parallel.backend=nccl"]
            for a in ("--set", o)]
    assert cli.main(["train", *sets]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-engine train: error: parallel.backend = 'nccl': NCCL needs CUDA") and err.count("\n") == 1


def test_resume_auto_without_checkpoints_starts_fresh(make_cfg: MakeConfig) -> None:
    trainer = Trainer(make_cfg("run", "train.max_steps=2"), resume="auto")
    assert trainer.step == 0 and trainer.last_checkpoint is None
    assert trainer.run().step == 2


@pytest.mark.parametrize("resume", ["auto", None])
def test_fresh_start_discards_logs_of_a_run_killed_before_its_first_checkpoint(
    make_cfg: MakeConfig, resume: str | None
) -> None:
    cfg = make_cfg("run", "train.max_steps=6", "train.checkpoint_every=100", "train.eval_every=100")
    killed = Trainer(cfg)
    killed.run(until_step=3)  # then killed hard: logs for steps 1..3, no checkpoint
    assert checkpoint_names(killed) == [] and steps_of(killed.out_dir / "train.csv") == [1, 2, 3]

    restarted = Trainer(cfg, resume=resume)
    assert restarted.step == 0
    restarted.run()
    # The restart trains steps 1..6 again; its log must read as that one run, not 1,2,3,1,2,...
    assert steps_of(restarted.out_dir / "train.csv") == [1, 2, 3, 4, 5, 6]


def test_resume_from_a_missing_path(make_cfg: MakeConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no_such_run"
    with pytest.raises(FileNotFoundError, match="no_such_run"):
        Trainer(make_cfg("run"), resume=str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Trainer(make_cfg("run"), resume=str(empty))

    sets = [a for o in [*TINY, f"train.out_dir={tmp_path / 'run'}"] for a in ("--set", o)]
    assert cli.main(["train", *sets, "--resume", str(missing)]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    # A file that is not a checkpoint at all (not a torch file, or truncated): refused by name, exit 2.
    garbage = tmp_path / "step_00000001.pt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(CheckpointMismatchError, match=r"step_00000001.pt: not a moe_engine checkpoint \(torch.load"):
        Trainer(make_cfg("run2"), resume=str(garbage))
    assert cli.main(["train", *sets, "--resume", str(garbage)]) == 2
    assert "not a moe_engine checkpoint" in capsys.readouterr().err


# --------------------------------------------------------------------- non-finite loss


def nan_loss_at(step: int, trainer_ref: Callable[[], Trainer] | None = None) -> Callable:
    """A combine_task_losses whose loss is NaN at step `step` (1-based); counts calls when no trainer is given."""
    real = train_module.combine_task_losses
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        result = real(*args, **kwargs)
        calls["n"] += 1
        current = trainer_ref().step + 1 if trainer_ref is not None else calls["n"]
        return dataclasses.replace(result, loss=result.loss * float("nan")) if current == step else result

    return poisoned


def test_nan_loss_stops_before_the_update_and_keeps_the_last_good_checkpoint(
    make_cfg: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_cfg("run", "train.checkpoint_every=2")
    trainer = Trainer(cfg)
    monkeypatch.setattr(train_module, "combine_task_losses", nan_loss_at(3, lambda: trainer))
    handlers = current_handlers()

    with pytest.raises(NonFiniteLossError) as info:
        trainer.run()

    step_2 = trainer.checkpoints.path_for(2)
    message = str(info.value)
    assert "loss is nan at step 3" in message and str(step_2) in message
    assert checkpoint_names(trainer) == ["step_00000002.pt"]  # nothing newer was written
    state = load_checkpoint(step_2, cfg.to_dict())
    assert state["step"] == 2
    # "Stopped before the update": the model is still exactly the step-2 checkpoint's.
    assert_same_state(state["model"], trainer.model.state_dict())
    assert steps_of(trainer.out_dir / "train.csv") == [1, 2]
    assert current_handlers() == handlers


def test_non_finite_gradient_norm_stops_the_run(make_cfg: MakeConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = Trainer(make_cfg("run", "train.checkpoint_every=2"))
    real_clip = moe_engine.train.clip_gradients

    def clip(model, groups, max_norm):
        norm = real_clip(model, groups, max_norm)
        return norm * float("inf") if trainer.step == 2 else norm

    monkeypatch.setattr(moe_engine.train, "clip_gradients", clip)
    with pytest.raises(NonFiniteLossError, match="gradient norm is inf at step 3") as info:
        trainer.run()
    assert str(trainer.checkpoints.path_for(2)) in str(info.value)
    assert checkpoint_names(trainer) == ["step_00000002.pt"]
    assert_same_state(load_checkpoint(trainer.checkpoints.path_for(2), trainer.cfg.to_dict())["model"], trainer.model.state_dict())


def test_nan_before_any_checkpoint_says_so(make_cfg: MakeConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = Trainer(make_cfg("run"))
    monkeypatch.setattr(train_module, "combine_task_losses", nan_loss_at(1, lambda: trainer))
    with pytest.raises(NonFiniteLossError, match="at step 1; .*none saved yet"):
        trainer.run()


def test_cli_nan_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(train_module, "combine_task_losses", nan_loss_at(3))
    sets = [a for o in [*TINY, f"train.out_dir={tmp_path / 'run'}", "train.checkpoint_every=2"] for a in ("--set", o)]
    assert cli.main(["train", *sets]) == 1
    err = capsys.readouterr().err
    assert "at step 3" in err and "step_00000002.pt" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "results.json").exists()


# --------------------------------------------------------------------- signals, in process


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: s.name)
def test_signal_saves_a_checkpoint_and_resume_continues_exactly(
    make_cfg: MakeConfig, monkeypatch: pytest.MonkeyPatch, recording_handlers: list[int], signum: signal.Signals
) -> None:
    reference = Trainer(make_cfg("reference", "train.checkpoint_every=100"))
    reference.run()

    cfg = make_cfg("run", "train.checkpoint_every=100")
    trainer = Trainer(cfg)
    handlers = current_handlers()
    real_step = Trainer.train_step

    def step_then_signal(self: Trainer, batch):
        metrics = real_step(self, batch)
        if self.step == 3:
            # raise_signal runs the Python-level handler before returning: deterministic, unlike
            # os.kill, whose process-directed signal may land on another thread a moment later.
            signal.raise_signal(signum)
        return metrics

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", step_then_signal)
        with pytest.raises(TrainingInterrupted) as info:
            trainer.run()

    interrupted = info.value
    assert (interrupted.signum, interrupted.step) == (signum, 3)
    assert interrupted.checkpoint == trainer.checkpoints.path_for(3) and interrupted.checkpoint.is_file()
    assert signum.name in str(interrupted) and str(interrupted.checkpoint) in str(interrupted)
    assert checkpoint_names(trainer) == ["step_00000003.pt"]
    assert recording_handlers == []          # the trainer's handler took the signal, not ours
    assert current_handlers() == handlers    # and ours are back in place

    resumed = Trainer(cfg, resume="auto")
    assert resumed.step == 3
    resumed.run()
    assert resumed.step == 8
    assert without_timing(read_rows(resumed.out_dir / "train.csv")) == without_timing(
        read_rows(reference.out_dir / "train.csv")
    )
    assert_same_state(reference.model.state_dict(), resumed.model.state_dict())


def test_second_signal_stops_at_once_without_a_checkpoint(
    make_cfg: MakeConfig, monkeypatch: pytest.MonkeyPatch, recording_handlers: list[int]
) -> None:
    trainer = Trainer(make_cfg("run", "train.checkpoint_every=100"))
    handlers = current_handlers()
    real_step = Trainer.train_step

    def step_then_signal_twice(self: Trainer, batch):
        metrics = real_step(self, batch)
        if self.step == 2:
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGINT)
        return metrics

    monkeypatch.setattr(Trainer, "train_step", step_then_signal_twice)
    with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
        trainer.run()
    assert checkpoint_names(trainer) == []
    assert recording_handlers == [] and current_handlers() == handlers


def test_handlers_are_restored_after_a_normal_run(make_cfg: MakeConfig, recording_handlers: list[int]) -> None:
    handlers = current_handlers()
    Trainer(make_cfg("run", "train.max_steps=2")).run()
    assert current_handlers() == handlers


# --------------------------------------------------------------------- signals, real process


@dataclass(frozen=True)
class InterruptedProcess:
    returncode: int
    stderr: str
    out_dir: Path


def _data_rows(path: Path) -> int:
    try:
        return max(0, len(path.read_text().splitlines()) - 1)
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def interrupted_processes(tmp_path_factory: pytest.TempPathFactory) -> dict[int, InterruptedProcess]:
    """`moe-engine train` runs (endless, no periodic checkpoints) sent SIGINT and SIGTERM once
    their train.csv holds a few rows. Both start together so their imports overlap on CI's cores."""
    script = Path(sys.executable).with_name("moe-engine")
    assert script.is_file(), f"console script {script} not installed"
    root = tmp_path_factory.mktemp("signals")
    endless = ["train.max_steps=100000", "train.checkpoint_every=1000000", "train.eval_every=1000000"]
    procs: dict[int, tuple[subprocess.Popen, Path, Path]] = {}
    try:
        for signum in SIGNALS:
            out_dir, stderr_path = root / signum.name, root / f"{signum.name}.stderr"
            sets = [a for o in [*TINY, *endless, f"train.out_dir={out_dir}"] for a in ("--set", o)]
            with stderr_path.open("w") as stderr:
                proc = subprocess.Popen([str(script), "train", *sets], cwd=root, stdout=subprocess.DEVNULL, stderr=stderr)
            procs[signum] = (proc, out_dir, stderr_path)

        pending = set(procs)
        deadline = time.monotonic() + 90
        while pending and time.monotonic() < deadline:
            for signum in list(pending):
                proc, out_dir, stderr_path = procs[signum]
                assert proc.poll() is None, f"exited early ({proc.returncode}): {stderr_path.read_text()}"
                if _data_rows(out_dir / "train.csv") >= 3:
                    proc.send_signal(signum)
                    pending.discard(signum)
            time.sleep(0.1)
        assert not pending, f"no training rows within 90 s for {[s.name for s in pending]}"

        results = {}
        for signum, (proc, out_dir, stderr_path) in procs.items():
            returncode = proc.wait(timeout=60)
            results[signum] = InterruptedProcess(returncode, stderr_path.read_text(), out_dir)
        return results
    finally:
        for proc, _, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_to_the_cli_saves_and_exits_128_plus_signum(
    interrupted_processes: dict[int, InterruptedProcess], signum: signal.Signals, code: int
) -> None:
    run = interrupted_processes[signum]
    assert run.returncode == code, run.stderr
    assert f"{signum.name} received" in run.stderr
    assert "Traceback" not in run.stderr
    checkpoints = sorted((run.out_dir / "checkpoints").glob("step_*.pt"))
    assert len(checkpoints) == 1
    assert str(checkpoints[0]) in run.stderr
    step = int(checkpoints[0].stem.removeprefix("step_"))
    assert f"stopped after step {step}," in run.stderr
    assert step >= 3
    # The step in flight finished and was logged before the save.
    assert steps_of(run.out_dir / "train.csv")[-1] == step
    cfg = load_config(run.out_dir / "config.yaml")
    assert load_checkpoint(checkpoints[0], cfg.to_dict())["step"] == step


# --------------------------------------------------------------------- metrics files


def test_csv_columns_and_logged_steps(make_cfg: MakeConfig) -> None:
    trainer = Trainer(make_cfg(
        "run", "data.tasks=[parity, left]", "logging.log_every=3", "train.eval_every=4", "optim.lr=1e-2",
    ))
    trainer.run()
    train_rows, eval_rows = read_rows(trainer.out_dir / "train.csv"), read_rows(trainer.out_dir / "eval.csv")
    assert list(train_rows[0]) == [
        "step", "loss", "task_loss", "aux_loss", "grad_norm", "lr",
        "loss_parity", "loss_left", "expert_imbalance", "rank_imbalance", "samples_per_s", "tokens_per_s",
    ]
    assert list(eval_rows[0]) == ["step", "accuracy_parity", "loss_parity", "accuracy_left", "loss_left"]
    assert [int(r["step"]) for r in train_rows] == [3, 6, 8]  # every log_every-th step, and the last
    assert [int(r["step"]) for r in eval_rows] == [4, 8]
    factor = lr_lambda(trainer.cfg)
    for row in train_rows:
        assert float(row["lr"]) == pytest.approx(1e-2 * factor(int(row["step"]) - 1))  # the lr this step used
        assert float(row["loss"]) == pytest.approx(float(row["task_loss"]) + float(row["aux_loss"]), rel=1e-5)
        assert all(math.isfinite(float(v)) and float(v) >= 0 for v in row.values())
        # max/mean over 4 experts lies in [1, 4]; a single process is one rank, perfectly balanced.
        assert 1.0 <= float(row["expert_imbalance"]) <= 4.0 and float(row["rank_imbalance"]) == 1.0
    for row in eval_rows:
        assert all(0.0 <= float(row[f"accuracy_{t}"]) <= 1.0 for t in ("parity", "left"))


def test_run_until_a_step_past_max_steps_stops_at_max_steps(make_cfg: MakeConfig) -> None:
    """`until_step` only stops a run early: train.max_steps stays the end of the schedule and of the run."""
    trainer = Trainer(make_cfg("run", "train.max_steps=2"))
    result = trainer.run(until_step=5)
    assert result.step == trainer.step == 2
    assert steps_of(trainer.out_dir / "train.csv") == [1, 2]


def test_run_stopped_between_evaluations_reports_the_model_it_stopped_with(make_cfg: MakeConfig) -> None:
    """run(until_step=3) with evaluations every 2 steps: the result is a fresh evaluation at step 3,
    not the one of step 2 (the model has trained a step since)."""
    trainer = Trainer(make_cfg("run", "train.max_steps=4", "train.eval_every=2", "optim.lr=1e-2"))
    result = trainer.run(until_step=3)
    assert result.step == 3 and steps_of(trainer.out_dir / "eval.csv") == [2]
    metrics, counts_LXE = trainer.evaluate()
    assert result.eval_metrics == metrics
    assert torch.equal(result.tokens_per_task_expert_LXE, counts_LXE)


def test_a_task_absent_from_a_step_logs_a_blank_loss(make_cfg: MakeConfig) -> None:
    """Batches of 2 examples over 4 tasks: every step misses at least two tasks, whose loss columns
    stay blank (no loss measured), not 0.0 (a perfect loss)."""
    trainer = Trainer(make_cfg("run", "data.batch_size=2", "train.max_steps=3", "train.eval_every=100"))
    trainer.run()
    rows = read_rows(trainer.out_dir / "train.csv")
    assert len(rows) == 3
    for row in rows:
        losses = [row[f"loss_{task}"] for task in trainer.task_names]
        assert 1 <= sum(v != "" for v in losses) <= 2
        assert all(float(v) > 0 for v in losses if v != "")


def test_expert_counts_skip_dropped_choices() -> None:
    """The logged expert load counts kept choices only: a choice dropped by capacity (-1) is no
    token of expert 0 (nor an index error)."""
    routing = SimpleNamespace(experts_TK=torch.tensor([[0, -1], [2, -1], [-1, -1], [2, 3]]), num_experts=5)
    assert train_module._expert_counts(routing).tolist() == [1.0, 0.0, 2.0, 1.0, 0.0]


def _scalars(event_dir: Path) -> dict[str, list[int]]:
    """Tag -> steps of every scalar TensorBoard reads from `event_dir` (orphans after a purge dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(event_dir))
    events.Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_events_are_written(make_cfg: MakeConfig) -> None:
    trainer = Trainer(make_cfg("run", "logging.tensorboard=true", "train.max_steps=4", "train.eval_every=2"))
    trainer.run()
    assert list((trainer.out_dir / "tensorboard").glob("events.out.tfevents.*"))
    scalars = _scalars(trainer.out_dir / "tensorboard")
    assert scalars["train/loss"] == [1, 2, 3, 4]
    assert scalars["train/lr"] == [1, 2, 3, 4]
    for task in trainer.cfg.data.tasks:
        assert scalars[f"eval/accuracy_{task}"] == [2, 4]


def test_no_tensorboard_when_disabled(make_cfg: MakeConfig) -> None:
    trainer = Trainer(make_cfg("run", "train.max_steps=2"))
    trainer.run()
    assert not (trainer.out_dir / "tensorboard").exists()


def test_metrics_logger_blanks_missing_values_and_refuses_new_columns(tmp_path: Path) -> None:
    """A CSV's columns are fixed by its first row: a later row may leave a column blank (None or
    absent), but a metric that is not a column raises instead of being silently dropped."""
    logger = MetricsLogger(tmp_path, csv_files=True, tensorboard=False, resume_step=None)
    logger.log("train", 1, {"loss": 0.5, "loss_digit": 0.25})
    logger.log("train", 2, {"loss": 0.75, "loss_digit": None})
    logger.log("train", 3, {"loss": 1.0})
    with pytest.raises(ValueError, match=r"\['grad_norm'\] are not columns"):
        logger.log("train", 4, {"loss": 1.0, "grad_norm": 2.0})
    logger.close()
    assert read_rows(tmp_path / "train.csv") == [
        {"step": "1", "loss": "0.5", "loss_digit": "0.25"},
        {"step": "2", "loss": "0.75", "loss_digit": ""},
        {"step": "3", "loss": "1.0", "loss_digit": ""},
    ]


def test_metrics_logger_keeps_nan_and_none_out_of_tensorboard(tmp_path: Path) -> None:
    """NaN and None (a task absent from a step, a statistic without data) are no TensorBoard
    points: a NaN point would break the chart's scale; the CSV keeps the NaN as written."""
    logger = MetricsLogger(tmp_path, csv_files=True, tensorboard=True, resume_step=None)
    logger.log("train", 1, {"loss": 0.5, "loss_digit": math.nan, "loss_left": None})
    logger.log("train", 2, {"loss": 0.25, "loss_digit": 1.5, "loss_left": 2.0})
    logger.close()
    scalars = _scalars(tmp_path / "tensorboard")
    assert scalars["train/loss"] == [1, 2]
    assert scalars["train/loss_digit"] == [2] and scalars["train/loss_left"] == [2]
    assert [r["loss_digit"] for r in read_rows(tmp_path / "train.csv")] == ["nan", "1.5"]


def test_resume_drops_rows_written_past_the_last_checkpoint(make_cfg: MakeConfig) -> None:
    schedule = ["train.eval_every=2", "train.checkpoint_every=4", "logging.tensorboard=true"]
    reference = Trainer(make_cfg("reference", *schedule))
    reference.run()

    cfg = make_cfg("run", *schedule)
    killed = Trainer(cfg)
    killed.run(until_step=6)  # then killed hard: logs up to step 6, newest checkpoint at 4
    assert checkpoint_names(killed) == ["step_00000004.pt"]
    assert steps_of(killed.out_dir / "train.csv") == [1, 2, 3, 4, 5, 6]
    assert steps_of(killed.out_dir / "eval.csv") == [2, 4, 6]

    resumed = Trainer(cfg, resume="auto")
    assert resumed.step == 4
    assert steps_of(resumed.out_dir / "train.csv") == [1, 2, 3, 4]
    assert steps_of(resumed.out_dir / "eval.csv") == [2, 4]
    resumed.run()

    for name in ("train.csv", "eval.csv"):
        assert without_timing(read_rows(resumed.out_dir / name)) == without_timing(read_rows(reference.out_dir / name))
    scalars = _scalars(resumed.out_dir / "tensorboard")
    assert scalars["train/loss"] == list(range(1, 9))
    assert scalars["eval/accuracy_digit"] == [2, 4, 6, 8]


# --------------------------------------------------------------------- learning-rate schedule


def schedule(kind: str, warmup: int = 4, max_steps: int = 20, min_ratio: float = 0.1) -> Callable[[int], float]:
    return lr_lambda(load_config(None, [
        f"optim.schedule={kind}", f"optim.warmup_steps={warmup}",
        f"train.max_steps={max_steps}", f"optim.min_lr_ratio={min_ratio}",
    ]))


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_warmup_is_linear_up_to_the_full_rate(kind: str) -> None:
    factor = schedule(kind)
    assert [factor(s) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_cosine_decays_to_min_lr_ratio_at_max_steps() -> None:
    factor = schedule("cosine")
    decay = [factor(s) for s in range(4, 21)]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert factor(12) == pytest.approx(0.1 + 0.9 * 0.5)           # half way: half the range
    assert factor(8) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert factor(20) == pytest.approx(0.1)
    assert factor(30) == pytest.approx(0.1)                        # stays there past max_steps


def test_linear_decays_in_equal_steps_to_min_lr_ratio() -> None:
    factor = schedule("linear")
    decay = [factor(s) for s in range(4, 21)]
    assert [a - b for a, b in zip(decay, decay[1:])] == pytest.approx([0.9 / 16] * 16)
    assert factor(20) == pytest.approx(0.1)


def test_constant_stays_at_the_full_rate() -> None:
    factor = schedule("constant")
    assert [factor(s) for s in range(4, 40)] == [1.0] * 36


def test_no_warmup_starts_at_the_full_rate() -> None:
    assert schedule("cosine", warmup=0)(0) == 1.0


def test_trainer_ends_at_min_lr(make_cfg: MakeConfig) -> None:
    trainer = Trainer(make_cfg("run", "train.max_steps=6", "optim.warmup_steps=2", "optim.lr=1e-2", "optim.min_lr_ratio=0.1"))
    trainer.run()
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(1e-3)
    logged = [float(r["lr"]) for r in read_rows(trainer.out_dir / "train.csv")]
    factor = lr_lambda(trainer.cfg)
    assert logged == pytest.approx([1e-2 * factor(s) for s in range(6)])
    assert logged[:3] == pytest.approx([5e-3, 1e-2, 1e-2])


# ---------------------------------------------------------------------------------- gradient accumulation


@pytest.mark.parametrize("weighting, accum", [("equal", 4), ("uncertainty", 2)])
def test_gradient_accumulation_follows_the_whole_batch(make_cfg: MakeConfig, weighting: str, accum: int) -> None:
    # The balance loss is a statistic of each micro-batch by design (as it is of each rank's): off here.
    # Uncertainty weighting's log-variance term does not scale with the data: counted once per step.
    base = ("moe.router.aux_loss_coef=0.0", f"mtl.weighting={weighting}", "train.max_steps=6")
    whole = Trainer(make_cfg("whole", *base))
    whole.run()
    split = Trainer(make_cfg("split", *base, f"train.grad_accum_steps={accum}"))
    split.run()
    columns = [c for c in read_rows(whole.out_dir / "train.csv")[0] if c not in TIMING_COLUMNS and c != "step"]
    for a, b in zip(read_rows(whole.out_dir / "train.csv"), read_rows(split.out_dir / "train.csv"), strict=True):
        for c in columns:
            assert (a[c] == b[c] == "") or float(b[c]) == pytest.approx(float(a[c]), rel=1e-5, abs=1e-7), c
    for name, tensor in split.model.state_dict().items():
        torch.testing.assert_close(tensor, whole.model.state_dict()[name], rtol=1e-5, atol=1e-6, msg=name)
    for name, tensor in split.weighting.state_dict().items():
        torch.testing.assert_close(tensor, whole.weighting.state_dict()[name], rtol=1e-5, atol=1e-6, msg=name)


def test_fixed_splits_need_even_slices_of_every_batch(make_cfg: MakeConfig) -> None:
    """Each rank sizes its fixed all-to-all splits from its own tokens: the trainer refuses a batch
    that does not split evenly over ranks x micro-batches before any collective could disagree."""
    fixed = ("moe.router.capacity_factor=1.0", "parallel.fixed_splits=true", "parallel.dispatcher=all_to_all")

    def check(*extra: str, world: int) -> None:
        trainer = SimpleNamespace(cfg=make_cfg("run", *fixed, *extra), run_info=DistributedRun(0, world, 0, None))
        Trainer._check_even_slices(trainer)

    check("data.batch_size=16", "train.grad_accum_steps=2", world=4)
    check("data.batch_size=15", world=1)
    with pytest.raises(ValueError, match=r"data.batch_size = 15 does not split evenly over 2 ranks x train.grad_accum_steps = 1; use a multiple of 2"):
        check("data.batch_size=15", world=2)
    with pytest.raises(ValueError, match=r"data.batch_size = 16 does not split evenly over 4 ranks x train.grad_accum_steps = 8; use a multiple of 32"):
        check("data.batch_size=16", "train.grad_accum_steps=8", world=4)


def test_gradient_accumulation_is_checked_by_the_config(make_cfg: MakeConfig) -> None:
    with pytest.raises(ConfigError, match=r"train.grad_accum_steps = 3: must divide data.batch_size \(16\)"):
        make_cfg("run", "train.grad_accum_steps=3")
    with pytest.raises(ConfigError, match=r"train.grad_accum_steps = 2: mtl.weighting = 'pcgrad' weighs the whole batch's"):
        make_cfg("run", "train.grad_accum_steps=2", "mtl.weighting=pcgrad")
    make_cfg("run", "train.grad_accum_steps=2", "mtl.weighting=imtl", "mtl.weighting_options={mode: loss}")  # no Gram: fine


def test_a_data_folder_trains_only_the_tasks_asked_for(make_cfg: MakeConfig, tmp_path: Path) -> None:
    # `moe-engine baselines` trains each task alone from the same folder: the others must stay out.
    from moe_engine.mtl.data import save_task_data
    from moe_engine.mtl.digits import build_digits_tasks

    folder = tmp_path / "data"
    save_task_data(build_digits_tasks(pairs_per_task=100, seed=0), folder)
    trainer = Trainer(make_cfg("subset", f"data.path={folder}", "data.tasks=[left,digit]"))
    assert trainer.task_names == ["left", "digit"] and len(trainer.model.heads) == 2
    batch = next(trainer.batches)
    assert set(batch["task"].tolist()) <= {0, 1}
    assert trainer.data.tasks[0].num_classes == 10 and trainer.data.tasks[0].name == "left"


def test_resume_refuses_task_heads_in_another_order(make_cfg: MakeConfig, tmp_path: Path) -> None:
    # A checkpoint names its tasks; one from before that (and from a data folder) had a head per task
    # of the folder, in the folder's order: resuming it with another order would swap the heads.
    from moe_engine.mtl.data import save_task_data
    from moe_engine.mtl.digits import build_digits_tasks

    folder = tmp_path / "data"
    save_task_data(build_digits_tasks(pairs_per_task=100, seed=0), folder)
    sets = (f"data.path={folder}", "data.tasks=[left,parity,digit,right]", "train.max_steps=2", "train.checkpoint_every=2")
    Trainer(make_cfg("ordered", *sets)).run()
    checkpoint = tmp_path / "ordered" / "checkpoints" / "step_00000002.pt"
    state = torch.load(checkpoint, weights_only=False)
    assert state["task_names"] == ["left", "parity", "digit", "right"]
    assert Trainer(make_cfg("ordered", *sets, "train.max_steps=3"), resume=str(checkpoint)).step == 2
    del state["task_names"]  # as written before task names were saved: heads in the folder's order
    torch.save(state, checkpoint)
    with pytest.raises(CheckpointMismatchError, match=r"for the tasks \['digit', 'parity', 'left', 'right'\], in that order"):
        Trainer(make_cfg("ordered", *sets, "train.max_steps=3"), resume=str(checkpoint))
