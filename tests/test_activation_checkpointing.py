"""model.activation_checkpointing: every transformer block recomputed in the backward (moe_engine.recompute).

Each model family (the multi-task transformer, the generalist, the causal LM) must give the same
loss and the same gradient of every parameter with and without it, in training mode with dropout
and noisy routing (the recomputation must draw the forward's random numbers), while keeping fewer
bytes for the backward. Under expert parallelism the recomputed blocks exchange tokens again:
tests/test_distributed_training.py runs that case on two ranks.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moe_engine.config import ModelConfig, MoEConfig, RouterConfig
from moe_engine.hf.causal_lm import MoECausalLM
from moe_engine.hf.config import MoECausalLMConfig
from moe_engine.mtl.model import MultiTaskTransformer
from moe_engine.mtl.tasks import TaskSpec
from moe_engine.recompute import run_block


def _saved_bytes(fn) -> tuple[torch.Tensor, int]:
    """(fn(), the bytes of the distinct storages autograd saved while it ran)."""
    sizes = {}

    def pack(t):
        sizes[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(sizes.values())


def _loss_grads_and_saved(model: torch.nn.Module, loss_fn, seed: int):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks and router noise for both runs
    loss, saved = _saved_bytes(lambda: loss_fn(model))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, saved


def _check_same_with_less_memory(model: torch.nn.Module, loss_fn, set_checkpointing) -> None:
    model.train()
    set_checkpointing(False)
    loss, grads, saved = _loss_grads_and_saved(model, loss_fn, seed=11)
    set_checkpointing(True)
    loss_ck, grads_ck, saved_ck = _loss_grads_and_saved(model, loss_fn, seed=11)
    torch.testing.assert_close(loss_ck, loss, rtol=0, atol=0)
    assert grads_ck.keys() == grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ck[name], grad, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert saved_ck < saved / 2, (saved_ck, saved)


def test_multitask_transformer_with_dropout_and_noisy_routing() -> None:
    torch.manual_seed(0)
    tasks = [TaskSpec(f"task{i}", 3 + i, 0.5, "a test task") for i in range(2)]
    model_cfg = ModelConfig(d_model=16, num_layers=3, num_heads=2, ffn_hidden=24, moe_every=1, patch_size=4, dropout=0.2)
    moe_cfg = MoEConfig(num_experts=4, ffn_hidden=12, router=RouterConfig(type="noisy_topk", top_k=2))
    model = MultiTaskTransformer(model_cfg, moe_cfg, tasks, (8, 12))
    images = torch.rand(5, 8, 12, generator=torch.Generator().manual_seed(1))
    task_ids = torch.tensor([0, 1, 0, 1, 1])

    def loss_fn(m):
        out = m(images, task_ids)
        return m.logits(out.features_BD, 0).logsumexp(-1).sum() + m.logits(out.features_BD, 1).square().mean() + out.aux_loss

    _check_same_with_less_memory(model, loss_fn, lambda on: setattr(model, "activation_checkpointing", on))


def test_generalist_with_moe_attention_and_shared_routing() -> None:
    from test_generalist_model import build, make_batch, scalar_loss

    model = build(dropout=0.1)
    batch = make_batch()
    _check_same_with_less_memory(model, lambda m: scalar_loss(m, m(batch), batch),
                                 lambda on: setattr(model, "activation_checkpointing", on))


def test_causal_lm() -> None:
    torch.manual_seed(0)
    config = MoECausalLMConfig(
        vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, num_experts=4,
        moe_ffn_hidden=16, dense_ffn_hidden=32, top_k=2, attention_dropout=0.1,
    )
    model = MoECausalLM(config)
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(2))

    def set_checkpointing(on: bool) -> None:
        model.config = dataclasses.replace(model.config, activation_checkpointing=on)

    _check_same_with_less_memory(model, lambda m: m(ids, labels_BS=ids).loss, set_checkpointing)


def test_run_block_only_checkpoints_under_autograd() -> None:
    calls = []

    def block(x, *, scale):
        calls.append(torch.is_grad_enabled())
        return x * x * scale  # saves x: the backward needs the recompute

    x = torch.ones(3, requires_grad=True)
    with torch.no_grad():
        run_block(block, x, scale=2.0, checkpointed=True)
    assert calls == [False]  # evaluation: one plain run
    y = run_block(block, x, scale=2.0, checkpointed=True)
    y.sum().backward()
    assert calls == [False, True, True] and torch.equal(x.grad, torch.full((3,), 4.0))  # forward, then the recompute


def test_config_field() -> None:
    from moe_engine.config import load_config
    from moe_engine.typed_config import ConfigError

    assert load_config(None, ["model.activation_checkpointing=true"]).model.activation_checkpointing
    with pytest.raises(ConfigError, match="model.activation_checkpointing = 3: must be true or false"):
        load_config(None, ["model.activation_checkpointing=3"])


def test_run_block_recomputes_the_whole_block() -> None:
    """The recomputation runs to the block's end (early stop off): work after the last saved tensor,
    e.g. an expert-parallel exchange every rank must issue, is repeated too."""
    steps = []

    def block(x):
        y = x * x  # saves x
        steps.append("end")  # after the last op whose saved tensor the backward needs
        return y.sum()

    x = torch.ones(3, requires_grad=True)
    run_block(block, x, checkpointed=True).backward()
    assert steps == ["end", "end"] and torch.equal(x.grad, torch.full((3,), 2.0))
