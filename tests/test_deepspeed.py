"""Training under DeepSpeed's engine on CPU ranks (its CPU accelerator, gloo), launched as a user would.

With dropout and the per-rank balance loss off, 2 ranks under ZeRO-1 or ZeRO-2 follow the
single-process run step for step (DeepSpeed averages gradients over ranks; the trainer scales the
loss so that the average is the single-process gradient). A run stopped halfway resumes from
DeepSpeed's own checkpoint and continues exactly. So do 2 ranks with expert parallelism (EP = 2,
the all-to-all dispatcher, DeepSpeed's MoE parameter groups), whose checkpoints add each EP rank's
experts to DeepSpeed's tag folder.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed import free_port
from moe_engine.checkpoint import CheckpointMismatchError
from moe_engine.config import load_config
from moe_engine.parallel.deepspeed_checkpoint import load_deepspeed_checkpoint
from moe_engine.parallel.deepspeed_engine import DeepSpeedConfigError, initialize_engine, load_deepspeed_config
from moe_engine.checkpoint import expert_shard_size
from moe_engine.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
STEPS = 60
EP2 = ["--config", str(ROOT / "configs" / "ep_deepspeed.yaml")]  # all_to_all, expert_parallel_size 2
TINY = [
    "model.d_model=16", "model.num_layers=2", "model.num_heads=2", "model.ffn_hidden=16", "model.dropout=0.0",
    "moe.num_experts=4", "moe.ffn_hidden=16", "moe.router.aux_loss_coef=0.0", "optim.lr=3e-3",
    # A constant schedule: a run stopped at max_steps = STEPS / 2 and resumed to STEPS sees the same lrs.
    "optim.warmup_steps=0", "optim.schedule=constant",
    "data.batch_size=32", "data.pairs_per_task=200", f"train.max_steps={STEPS}", f"train.eval_every={STEPS}",
    f"train.checkpoint_every={STEPS // 2}", "train.num_threads=1",
    "logging.log_every=1", "logging.progress_bar=false", "logging.tensorboard=false",
]


def _losses(out_dir: Path) -> list[float]:
    with (out_dir / "train.csv").open() as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def _deepspeed(out_dir: Path, ds_config: str, *extra: str, run: tuple[str, ...] | list[str] = TINY) -> None:
    overrides = [a for s in [*run, f"train.out_dir={out_dir}"] for a in ("--set", s)]
    command = ["bash", str(ROOT / "launch" / "deepspeed.sh"), "2",
               "--deepspeed_config", str(ROOT / "configs" / ds_config), *overrides, *extra]
    port = free_port()
    env = {**os.environ, "MOE_ENGINE_PYTHON": sys.executable, "MASTER_PORT": str(port)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    # DeepSpeed's CPU all-reduce maps a 66 MiB /dev/shm buffer per rank and never unlinks it; the
    # trainer does (deepspeed_engine._unlink_shm_allreduce_buffer), so a run leaves no RAM behind.
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    assert not left, f"DeepSpeed's shared-memory buffers outlived the run: {left}"


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> list[float]:
    out_dir = tmp_path_factory.mktemp("single")
    Trainer(load_config(None, [*TINY, f"train.out_dir={out_dir}"])).run()
    return _losses(out_dir)


# Slow (half a minute on 2 cores): in CI, the generalist test below runs ZeRO-2 without expert
# parallelism, and the expert-parallel test trains this model to the same curve under ZeRO-2.
@pytest.mark.slow
def test_zero2_on_two_ranks_follows_the_single_process_run(single_process: list[float], tmp_path: Path) -> None:
    _deepspeed(tmp_path, "deepspeed_zero2.json")
    losses = _losses(tmp_path)
    assert losses == pytest.approx(single_process, rel=1e-5)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05  # it learns (about 1.99 -> 1.86 here)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == [f"step_{STEPS // 2:08d}", f"step_{STEPS:08d}"]


# Slow (a minute on 2 cores): the expert-parallel test below also runs ZeRO-1 to a DeepSpeed checkpoint
# and resumes from it, so CI keeps that path; this one adds the same without expert parallelism.
@pytest.mark.slow
def test_zero1_run_resumes_from_its_deepspeed_checkpoint(single_process: list[float], tmp_path: Path) -> None:
    _deepspeed(tmp_path, "deepspeed_zero1.json", "--set", f"train.max_steps={STEPS // 2}")
    _deepspeed(tmp_path, "deepspeed_zero1.json", "--resume")
    assert _losses(tmp_path) == pytest.approx(single_process, rel=1e-5)


# The generalist's batches hold each task's rows on some ranks only (4 examples of 4 tasks over 2
# ranks), and often none of a task: every rank still scores every task, at zero rows, so ZeRO's
# gradient buckets line up (without that, gloo aborts on the first mismatched bucket).
GENERALIST = [
    "model.architecture=generalist", "data.name=generalist", "data.tasks=[digit,caption,sum,text_digit]",
    "model.d_model=16", "model.num_layers=2", "model.num_heads=2", "model.ffn_hidden=16", "model.dropout=0.0",
    "model.moe_attention=true", "model.share_routing=true", "model.max_text_len=16",
    "moe.num_experts=4", "moe.ffn_hidden=16", "moe.router.type=attribute", "moe.router.aux_loss_coef=0.0",
    "optim.warmup_steps=0", "data.batch_size=4", "data.pairs_per_task=40", "train.max_steps=10",
    "train.eval_every=10", "train.checkpoint_every=5", "train.num_threads=1",
    "logging.log_every=1", "logging.progress_bar=false", "logging.tensorboard=false",
]


@pytest.mark.parametrize("parallel", [pytest.param((), id="dp2"), pytest.param(tuple(EP2), marks=pytest.mark.slow, id="ep2")])
def test_generalist_under_zero2_with_accumulation_follows_the_single_process_run(tmp_path: Path, parallel) -> None:
    single, ds = tmp_path / "single", tmp_path / "ds"
    Trainer(load_config(None, [*GENERALIST, f"train.out_dir={single}"])).run()
    # Two micro-batches of one example per rank (DeepSpeed's gradient_accumulation_steps = 2) against
    # the whole batch at once.
    _deepspeed(ds, "deepspeed_zero2.json", *parallel, run=[*GENERALIST, "train.grad_accum_steps=2"])
    assert _losses(ds) == pytest.approx(_losses(single), rel=1e-5)
    with (ds / "train.csv").open() as f:
        rows = list(csv.DictReader(f))
    # Steps that lacked a task (its column empty) are what this test is about.
    assert any(row["loss_text_digit"] == "" for row in rows) and any(row["loss_caption"] == "" for row in rows)
    assert (ds / "checkpoints" / "latest").read_text().strip() == f"step_{10:08d}"
    assert sorted(p.name for p in (ds / "checkpoints").glob("step_*")) == [f"step_{5:08d}", f"step_{10:08d}"]


def test_a_0_dim_parameter_is_refused_before_deepspeed_starts() -> None:
    model = torch.nn.Module()
    model.scale = torch.nn.Parameter(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"parameters \['scale'\] are 0-dim: .* make them shape \(1,\)"):
        initialize_engine(model, torch.optim.SGD(model.parameters(), lr=0.1), None, {})


def test_deepspeed_config_auto_values_come_from_the_run_config(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.batch_size=32", "optim.grad_clip=0.5"])
    ds = load_deepspeed_config(ROOT / "configs" / "deepspeed_zero2.json", cfg, world_size=4, bf16=False)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (32, 8, 1)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is False
    accum = load_config(None, ["data.batch_size=32", "train.grad_accum_steps=2"])
    ds = load_deepspeed_config(ROOT / "configs" / "deepspeed_zero2.json", accum, world_size=4, bf16=False)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (32, 4, 2)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 2}}))
    with pytest.raises(DeepSpeedConfigError, match=r"train_batch_size = 64, but the run config implies 32"):
        load_deepspeed_config(path, cfg, world_size=4, bf16=False)
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(DeepSpeedConfigError, match=r"zero_optimization.stage = 3: moe_engine supports 0, 1 and 2"):
        load_deepspeed_config(path, cfg, world_size=4, bf16=False)
    with pytest.raises(DeepSpeedConfigError, match="does not divide over 3 ranks"):
        load_deepspeed_config(ROOT / "configs" / "deepspeed_zero2.json", cfg, world_size=3, bf16=False)
    # Precision: explicit values must be the run's, as booleans; fp16 is refused.
    for section, bf16, message in [
        ({"bf16": {"enabled": True}}, False, r"bf16.enabled = True, but the run trains in fp32 \(train.precision\); use \"auto\" or false"),
        ({"bf16": {"enabled": "yes"}}, True, r"bf16.enabled = 'yes', but the run trains in bf16"),
        ({"fp16": {"enabled": True}}, False, r"fp16.enabled = True: moe_engine trains in bf16 or fp32"),
    ]:
        path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **section}))
        with pytest.raises(DeepSpeedConfigError, match=message):
            load_deepspeed_config(path, cfg, world_size=4, bf16=bf16)
    path.write_text(json.dumps({"bf16": {"enabled": True}, "fp16": {"enabled": "auto"}}))
    ds = load_deepspeed_config(path, cfg, world_size=4, bf16=True)
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False


def test_expert_parallel_run_follows_the_single_process_run_and_resumes(single_process: list[float], tmp_path: Path) -> None:
    # EP = 2 on 2 ranks: each rank holds 2 of the 4 experts (its expert-data-parallel group is itself).
    # Two launches cover both stages: ZeRO-1 to the halfway checkpoint, then ZeRO-2 resumes from it
    # (stages 1 and 2 write the same checkpoint format; the partitions are the same at this size).
    _deepspeed(tmp_path, "deepspeed_zero1.json", *EP2, "--set", f"train.max_steps={STEPS // 2}")
    _deepspeed(tmp_path, "deepspeed_zero2.json", *EP2, "--resume")
    losses = _losses(tmp_path)
    assert losses == pytest.approx(single_process, rel=1e-5)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05  # it learns (about 1.99 -> 1.86 here)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    for step in (STEPS // 2, STEPS):
        tag = tmp_path / "checkpoints" / f"step_{step:08d}"
        assert {"experts_ep0_of_2.pt", "experts_ep1_of_2.pt", "mp_rank_00_model_states.pt"} <= {p.name for p in tag.iterdir()}
        assert expert_shard_size(tag) == 2


def test_expert_parallelism_under_deepspeed_needs_zero_stage_1_or_2(tmp_path: Path) -> None:
    overrides = ["parallel.dispatcher=all_to_all", "parallel.expert_parallel_size=2", "data.batch_size=32"]
    cfg = load_config(None, ["parallel.deepspeed_config=configs/deepspeed_zero2.json", *overrides])
    ds = load_deepspeed_config(ROOT / "configs" / "deepspeed_zero2.json", cfg, world_size=2, bf16=False)
    assert ds["zero_optimization"]["stage"] == 2
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 0}}))
    with pytest.raises(DeepSpeedConfigError, match=r"stage = 0 with parallel.expert_parallel_size = 2: .* ZeRO stage 1 or 2"):
        load_deepspeed_config(path, cfg, world_size=2, bf16=False)


def test_the_expert_parallel_size_of_a_deepspeed_checkpoint_comes_from_its_shard_files(tmp_path: Path) -> None:
    assert expert_shard_size(tmp_path) == 1  # no shards: written at EP = 1
    (tmp_path / "experts_ep0_of_4.pt").touch()
    assert expert_shard_size(tmp_path) == 4
    (tmp_path / "experts_ep0_of_2.pt").touch()
    with pytest.raises(CheckpointMismatchError, match=r"several expert-parallel sizes \[2, 4\]"):
        expert_shard_size(tmp_path)


def test_a_deepspeed_checkpoint_resumes_at_its_own_expert_parallel_size_only(tmp_path: Path) -> None:
    # Refused by name before DeepSpeed's load runs (no engine is needed to get there).
    tag = tmp_path / "step_00000030"
    tag.mkdir()
    for r in range(2):
        (tag / f"experts_ep{r}_of_2.pt").touch()
    with pytest.raises(CheckpointMismatchError, match=r"written at parallel.expert_parallel_size = 2, this run has 1: "
                                                      r".*resume with parallel.expert_parallel_size = 2"):
        load_deepspeed_checkpoint(None, torch.nn.Linear(2, 2), None, tag)


def test_without_a_launcher_the_deepspeed_config_is_refused_by_name(tmp_path: Path, monkeypatch, capsys) -> None:
    # No RANK / WORLD_SIZE (and no mpi4py here): one line naming the way to launch, before any work.
    from moe_engine import cli
    import importlib.util

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "mpi4py" else real_find_spec(n, *a))
    sets = ["--set", f"train.out_dir={tmp_path / 'run'}"]
    assert cli.main(["train", "--deepspeed_config", str(ROOT / "configs" / "deepspeed_zero2.json"), *sets]) == 2
    err = capsys.readouterr().err
    assert "no launcher started this process" in err and "launch/deepspeed.sh" in err
    # A missing or broken JSON is named first, launcher or not.
    assert cli.main(["train", "--deepspeed_config", str(tmp_path / "none.json"), *sets]) == 2
    assert "none.json': no such file" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert cli.main(["train", "--deepspeed_config", str(tmp_path / "bad.json"), *sets]) == 2
    assert "expected a JSON object, got list" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
