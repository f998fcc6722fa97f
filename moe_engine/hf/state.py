"""State dicts between moe_engine's `MoECausalLM` and Hugging Face's checkpoint keys.

Hugging Face layouts (transformers 5.x; see ../shared/REFERENCES.md):
- on disk, per expert: Mixtral `model.layers.L.block_sparse_moe.experts.N.{w1,w2,w3}.weight`
  (w1 gate, w3 up, w2 down) and router `block_sparse_moe.gate.weight`; Qwen2-MoE, Qwen3-MoE and
  OLMoE `model.layers.L.mlp.experts.N.{gate_proj,up_proj,down_proj}.weight`, router `mlp.gate.weight`.
- in memory, fused: `model.layers.L.mlp.experts.gate_up_proj` (E, 2F, D), gate rows first, and
  `mlp.experts.down_proj` (E, D, F), router `mlp.gate.weight` (Mixtral too).

`check_hf_state` accepts either layout (per layer) and refuses, with the lists, a state with
tensors missing, unexpected or of the wrong shape; `hf_to_native` then assembles moe_engine's
tensors. `native_to_hf` writes the per-expert disk layout.
Both are pure renames, slices and concatenations: a round trip returns the same bits.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from moe_engine.checkpoint import CheckpointMismatchError
from moe_engine.hf.config import MoECausalLMConfig

# Buffers some older checkpoints carry that no model reads (transformers ignores them too).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_FUSED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


class HFCheckpointMismatchError(CheckpointMismatchError):
    """A checkpoint whose tensors do not match the model its config describes (a ValueError, and
    the CheckpointMismatchError `moe-engine` commands already report as a user error).

    missing: keys the model needs that the checkpoint lacks. unexpected: keys it has that the model
    has no place for. mismatched: (key, shape found, shape expected).
    """

    def __init__(
        self, source: str, missing: list[str], unexpected: list[str], mismatched: list[tuple[str, tuple, tuple]]
    ) -> None:
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {', '.join(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {', '.join(unexpected)}")
        if mismatched:
            cells = ", ".join(f"{k} {list(got)} (expected {list(want)})" for k, got, want in mismatched)
            parts.append(f"{len(mismatched)} of the wrong shape: {cells}")
        super().__init__(f"{source} does not match its config: " + "; ".join(parts))


def _block_names(layer: int, family: str) -> tuple[str, str, str, str]:
    """(key prefix of layer `layer`'s MoE block, gate, up, down names) of the on-disk per-expert keys."""
    if family == "mixtral":
        return f"model.layers.{layer}.block_sparse_moe.", "w1", "w3", "w2"
    return f"model.layers.{layer}.mlp.", "gate_proj", "up_proj", "down_proj"


def _renames(cfg: MoECausalLMConfig, layer: int, family: str) -> dict[str, str]:
    """native -> Hugging Face keys of one layer's tensors that need no reshaping."""
    n, h = f"layers.{layer}.", f"model.layers.{layer}."
    names = {f"{n}input_norm.weight": f"{h}input_layernorm.weight",
             f"{n}post_attn_norm.weight": f"{h}post_attention_layernorm.weight"}
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        names[f"{n}attn.{proj}.weight"] = f"{h}self_attn.{proj}.weight"
        if cfg.o_bias if proj == "o_proj" else cfg.qkv_bias:
            names[f"{n}attn.{proj}.bias"] = f"{h}self_attn.{proj}.bias"
    if cfg.qk_norm != "none":
        names[f"{n}attn.q_norm.weight"] = f"{h}self_attn.q_norm.weight"
        names[f"{n}attn.k_norm.weight"] = f"{h}self_attn.k_norm.weight"
    if layer not in cfg.dense_layers:
        block = _block_names(layer, family)[0]
        names[f"{n}mlp.router.weight"] = f"{block}gate.weight"
        if cfg.shared_expert_gate:
            names[f"{n}mlp.shared_expert_gate.weight"] = f"{block}shared_expert_gate.weight"
    return names


def _split_swiglu(w_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2F, D) [gate; up] -> gate (F, D), up (F, D), each its own storage (safetensors refuses shared)."""
    gate, up = w_in.chunk(2, dim=0)
    return gate.clone(), up.clone()


def native_to_hf(state: Mapping[str, torch.Tensor], cfg: MoECausalLMConfig, family: str) -> dict[str, torch.Tensor]:
    """moe_engine state dict of a whole model (every expert) -> Hugging Face's on-disk per-expert keys."""
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": state["embed_tokens.weight"],
                                    "model.norm.weight": state["norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for layer in range(cfg.num_layers):
        n, h = f"layers.{layer}.", f"model.layers.{layer}."
        for native, hf in _renames(cfg, layer, family).items():
            out[hf] = state[native]
        if layer in cfg.dense_layers:
            out[f"{h}mlp.gate_proj.weight"], out[f"{h}mlp.up_proj.weight"] = _split_swiglu(state[f"{n}mlp.w_in.weight"])
            out[f"{h}mlp.down_proj.weight"] = state[f"{n}mlp.w_out.weight"]
            continue
        block, gate, up, down = _block_names(layer, family)
        w_in, w_out = state[f"{n}mlp.experts.w_in"], state[f"{n}mlp.experts.w_out"]
        if w_in.shape[0] != cfg.num_experts:
            raise ValueError(
                f"{n}mlp.experts.w_in holds {w_in.shape[0]} experts of {cfg.num_experts}: an expert-parallel "
                "shard; gather the whole model (moe_engine.parallel.sharding.canonical_state) before exporting"
            )
        for e in range(cfg.num_experts):
            out[f"{block}experts.{e}.{gate}.weight"], out[f"{block}experts.{e}.{up}.weight"] = _split_swiglu(w_in[e])
            out[f"{block}experts.{e}.{down}.weight"] = w_out[e].clone()
        if cfg.shared_expert_ffn_hidden:
            s = f"{block}shared_expert."
            out[f"{s}gate_proj.weight"], out[f"{s}up_proj.weight"] = _split_swiglu(state[f"{n}mlp.shared_experts.w_in.weight"])
            out[f"{s}down_proj.weight"] = state[f"{n}mlp.shared_experts.w_out.weight"]
    return out


def _unfuse(state: Mapping[str, torch.Tensor], cfg: MoECausalLMConfig, family: str,
            mismatched: list[tuple[str, tuple, tuple]], fused: dict[int, set[str]]) -> dict[str, torch.Tensor]:
    """`state` with transformers-5 in-memory keys rewritten to the on-disk per-expert ones (views).

    A fused tensor of the wrong shape goes to `mismatched` and is dropped; a fused tensor for a
    dense layer or beside the same layer's per-expert keys stays as it is, to be reported unexpected.
    fused: filled with {layer: the fused kinds it came with} (for `_fused_missing`).
    """
    E, F, D = cfg.num_experts, cfg.moe_ffn_hidden, cfg.hidden_size
    out = dict(state)
    for key, tensor in state.items():
        match = _FUSED.match(key)
        if match is None:
            continue
        layer, kind = int(match.group(1)), match.group(2)
        if layer in cfg.dense_layers or not 0 <= layer < cfg.num_layers:
            continue
        block, gate, up, down = _block_names(layer, family)
        per_expert = re.compile(re.escape(f"{block}experts.") + r"\d+\.")
        if any(per_expert.match(k) for k in state):
            continue  # both layouts for one layer: the fused key is reported unexpected
        want = (E, 2 * F, D) if kind == "gate_up_proj" else (E, D, F)
        fused.setdefault(layer, set()).add(kind)
        del out[key]
        if tuple(tensor.shape) != want:
            mismatched.append((key, tuple(tensor.shape), want))
            continue
        for e in range(E):
            if kind == "gate_up_proj":
                out[f"{block}experts.{e}.{gate}.weight"], out[f"{block}experts.{e}.{up}.weight"] = tensor[e].chunk(2, dim=0)
            else:
                out[f"{block}experts.{e}.{down}.weight"] = tensor[e]
    if family == "mixtral":  # in memory, Mixtral's router sits under mlp. like the others'
        for layer in cfg.moe_layer_ids:
            fused_gate, disk_gate = f"model.layers.{layer}.mlp.gate.weight", f"model.layers.{layer}.block_sparse_moe.gate.weight"
            if fused_gate in out and disk_gate not in out:
                out[disk_gate] = out.pop(fused_gate)
    return out


def check_hf_state(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], cfg: MoECausalLMConfig, family: str,
    source: str,
) -> dict[str, torch.Tensor]:
    """`state` in the per-expert layout after checking it against `expected` (key -> tensor of the
    expected shape, e.g. on the meta device); HFCheckpointMismatchError with every difference."""
    mismatched: list[tuple[str, tuple, tuple]] = []
    fused: dict[int, set[str]] = {}
    state = _unfuse(state, cfg, family, mismatched, fused)
    state = {k: v for k, v in state.items() if not k.endswith(IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings and "lm_head.weight" in state and "model.embed_tokens.weight" in state:
        # A tied checkpoint may still carry the output projection; only a copy of the embedding fits.
        if torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
            del state["lm_head.weight"]
    missing = sorted(set(expected) - set(state), key=_natural)
    unexpected = sorted(set(state) - set(expected), key=_natural)
    mismatched += [
        (k, tuple(state[k].shape), tuple(expected[k].shape))
        for k in sorted(set(state) & set(expected), key=_natural)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    missing = _fused_missing(missing, fused, cfg, family)
    if missing or unexpected or mismatched:
        raise HFCheckpointMismatchError(source, missing, unexpected, mismatched)
    return state


def _fused_missing(missing: list[str], fused: dict[int, set[str]], cfg: MoECausalLMConfig, family: str) -> list[str]:
    """The missing keys as the checkpoint would name them: for a layer given in the fused layout, a
    fused tensor reported mismatched is not also missing as per-expert keys, and an absent fused
    tensor is missing under its own name, not as E per-expert keys."""
    missing_set = set(missing)
    for layer, kinds in fused.items():
        block, gate, up, down = _block_names(layer, family)
        experts = range(cfg.num_experts)
        produced = {
            "gate_up_proj": [f"{block}experts.{e}.{name}.weight" for e in experts for name in (gate, up)],
            "down_proj": [f"{block}experts.{e}.{down}.weight" for e in experts],
        }
        for kind, keys in produced.items():
            if kind in kinds:
                missing_set -= set(keys)
            elif set(keys) <= missing_set:
                missing_set -= set(keys)
                missing_set.add(f"model.layers.{layer}.mlp.experts.{kind}")
    return sorted(missing_set, key=_natural)


def hf_to_native(state: Mapping[str, torch.Tensor], cfg: MoECausalLMConfig, family: str) -> dict[str, torch.Tensor]:
    """A checked per-expert Hugging Face state (see `check_hf_state`) -> moe_engine state dict
    of the whole model (every expert; slice it with moe_engine.parallel.sharding for EP ranks)."""
    out = {"embed_tokens.weight": state["model.embed_tokens.weight"], "norm.weight": state["model.norm.weight"]}
    out["lm_head.weight"] = state["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
    for layer in range(cfg.num_layers):
        n, h = f"layers.{layer}.", f"model.layers.{layer}."
        for native, hf in _renames(cfg, layer, family).items():
            out[native] = state[hf]
        if layer in cfg.dense_layers:
            out[f"{n}mlp.w_in.weight"] = torch.cat([state[f"{h}mlp.gate_proj.weight"], state[f"{h}mlp.up_proj.weight"]])
            out[f"{n}mlp.w_out.weight"] = state[f"{h}mlp.down_proj.weight"]
            continue
        block, gate, up, down = _block_names(layer, family)
        experts = range(cfg.num_experts)
        out[f"{n}mlp.experts.w_in"] = torch.stack([
            torch.cat([state[f"{block}experts.{e}.{gate}.weight"], state[f"{block}experts.{e}.{up}.weight"]])
            for e in experts
        ])
        out[f"{n}mlp.experts.w_out"] = torch.stack([state[f"{block}experts.{e}.{down}.weight"] for e in experts])
        if cfg.shared_expert_ffn_hidden:
            s = f"{block}shared_expert."
            out[f"{n}mlp.shared_experts.w_in.weight"] = torch.cat([state[f"{s}gate_proj.weight"], state[f"{s}up_proj.weight"]])
            out[f"{n}mlp.shared_experts.w_out.weight"] = state[f"{s}down_proj.weight"]
    return out


def _natural(key: str) -> list:
    """Sort key that puts layers.10 after layers.9."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]
