"""moe_engine.hf: Hugging Face Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE checkpoints in and out.

Tiny random models built from transformers' own config classes, saved with save_pretrained: our
logits and gradients against transformers' forward and backward, exact round trips through
export_hf / from_pretrained and through `moe-engine convert`, and refusals with their lists.
"""

import argparse
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moe_engine.config import ConfigError  # noqa: E402
from moe_engine.hf import (  # noqa: E402
    HFCheckpointMismatchError,
    MoECausalLMConfig,
    check_hf_state,
    export_hf,
    hf_to_native,
    import_hf,
    load_native,
    save_native,
)
from moe_engine.hf import convert  # noqa: E402

VOCAB = 97  # prime: no accidental alignment with any width


def _hf_config(family: str, **overrides):
    """A tiny config per family; each row exercises that family's own switches."""
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, num_experts_per_tok=2, rms_norm_eps=1e-5)
    if family == "mixtral":
        # 5 query heads over 1 KV head (GQA 5:1), odd expert width, head_dim 8.
        kw = dict(hidden_size=40, intermediate_size=28, num_attention_heads=5, num_key_value_heads=1,
                  num_local_experts=5, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    elif family == "qwen2_moe":
        # q/k/v bias, a dense second layer, shared expert 36 wide (not a multiple of 24), no renormalisation.
        kw = dict(hidden_size=32, intermediate_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=36,
                  num_attention_heads=4, num_key_value_heads=2, num_experts=6, mlp_only_layers=[1], norm_topk_prob=False)
    elif family == "qwen3_moe":
        # head_dim 16 != hidden/heads = 8, per-head q/k norm, 8 experts, renormalised.
        kw = dict(hidden_size=32, intermediate_size=40, moe_intermediate_size=20, head_dim=16, num_attention_heads=4,
                  num_key_value_heads=2, num_experts=8, norm_topk_prob=True)
    else:
        # q/k norm over the whole projection, clip_qkv that binds, tied embeddings.
        kw = dict(hidden_size=48, intermediate_size=24, num_attention_heads=4, num_key_value_heads=4, num_experts=4,
                  clip_qkv=0.6, tie_word_embeddings=True, eos_token_id=VOCAB - 1, pad_token_id=0)
    return transformers.AutoConfig.for_model(family, **{**common, **kw, **overrides})


def _hf_model(family: str, dtype=torch.float32, **overrides):
    torch.manual_seed(len(family))
    model = transformers.AutoModelForCausalLM.from_config(_hf_config(family, **overrides), dtype=dtype).eval()
    with torch.no_grad():
        # Random norms and biases too, so a misplaced norm or a dropped bias shows.
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def _saved(tmp_path, hf_model, **save_kw):
    folder = tmp_path / "hf"
    hf_model.save_pretrained(folder, **save_kw)
    return folder


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_and_round_trip_is_exact(tmp_path, family):
    hf = _hf_model(family)
    model, found = import_hf(_saved(tmp_path, hf))
    assert found == family
    assert model.num_parameters() == hf.num_parameters()
    model.eval()
    for shape in [(2, 9), (1, 1)]:  # a batch, and one token
        ids = torch.randint(0, VOCAB, shape)
        with torch.no_grad():
            ref, ours = hf(ids).logits, model(ids).logits
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)

    out = export_hf(model, family, tmp_path / "export")
    assert not (out / "model.safetensors.index.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded) is type(hf)
    want, got = hf.state_dict(), reloaded.state_dict()
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    if family == "olmoe":
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
        assert reloaded.config.clip_qkv == hf.config.clip_qkv


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_gradients_match_transformers_backward(family):
    hf = _hf_model(family, pad_token_id=1)
    model, _ = import_hf(hf)
    ids = torch.randint(0, VOCAB, (2, 6))
    ids[1, 2] = 1  # the pad token: its embedding row gets no gradient from the lookup, in both
    labels = ids.clone()
    labels[0, :2] = -100
    ref = hf(ids, labels=labels).loss
    ref.backward()
    out = model(ids, labels_BS=labels)
    out.lm_loss.backward()
    torch.testing.assert_close(out.lm_loss, ref, atol=1e-5, rtol=1e-5)
    assert out.loss == out.lm_loss + out.aux_loss and out.aux_loss > 0
    # HF's gradients in its fused layout, mapped like weights, against ours.
    hf_grads = {k: p.grad for k, p in hf.named_parameters()}
    if hf.config.tie_word_embeddings:
        hf_grads["lm_head.weight"] = hf_grads["model.embed_tokens.weight"]
    expected = {k: torch.empty_like(v, device="meta") for k, v in convert.native_to_hf(model.state_dict(), model.config, family).items()}
    want = hf_to_native(check_hf_state(hf_grads, expected, model.config, family, "grads"), model.config, family)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, want[name], atol=2e-5, rtol=1e-4, msg=name)


def test_padding_mask_matches_transformers(tmp_path):
    hf = _hf_model("qwen3_moe")
    model, _ = import_hf(hf)
    ids = torch.randint(1, VOCAB, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[1, 5:] = 0  # right padding
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        ours = model.eval()(ids, attention_mask_BS=mask).logits
    assert torch.isfinite(ours).all()
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], ref[keep], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
def test_padding_is_not_routed_and_the_balance_loss_is_transformers(family):
    # transformers leaves padding out of its balance loss (attention_mask); we route only the real
    # tokens, so with one MoE layer the two losses agree, and what sits in the padding changes nothing.
    hf = _hf_model(family, num_hidden_layers=1)
    model, _ = import_hf(hf)
    model.eval()
    ids = torch.randint(1, VOCAB, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, labels=labels, output_router_logits=True).aux_loss
        ours = model(ids, attention_mask_BS=mask, labels_BS=labels)
        repadded = model(ids.masked_fill(mask == 0, 5), attention_mask_BS=mask, labels_BS=labels)
    assert all(r.experts_TK.shape[0] == int(mask.sum()) for r in ours.routings)
    torch.testing.assert_close(ours.aux_loss, (want * hf.config.router_aux_loss_coef).float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(repadded.aux_loss, ours.aux_loss, atol=0, rtol=0)
    torch.testing.assert_close(repadded.logits[mask.bool()], ours.logits[mask.bool()], atol=0, rtol=0)


def test_sliding_window_matches_transformers():
    ids = torch.randint(0, VOCAB, (2, 8))
    hf = _hf_model("mixtral", sliding_window=3)
    model, _ = import_hf(hf)
    assert model.config.sliding_window == 3
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)
        full, _ = import_hf(_hf_model("mixtral"))
        assert not torch.allclose(full.eval()(ids).logits, hf(ids).logits, atol=1e-3)
    # Qwen2-MoE windows only some layers (layer_types): here layer 0, not layer 1.
    hf = _hf_model("qwen2_moe", use_sliding_window=True, sliding_window=3, max_window_layers=1)
    model, _ = import_hf(hf)
    assert model.config.full_attention_layers == [1]
    assert model.config.to_hf("qwen2_moe").layer_types == hf.config.layer_types == ["sliding_attention", "full_attention"]
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_fused_in_memory_layout_and_sharded_folder_give_the_same_model(tmp_path):
    hf = _hf_model("mixtral")
    state = hf.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in state  # transformers 5 holds experts fused
    from_memory, _ = import_hf(state, hf.config)
    folder = _saved(tmp_path, hf, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    from_disk, _ = import_hf(folder)
    mem, disk = from_memory.state_dict(), from_disk.state_dict()
    assert all(torch.equal(mem[k], disk[k]) for k in disk)
    # An in-memory import owns its tensors: training it leaves the source alone.
    with torch.no_grad():
        from_memory.layers[0].attn.q_proj.weight.add_(1.0)
    assert torch.equal(hf.model.layers[0].self_attn.q_proj.weight, state["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(from_memory.layers[0].attn.q_proj.weight, hf.model.layers[0].self_attn.q_proj.weight)

    shard = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]["lm_head.weight"]
    (folder / shard).unlink()
    with pytest.raises(FileNotFoundError, match=shard):
        import_hf(folder)


def test_missing_unexpected_and_misshaped_tensors_are_refused_with_their_lists(tmp_path):
    hf = _hf_model("qwen2_moe")
    folder = _saved(tmp_path, hf)
    from safetensors.torch import load_file, save_file

    disk = load_file(folder / "model.safetensors")
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in disk  # on disk: one key per expert
    del disk["model.layers.0.mlp.experts.3.up_proj.weight"]
    del disk["model.layers.1.mlp.down_proj.weight"]
    disk["model.layers.0.mlp.experts.6.up_proj.weight"] = torch.zeros(24, 32)  # a 7th expert of 6
    disk["model.layers.0.self_attn.k_proj.bias"] = torch.zeros(8)
    save_file(disk, folder / "model.safetensors")
    with pytest.raises(HFCheckpointMismatchError) as err:
        import_hf(folder)
    assert err.value.missing == ["model.layers.0.mlp.experts.3.up_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    assert err.value.unexpected == ["model.layers.0.mlp.experts.6.up_proj.weight"]
    assert err.value.mismatched == [("model.layers.0.self_attn.k_proj.bias", (8,), (16,))]
    assert "model.layers.1.mlp.down_proj.weight" in str(err.value)

    state = hf.state_dict()
    state["model.layers.0.mlp.experts.down_proj"] = state["model.layers.0.mlp.experts.down_proj"][:, :, :-1]
    state["model.layers.0.mlp.experts.0.gate_proj.weight"] = torch.zeros(24, 32)  # both layouts in one layer
    with pytest.raises(HFCheckpointMismatchError) as err:
        import_hf(state, hf.config)
    assert err.value.unexpected == ["model.layers.0.mlp.experts.down_proj", "model.layers.0.mlp.experts.gate_up_proj"]
    assert "model.layers.0.mlp.experts.1.gate_proj.weight" in err.value.missing

    # The fused (in-memory) layout: a misshaped fused tensor is mismatched, not also E missing per-expert keys;
    # an absent one is missing under its own name.
    state = dict(hf.state_dict())
    state["model.layers.0.mlp.experts.gate_up_proj"] = state["model.layers.0.mlp.experts.gate_up_proj"][:, :-2]
    del state["model.layers.0.mlp.experts.down_proj"]
    with pytest.raises(HFCheckpointMismatchError) as err:
        import_hf(state, hf.config)
    assert err.value.missing == ["model.layers.0.mlp.experts.down_proj"] and err.value.unexpected == []
    assert [m[0] for m in err.value.mismatched] == ["model.layers.0.mlp.experts.gate_up_proj"]


def test_bf16_checkpoint_round_trips_exactly_and_runs(tmp_path):
    # Expert width 32: transformers runs bf16 experts through torch._grouped_mm, which wants 16-byte strides.
    hf = _hf_model("qwen3_moe", dtype=torch.bfloat16, moe_intermediate_size=32)
    model, _ = import_hf(_saved(tmp_path, hf))
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        logits = model.eval()(ids).logits
        ref = hf(ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    # Same argmax nearly everywhere; bf16 routing near-ties may send a token to another expert.
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() > 0.7
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(export_hf(model, "qwen3_moe", tmp_path / "out"))
    assert reloaded.config.dtype == torch.bfloat16
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in hf.state_dict().items())


def test_convert_cli_round_trip_and_its_errors(tmp_path, capsys):
    hf = _hf_model("olmoe")
    parser = argparse.ArgumentParser()
    convert.add_arguments(parser)
    native = tmp_path / "olmoe.pt"
    assert convert.run_from_args(parser.parse_args(["--from-hf", str(_saved(tmp_path, hf)), "--out", str(native)])) == 0
    printed = capsys.readouterr().out
    assert f"{hf.num_parameters():,} parameters" in printed and "read" in printed
    assert convert.run_from_args(parser.parse_args(["--to-hf", str(native), "--out", str(tmp_path / "back")])) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back")
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in hf.state_dict().items())

    # OLMoE's whole-projection q/k norm has no place in Mixtral: refused, naming it.
    code = convert.run_from_args(parser.parse_args(["--to-hf", str(native), "--family", "mixtral", "--out", str(tmp_path / "m")]))
    assert code == 2 and "qk_norm = 'whole'" in capsys.readouterr().err
    code = convert.run_from_args(parser.parse_args(["--to-hf", str(native), "--out", str(tmp_path / "back")]))
    assert code == 2 and "not empty" in capsys.readouterr().err
    # --out an existing file; a folder whose model_type transformers does not know: named, exit 2.
    code = convert.run_from_args(parser.parse_args(["--to-hf", str(native), "--out", str(native)]))
    assert code == 2 and "olmoe.pt is a file; --to-hf writes a folder" in capsys.readouterr().err
    code = convert.run_from_args(parser.parse_args(["--to-hf", str(native), "--out", str(native / "sub")]))
    assert code == 2 and f"{native} is a file, so the folder" in capsys.readouterr().err
    # --from-hf to an existing folder, or below a file: refused before any reading, nothing left behind.
    for out, message in ((tmp_path / "back", "is a folder; --from-hf writes one file"),
                         (native / "x.pt", f"{native} is a file, so the folder")):
        code = convert.run_from_args(parser.parse_args(["--from-hf", str(tmp_path / "missing"), "--out", str(out)]))
        assert code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.glob("*.tmp"))
    weird = tmp_path / "weird"
    weird.mkdir()
    (weird / "config.json").write_text('{"model_type": "not_a_model"}')
    code = convert.run_from_args(parser.parse_args(["--from-hf", str(weird), "--out", str(tmp_path / "w.pt")]))
    err = capsys.readouterr().err
    assert code == 2 and "model_type = 'not_a_model': transformers" in err and "mixtral, qwen2_moe, qwen3_moe, olmoe" in err


def test_native_file_round_trip_and_refusal(tmp_path):
    model, family = import_hf(_hf_model("mixtral"))
    path = save_native(model, family, tmp_path / "m.pt")
    loaded, loaded_family = load_native(path)
    assert loaded_family == "mixtral" and loaded.config == model.config
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    payload = torch.load(path, weights_only=True)
    del payload["model"]["layers.1.mlp.router.weight"]
    torch.save(payload, path)
    with pytest.raises(HFCheckpointMismatchError, match="layers.1.mlp.router.weight"):
        load_native(path)


def test_native_file_with_a_misshaped_tensor_is_refused_with_its_shapes(tmp_path):
    model, family = import_hf(_hf_model("mixtral"))
    path = save_native(model, family, tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    payload["model"]["layers.0.mlp.router.weight"] = torch.zeros(4, 40)  # 4 experts' rows in a 5-expert model
    torch.save(payload, path)
    with pytest.raises(HFCheckpointMismatchError) as err:
        load_native(path)
    assert err.value.mismatched == [("layers.0.mlp.router.weight", (4, 40), (5, 40))]
    assert err.value.missing == [] and err.value.unexpected == []


def test_native_file_loads_in_the_dtype_asked_for(tmp_path):
    model, family = import_hf(_hf_model("mixtral"))
    path = save_native(model, family, tmp_path / "m.pt")
    loaded, _ = load_native(path, dtype=torch.bfloat16)
    state = model.state_dict()
    for key, value in loaded.state_dict().items():
        assert value.dtype == torch.bfloat16, key
        assert torch.equal(value, state[key].to(torch.bfloat16)), key


def test_a_key_in_two_shards_is_refused_by_name(tmp_path):
    """Shards without an index (every *.safetensors is read): a tensor in two of them is an error, not last-one-wins."""
    from safetensors.torch import save_file

    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({"model.norm.weight": torch.ones(4), "lm_head.weight": torch.ones(2, 4)}, str(folder / "a.safetensors"))
    save_file({"model.norm.weight": torch.zeros(4)}, str(folder / "b.safetensors"))
    with pytest.raises(HFCheckpointMismatchError, match=r"model.norm.weight \(twice, again in b.safetensors\)"):
        convert.read_safetensors(folder)


def test_export_over_a_sharded_folder_leaves_no_stale_index(tmp_path):
    """export_hf(overwrite=True) into a folder holding a sharded checkpoint: the old index would send readers to the
    old shards; reading the folder back must give the exported model."""
    old = _hf_model("mixtral")
    folder = _saved(tmp_path, old, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    model, _ = import_hf(_hf_model("mixtral", intermediate_size=20))  # other widths than the old shards
    export_hf(model, "mixtral", folder, overwrite=True)
    assert not (folder / "model.safetensors.index.json").exists()
    back, _ = import_hf(folder)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


def test_configs_moe_engine_cannot_run_or_a_family_cannot_hold_are_refused():
    with pytest.raises(ConfigError, match="rope_type"):
        MoECausalLMConfig.from_hf(_hf_config("mixtral", rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}))
    with pytest.raises(ConfigError, match="hidden_act"):
        MoECausalLMConfig.from_hf(_hf_config("qwen3_moe", hidden_act="gelu"))
    with pytest.raises(ConfigError, match="model_type"):
        MoECausalLMConfig.from_hf(transformers.LlamaConfig())
    qwen2 = MoECausalLMConfig.from_hf(_hf_config("qwen2_moe", decoder_sparse_step=2, mlp_only_layers=[]))
    assert qwen2.dense_layers == [0] and qwen2.moe_layer_ids == [1]
    with pytest.raises(ConfigError) as err:
        qwen2.to_hf("mixtral")
    assert "dense_layers" in str(err.value) and "shared expert" in str(err.value) and "renormalize" in str(err.value)
    with pytest.raises(ConfigError, match="top_k"):
        MoECausalLMConfig.from_dict({**qwen2.to_dict(), "top_k": 7})
