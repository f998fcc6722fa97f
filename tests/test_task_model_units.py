"""Unit tests that pin behaviour of the routing monitor, the task MoE block and the multi-task model
which the training-run tests exercise only as a whole: what a
non-main rank restores, refused checkpoints, padding rows of the MoE FFN, the attention branch's
dropout, and the tokens, attributes and sequence ids the model hands its blocks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moe_engine.config import ModelConfig, MoEConfig, RouterConfig
from moe_engine.layer import MoELayer
from moe_engine.mtl.blocks import TaskMoEBlock
from moe_engine.mtl.gates import TaskGateRouter
from moe_engine.mtl.model import MultiTaskTransformer, SelfAttention
from moe_engine.mtl.routing_monitor import RoutingMonitor
from moe_engine.mtl.tasks import TaskSpec
from moe_engine.parallel.runtime import DistributedRun
from moe_engine.routing import TopKRouter

D, H = 8, 2


def _run(rank: int) -> DistributedRun:
    # groups=None: the sums over ranks are the identity, so one process can play any rank.
    return DistributedRun(rank=rank, world_size=2, local_rank=rank, groups=None)


# ------------------------------------------------------------------------------ RoutingMonitor


@pytest.mark.parametrize("rank", [0, 1])
def test_monitor_restores_the_summed_telemetry_on_rank_0_only(rank: int) -> None:
    """The checkpoint holds the telemetry summed over ranks: restored on every rank, the next
    sum would count it world-size times. Rank 0 takes it, the others start from zero."""
    torch.manual_seed(0)
    routers = [TopKRouter(D, 4, 2), TopKRouter(D, 4, 2)]
    source = RoutingMonitor(routers, 4, ["a", "b"], _run(0))
    x_TD, task_ids_T = torch.randn(6, D), torch.tensor([0, 1, 1, 0, 1, 1])
    source.observe([r(x_TD) for r in routers], task_ids_T)
    state = source.state_dict()
    assert state["telemetry"] is not None and state["adaptive_k"] == []

    restored = RoutingMonitor(routers, 4, ["a", "b"], _run(rank))
    restored.load_state_dict(state)
    for mine, saved in zip(restored.telemetry.tensors(), source.telemetry.tensors()):
        assert torch.equal(mine, saved if rank == 0 else torch.zeros_like(saved))


def test_monitor_refuses_adaptive_k_state_of_another_number_of_layers() -> None:
    """A checkpoint with adaptive-k state for 1 MoE layer cannot resume a model with 2: zip would
    restore the first layer's k and silently leave the second at its start."""
    torch.manual_seed(1)
    routers = [TaskGateRouter(D, 4, 2, num_tasks=2) for _ in range(2)]
    monitor = RoutingMonitor(routers, 4, ["a", "b"], _run(0), telemetry=False, adaptive_k=(1, 1))
    state = monitor.state_dict()
    assert len(state["adaptive_k"]) == 2
    with pytest.raises(ValueError, match="adaptive-k state for 1 MoE layers: this model has 2"):
        monitor.load_state_dict({"telemetry": None, "adaptive_k": state["adaptive_k"][:1]})
    monitor.load_state_dict(state)  # the matching state loads


# ------------------------------------------------------------------------------ TaskMoEBlock


class _Zero(nn.Module):
    """A dense FFN that adds nothing, so a block's output is x + its attention branch."""

    def forward(self, x):
        return torch.zeros_like(x)


def test_block_padding_positions_get_no_moe_ffn_output_B2_S4() -> None:
    """With a key padding mask the MoE FFN runs on the real tokens only: a padding position's
    output is its residual plus attention, with a zero FFN term (not its normed input)."""
    torch.manual_seed(2)
    ffn = MoELayer.from_config(D, MoEConfig(num_experts=4, ffn_hidden=6, router=RouterConfig(top_k=2)))
    block = TaskMoEBlock(D, H, attn=SelfAttention(D, H, dropout=0.0), ffn=ffn).eval()
    x_BSD = torch.randn(2, 4, D)
    pad_BS = torch.tensor([[False, False, True, True], [False, False, False, True]])
    out = block(x_BSD, key_padding_mask_BS=pad_BS)
    with torch.no_grad():
        attended_BSD = x_BSD + block.attn(block.norm_attn(x_BSD), key_padding_mask_BS=pad_BS)
    torch.testing.assert_close(out.x[pad_BS], attended_BSD[pad_BS])
    assert (out.x[~pad_BS] - attended_BSD[~pad_BS]).abs().amax() > 1e-3  # the real tokens got the FFN
    assert out.routings[0].experts_TK.shape == (int((~pad_BS).sum()), 2)


def test_block_dropout_applies_to_the_attention_branch_in_training() -> None:
    """Dropout acts on both residual branches: with a zero FFN, the block adds dropout(attention),
    each element dropped (0) or scaled by 1 / (1 - p)."""
    torch.manual_seed(3)
    block = TaskMoEBlock(D, H, attn=SelfAttention(D, H, dropout=0.0), ffn=_Zero(), dropout=0.5).train()
    x_BSD = torch.randn(2, 5, D)
    with torch.no_grad():
        branch_BSD = block.attn(block.norm_attn(x_BSD))
        added_BSD = block(x_BSD).x - x_BSD
    dropped = added_BSD == 0
    assert 0 < dropped.sum() < dropped.numel()
    torch.testing.assert_close(added_BSD[~dropped], 2 * branch_BSD[~dropped])


# ------------------------------------------------------------------------------ MultiTaskTransformer


def _model(router_type: str = "softmax_topk", **moe) -> MultiTaskTransformer:
    tasks = [TaskSpec(f"task{i}", 3, 0.5, "a test task") for i in range(3)]
    model_cfg = ModelConfig(d_model=D, num_layers=2, num_heads=H, ffn_hidden=8, dropout=0.0, patch_size=2)
    moe_cfg = MoEConfig(num_experts=4, ffn_hidden=6, router=RouterConfig(type=router_type, **moe))
    return MultiTaskTransformer(model_cfg, moe_cfg, tasks, (4, 6)).eval()


def test_patchify_takes_row_major_p_by_p_patches_B2_H4_W6() -> None:
    model = _model()
    images_BHW = torch.arange(2 * 4 * 6, dtype=torch.float32).view(2, 4, 6)
    patches_BPN = model.patchify(images_BHW)
    assert patches_BPN.shape == (2, 6, 4)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                expected = images_BHW[b, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(-1)
                assert torch.equal(patches_BPN[b, 3 * i + j], expected), (b, i, j)


def test_token_attributes_mark_the_task_token_the_patches_and_the_task() -> None:
    model = _model()
    attributes_TA = model.token_attributes(torch.tensor([2, 0]), seq_len=3)
    assert attributes_TA.tolist() == [
        [1, 0, 0, 0, 1], [0, 1, 0, 0, 1], [0, 1, 0, 0, 1],  # example 0, task 2
        [1, 0, 1, 0, 0], [0, 1, 1, 0, 0], [0, 1, 1, 0, 0],  # example 1, task 0
    ]


def test_blocks_see_each_tokens_task_and_sequence_B3() -> None:
    """The routing context has one entry per token of the flattened (B*S) input: token t of
    example b has task task_ids_B[b] and sequence b (what seq_switch's per-sequence balance reads)."""
    model = _model("attribute")
    seen = []
    model.blocks[1].register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    images_BHW, task_ids_B = torch.rand(3, 4, 6), torch.tensor([1, 2, 0])
    model(images_BHW, task_ids_B)
    (ctx,) = seen
    S = 1 + 6  # the task token and 6 patches
    assert ctx.task_ids_T.tolist() == [1] * S + [2] * S + [0] * S
    assert ctx.sequence_ids_T.tolist() == [0] * S + [1] * S + [2] * S
    torch.testing.assert_close(ctx.attributes_TA, model.token_attributes(task_ids_B, S))
