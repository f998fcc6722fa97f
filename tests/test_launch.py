"""The launch scripts as a user runs them: torchrun on two simulated nodes (two launchers on localhost)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.d_model=16", "model.num_layers=2", "model.num_heads=2", "model.ffn_hidden=16",
    "moe.num_experts=4", "moe.ffn_hidden=16", "data.batch_size=16", "data.pairs_per_task=100",
    "train.max_steps=8", "train.eval_every=8", "train.checkpoint_every=4", "train.num_threads=1",
    "logging.log_every=1", "logging.progress_bar=false", "logging.tensorboard=false",
]


def test_two_node_torchrun_launch_trains_and_checkpoints(tmp_path: Path) -> None:
    port = free_port()
    args = ["--config", str(ROOT / "configs" / "ep_cpu.yaml"), *(a for s in TINY for a in ("--set", s)),
            "--set", f"train.out_dir={tmp_path}"]
    env = {**os.environ, "MOE_ENGINE_PYTHON": sys.executable, "NNODES": "2", "MASTER_PORT": str(port)}
    nodes = [
        subprocess.Popen(["bash", str(ROOT / "launch" / "torchrun.sh"), "1", *args], cwd=ROOT,
                         env={**env, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]
    # Rank 0 (on node 0) prints the report and writes the logs; both nodes' ranks trained.
    assert "tokens per expert" in outputs[0] and "tokens per expert" not in outputs[1]
    with (tmp_path / "train.csv").open() as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 9))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000004", "step_00000008"]
