"""Per-shard checkpoints of expert-parallel runs, loaded at other EP sizes (CPU ranks, gloo).

A run at world 2, EP=2 trains 3 steps and saves `step_00000003/`: model.pt plus one expert file per
EP rank, nothing gathered. Loading it at EP=4, at EP=2 (one and two expert-data-parallel replicas)
and in a single process must give the same model outputs on a fixed batch as the saving run had,
and the same loss at the next step (so the Adam moments of the experts were resharded too). The
single-file checkpoints of runs without expert parallelism still load at EP=2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distributed import run_ranks
from moe_engine.checkpoint import CheckpointMismatchError, load_checkpoint, read_model_state
from moe_engine.mtl.data import eval_batches
from moe_engine.train import Trainer
from test_distributed_training import _cfg, _losses

SAVED = 3  # the checkpoint step; every run stops one step later
STOP = f"train.max_steps={SAVED + 1}"
EP = ("parallel.dispatcher=all_to_all",)


def _write_outputs(trainer: Trainer, path: Path) -> None:
    """The model's features on the first test batch; every rank feeds the whole batch, rank 0 writes them."""
    batch = next(eval_batches(trainer.data.test, 32))
    trainer.model.eval()
    with torch.no_grad():
        features = trainer.model(batch["pixels"], batch["task"]).features_BD
    if trainer.run_info.is_main:
        torch.save(features, path)


class _RecordingTrainer(Trainer):
    """Writes the model outputs next to every checkpoint it saves."""

    def save_checkpoint(self) -> Path:
        path = super().save_checkpoint()
        _write_outputs(self, self.out_dir / f"outputs_{self.step}.pt")
        return path


def _save_on_ranks(rank: int, world_size: int, out_dir: str, extra: tuple[str, ...]) -> None:
    _RecordingTrainer(_cfg(Path(out_dir), *extra, STOP)).run()


def _resume_on_ranks(rank: int, world_size: int, out_dir: str, extra: tuple[str, ...], checkpoint: str) -> None:
    trainer = Trainer(_cfg(Path(out_dir), *extra, STOP), resume=checkpoint)
    _write_outputs(trainer, Path(out_dir) / "outputs.pt")
    trainer.run()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """The run directory of the world 2, EP=2 run (checkpoints at steps 3 and 4)."""
    out_dir = tmp_path_factory.mktemp("ep2_saved")
    run_ranks(2, _save_on_ranks, str(out_dir), (*EP, "parallel.expert_parallel_size=2"))
    return out_dir


def _checkpoint(run_dir: Path, step: int = SAVED) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def _check_resumed(saved: Path, resumed: Path) -> None:
    """Same outputs after loading, same loss at the next step, and the same weights after it (which
    the optimizer state decides: wrong Adam moments would move them elsewhere)."""
    outputs = torch.load(resumed / "outputs.pt"), torch.load(saved / f"outputs_{SAVED}.pt")
    torch.testing.assert_close(*outputs, rtol=1e-6, atol=1e-6)
    assert _losses(resumed) == pytest.approx(_losses(saved)[SAVED:], rel=1e-6)
    expected = read_model_state(saved / "checkpoints")
    for name, tensor in read_model_state(resumed / "checkpoints").items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_expert_parallel_checkpoint_is_one_file_per_shard(saved: Path) -> None:
    for step in (SAVED, SAVED + 1):
        files = sorted(p.name for p in _checkpoint(saved, step).iterdir())
        assert files == ["experts_ep0_of_2.pt", "experts_ep1_of_2.pt", "model.pt"]
    model = torch.load(_checkpoint(saved) / "model.pt", weights_only=True)
    assert not any(".experts." in name for name in model["model"])  # the experts live in their shards only
    shard = torch.load(_checkpoint(saved) / "experts_ep1_of_2.pt", weights_only=True)
    assert shard["expert_ids"] and all(ids == [2, 3] for ids in shard["expert_ids"].values())  # E = 4 over 2 ranks
    assert all(t.shape[0] == 2 for t in shard["model"].values())
    assert set(shard["optimizer"]) == set(shard["model"])  # Adam moments of every expert tensor
    whole = read_model_state(_checkpoint(saved))
    assert all(whole[name].shape[0] == 4 for name in shard["model"])


@pytest.mark.parametrize(
    "world_size, ep_size",
    # EP=4; EP=2; EP=2 with two expert-data-parallel replicas (slow: test_distributed_training's [ep2x2]
    # trains with replicas, and ep4 already reshards the saved EP=2 experts)
    [(4, 4), (2, 2), pytest.param(4, 2, marks=pytest.mark.slow)],
    ids=["ep4", "ep2", "ep2x2"],
)
def test_resume_at_another_expert_parallel_size(saved: Path, tmp_path: Path, world_size: int, ep_size: int) -> None:
    run_ranks(world_size, _resume_on_ranks, str(tmp_path), (*EP, f"parallel.expert_parallel_size={ep_size}"),
              str(_checkpoint(saved)))
    _check_resumed(saved, tmp_path)
    # Its own checkpoint: one expert file per EP rank, written by the first replica only.
    files = sorted(p.name for p in _checkpoint(tmp_path, SAVED + 1).iterdir())
    assert files == [*(f"experts_ep{r}_of_{ep_size}.pt" for r in range(ep_size)), "model.pt"]


def test_resume_in_a_single_process(saved: Path, tmp_path: Path) -> None:
    trainer = Trainer(_cfg(tmp_path, STOP), resume=str(_checkpoint(saved)))
    _write_outputs(trainer, tmp_path / "outputs.pt")
    trainer.run()
    _check_resumed(saved, tmp_path)
    assert (tmp_path / "checkpoints" / f"step_{SAVED + 1:08d}.pt").is_file()  # EP = 1 writes one file


def test_single_file_checkpoint_resumes_at_ep2(saved: Path, tmp_path: Path) -> None:
    single, ep2 = tmp_path / "single", tmp_path / "ep2"
    _RecordingTrainer(_cfg(single, STOP)).run()
    checkpoint = single / "checkpoints" / f"step_{SAVED:08d}.pt"
    run_ranks(2, _resume_on_ranks, str(ep2), (*EP, "parallel.expert_parallel_size=2"), str(checkpoint))
    _check_resumed(single, ep2)


def test_checkpoint_of_another_expert_count_is_refused(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointMismatchError, match=r"moe\.num_experts: checkpoint has 4, config has 8"):
        Trainer(_cfg(tmp_path / "config", "moe.num_experts=8"), resume=str(_checkpoint(saved)))
    # Past the config check (a state read against its own config), the shard loader names the tensor.
    trainer = Trainer(_cfg(tmp_path / "tensors", "moe.num_experts=8"))
    state = load_checkpoint(_checkpoint(saved), torch.load(_checkpoint(saved) / "model.pt", weights_only=True)["config"])
    with pytest.raises(CheckpointMismatchError, match=r"experts\.w_in: the checkpoint holds 4 experts, this model 8"):
        trainer._load_state(state)
