"""moe_engine.hf: what the transformers comparisons of test_hf_convert.py do not reach.

The balance loss summed over several MoE layers at coefficient coef * K / L (checked against the
Switch formula from the routings), explicit position ids, training-time noise (router jitter,
attention dropout) left out of evaluation, OLMoE's one attention_bias for q/k/v and o, the
config's own refusals, and the checkpoint checks a converted file meets in the wild: old rotary
inv_freq buffers, fused tensors of layers the model lacks.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf_convert import VOCAB, _hf_model  # noqa: E402

from moe_engine.config import ConfigError  # noqa: E402
from moe_engine.hf import (  # noqa: E402
    HFCheckpointMismatchError,
    MoECausalLM,
    MoECausalLMConfig,
    import_hf,
)


def _config(**overrides) -> MoECausalLMConfig:
    """3 layers, the middle one dense: 2 MoE layers of 4 experts, top-2."""
    shape = dict(
        vocab_size=41, hidden_size=16, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=4, num_experts=4, top_k=2,
        moe_ffn_hidden=8, dense_ffn_hidden=12, dense_layers=[1], router_aux_loss_coef=0.05,
    )
    return MoECausalLMConfig(**{**shape, **overrides})


def _switch_loss(routing, num_experts: int) -> torch.Tensor:
    """E * sum_i f_i P_i by hand: f_i the share of the T*K choices, P_i the mean router probability."""
    T, K = routing.experts_TK.shape
    f_E = torch.bincount(routing.experts_TK.reshape(-1), minlength=num_experts).float() / (T * K)
    return num_experts * (f_E * routing.scores_TE.mean(0)).sum()


def test_aux_loss_is_the_per_layer_switch_losses_at_coef_k_over_l_summed() -> None:
    """With L = 2 MoE layers (a dense one between them), aux_loss = sum over the MoE layers of
    (router_aux_loss_coef * K / L) * the layer's Switch loss: every layer counts, at 1/L each."""
    torch.manual_seed(0)
    cfg = _config()
    model = MoECausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    out = model(ids, labels_BS=ids)
    assert len(out.routings) == 2 == len(cfg.moe_layer_ids)
    coef = cfg.router_aux_loss_coef * cfg.top_k / 2
    expected = sum(coef * _switch_loss(r, cfg.num_experts) for r in out.routings)
    torch.testing.assert_close(out.aux_loss, expected, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(out.loss, out.lm_loss + expected, atol=1e-7, rtol=1e-5)


def test_explicit_position_ids_match_transformers() -> None:
    """Positions with a gap (row 0) and a shifted row (row 1) rotate q and k as transformers does;
    a gap changes the logits (relative positions change), so ignoring them would show."""
    hf = _hf_model("qwen3_moe")
    model, _ = import_hf(hf)
    model.eval()
    ids = torch.randint(0, VOCAB, (2, 6))
    positions = torch.tensor([[0, 1, 2, 7, 8, 9], [3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        ours = model(ids, position_ids_BS=positions).logits
        ref = hf(ids, position_ids=positions).logits
        default = model(ids).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours[0, 3:], default[0, 3:], atol=1e-3)


def test_router_jitter_and_attention_dropout_act_in_training_only() -> None:
    """Mixtral's router jitter and attention dropout: evaluation gives the noiseless model's logits
    exactly; training mode draws noise (so the knobs are live)."""
    torch.manual_seed(0)
    quiet = MoECausalLM(_config()).eval()
    noisy = MoECausalLM(_config(router_jitter_noise=0.5, attention_dropout=0.5))
    noisy.load_state_dict(quiet.state_dict())
    ids = torch.randint(0, 41, (2, 7))
    with torch.no_grad():
        want = quiet(ids).logits
        torch.testing.assert_close(noisy.eval()(ids).logits, want, atol=0, rtol=0)
        assert not torch.allclose(noisy.train()(ids).logits, want, atol=1e-3)


def test_olmoe_attention_bias_covers_q_k_v_and_o() -> None:
    """OLMoE's one attention_bias puts a bias on all four projections; logits match transformers."""
    hf = _hf_model("olmoe", attention_bias=True)
    assert hf.model.layers[0].self_attn.o_proj.bias is not None
    model, _ = import_hf(hf)
    assert model.config.qkv_bias and model.config.o_bias
    ids = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change, message", [
    (dict(head_dim=5), "head_dim = 5: must be even"),
    (dict(num_kv_heads=3), "num_kv_heads = 3: must divide num_heads = 4"),
    (dict(sliding_window=0), "sliding_window = 0"),
    (dict(shared_expert_gate=True), "needs shared_expert_ffn_hidden"),
    (dict(dense_layers=[0, 1, 2]), "leaves no MoE layer"),
], ids=["odd_head_dim", "kv_heads_not_a_divisor", "window_0", "gate_without_shared_expert", "no_moe_layer"])
def test_config_refuses_shapes_the_model_cannot_run(change, message) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(**change)


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
def test_one_attention_bias_families_refuse_differing_biases(family) -> None:
    """OLMoE and Qwen3-MoE have one attention_bias: qkv_bias != o_bias cannot be written as them."""
    base = {"olmoe": dict(qk_norm="whole", dense_layers=[]), "qwen3_moe": dict(qk_norm="per_head")}[family]
    cfg = _config(qkv_bias=True, o_bias=False, **base)
    assert any("qkv_bias = True != o_bias = False" in r for r in cfg.unsupported_by(family))
    with pytest.raises(ConfigError, match="one attention_bias"):
        cfg.to_hf(family)
    assert not dataclasses.replace(cfg, o_bias=True).unsupported_by(family)


def _olmoe_state():
    hf = _hf_model("olmoe")
    return hf, dict(hf.state_dict())


def test_rotary_inv_freq_buffers_of_older_checkpoints_are_ignored() -> None:
    hf, state = _olmoe_state()
    for layer in range(2):
        state[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = torch.ones(6)
    model, _ = import_hf(state, hf.config)
    ids = torch.randint(0, VOCAB, (1, 4))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_fused_experts_of_a_layer_the_model_lacks_are_unexpected_by_their_own_name() -> None:
    """A fused experts tensor for layer 5 of a 2-layer model is reported as it is named, not
    unpacked into E per-expert keys (nor as missing fused tensors of that layer)."""
    hf, state = _olmoe_state()
    state["model.layers.5.mlp.experts.gate_up_proj"] = state["model.layers.0.mlp.experts.gate_up_proj"].clone()
    with pytest.raises(HFCheckpointMismatchError) as err:
        import_hf(state, hf.config)
    assert err.value.unexpected == ["model.layers.5.mlp.experts.gate_up_proj"]
    assert err.value.missing == [] and err.value.mismatched == []
