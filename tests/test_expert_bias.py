"""Aux-loss-free balancing and group-limited routing, from the config through the trainer."""

from __future__ import annotations

import pytest
import torch

from moe_engine.config import ConfigError, load_config
from moe_engine.train import Trainer

TINY = [
    "model.d_model=16", "model.num_layers=2", "model.num_heads=2", "model.ffn_hidden=16", "model.dropout=0.0",
    "moe.num_experts=4", "moe.ffn_hidden=16", "data.batch_size=16", "data.pairs_per_task=100",
    "train.max_steps=5", "train.eval_every=100", "train.checkpoint_every=100", "train.num_threads=1",
    "logging.progress_bar=false", "logging.tensorboard=false",
]


def test_trainer_moves_the_expert_bias_by_the_rate_each_step(tmp_path) -> None:
    rate = 0.01
    trainer = Trainer(load_config(None, [*TINY, f"moe.router.expert_bias_rate={rate}", f"train.out_dir={tmp_path}"]))
    routers = [layer.router for layer in trainer.model.moe_layers]
    assert all(torch.equal(r.expert_bias, torch.zeros(4)) for r in routers)
    batch = next(trainer.batches)
    with torch.no_grad():
        out = trainer.model(batch["pixels"], batch["task"])
    # The first step's update, from the counts of the step's own routing (same weights, no dropout).
    expected = [rate * torch.sign(c.mean() - c) for c in (torch.bincount(r.experts_TK.flatten(), minlength=4).float() for r in out.routings)]
    trainer.train_step(batch)
    for router, bias in zip(routers, expected):
        torch.testing.assert_close(router.expert_bias, bias)
    trainer.run()
    for router in routers:
        steps = router.expert_bias / rate
        assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 5


def test_group_limited_routing_trains(tmp_path) -> None:
    cfg = load_config(None, [*TINY, "moe.router.n_groups=2", "moe.router.topk_groups=1", f"train.out_dir={tmp_path}"])
    result = Trainer(cfg).run()
    assert result.step == 5


@pytest.mark.parametrize(
    "override, message",
    [
        ("moe.router.n_groups=3", "moe.router.n_groups = 3: must divide moe.num_experts (4)"),
        ("moe.router.topk_groups=3", "moe.router.topk_groups = 3: must be in [1, moe.router.n_groups = 1]"),
        ("moe.router.expert_bias_rate=-1", "moe.router.expert_bias_rate = -1.0: must be >= 0"),
    ],
)
def test_router_group_and_bias_values_are_checked(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [*TINY, override])
    assert message in str(info.value)


def test_top_k_beyond_the_offered_groups_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"moe.router.top_k = 3: must be <= the 2 experts of moe.router.topk_groups"):
        load_config(None, [*TINY, "moe.router.n_groups=2", "moe.router.topk_groups=1", "moe.router.top_k=3"])
