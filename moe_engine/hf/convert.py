"""Hugging Face checkpoints in and out of moe_engine, and `moe-engine convert`.

    moe-engine convert --from-hf HF_DIR --out OUT.pt          HF folder -> moe_engine file
    moe-engine convert --to-hf IN.pt [--family F] --out HF_DIR  moe_engine file -> HF folder

An HF folder is config.json and model.safetensors, or shards named by model.safetensors.index.json,
all local. `import_hf` also takes a state dict in transformers 5's fused in-memory layout (with its
config) or a loaded transformers model. A moe_engine file is one torch file: the family, the
`MoECausalLMConfig` and the state dict (`save_native` / `load_native`).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any, Mapping

import torch
from packaging.version import Version
from torch import nn

from moe_engine.checkpoint import CheckpointMismatchError
from moe_engine.config import ConfigError
from moe_engine.hf.causal_lm import MoECausalLM
from moe_engine.hf.config import FAMILIES, MoECausalLMConfig, hf_family
from moe_engine.hf.state import HFCheckpointMismatchError, check_hf_state, hf_to_native, native_to_hf

NATIVE_FORMAT = "moe_engine.hf.MoECausalLM"
NATIVE_VERSION = 1
ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_safetensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a local HF folder: the shards model.safetensors.index.json names, else
    model.safetensors, else every *.safetensors file. FileNotFoundError naming what is absent."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        absent = [n for n in names if not (folder / n).is_file()]
        if absent:
            raise FileNotFoundError(f"{index} names shards that are not in {folder}: {', '.join(absent)}")
        files = [folder / n for n in names]
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{folder} holds no *.safetensors files (PyTorch .bin checkpoints are not read: "
            "re-save them with transformers' save_pretrained first)"
        )
    state: dict[str, torch.Tensor] = {}
    for path in files:
        shard = load_file(str(path))
        repeated = sorted(set(shard) & set(state))
        if repeated:
            raise HFCheckpointMismatchError(str(folder), [], [f"{k} (twice, again in {path.name})" for k in repeated], [])
        state.update(shard)
    return state


def _meta_model(cfg: MoECausalLMConfig) -> MoECausalLM:
    """The model with its tensors on the meta device: shapes without memory or initialisation."""
    with torch.device("meta"):
        return MoECausalLM(cfg)


def _load_into(model: MoECausalLM, state: dict[str, torch.Tensor]) -> MoECausalLM:
    """Assign `state` (checked, native keys) to a meta-built model; re-tie the embedding."""
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    return model


def read_hf_folder(folder: str | Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """(transformers config, every tensor) of a local Hugging Face model folder."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    return hf_config_of(folder), read_safetensors(folder)


def hf_config_of(folder: str | Path) -> Any:
    """transformers' config of a local model folder; ConfigError naming its model_type when
    transformers cannot build it."""
    import transformers

    folder = Path(folder)
    try:
        return transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (ValueError, KeyError) as err:  # a model_type this transformers does not know, or a malformed config
        try:
            model_type = json.loads((folder / "config.json").read_text()).get("model_type")
        except (ValueError, AttributeError):
            model_type = None
        raise ConfigError(
            f"{folder / 'config.json'}: model_type = {model_type!r}: transformers {transformers.__version__} cannot "
            f"build its config ({type(err).__name__}); moe_engine imports {', '.join(FAMILIES)}"
        ) from err


def import_hf(
    source: str | Path | Mapping[str, torch.Tensor] | nn.Module,
    hf_config: Any = None,
    *,
    dtype: torch.dtype | None = None,
    experts_impl: str | None = None,
) -> tuple[MoECausalLM, str]:
    """A Hugging Face Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE checkpoint as (MoECausalLM, family).

    source: a local folder (config.json + safetensors), a state dict (on-disk per-expert keys or
    transformers 5's fused `experts.gate_up_proj` / `experts.down_proj`; needs `hf_config`), or a
    loaded transformers model (its state dict and config). dtype: cast every tensor to it; None
    keeps each tensor's own. experts_impl: moe_engine's expert GEMM ("auto", "loop", ...).
    Tensors of an in-memory source are copied, never shared with it.
    Raises HFCheckpointMismatchError listing missing, unexpected and wrongly shaped tensors, and
    ConfigError for a config moe_engine cannot run, both before any weights are copied.
    """
    if isinstance(source, nn.Module):
        hf_config = hf_config if hf_config is not None else getattr(source, "config", None)
        return import_hf_state(source.state_dict(), hf_config, type(source).__name__, dtype=dtype,
                               experts_impl=experts_impl, copy=True)
    if isinstance(source, Mapping):
        return import_hf_state(source, hf_config, "state dict", dtype=dtype, experts_impl=experts_impl, copy=True)
    hf_config, state = read_hf_folder(source)
    return import_hf_state(state, hf_config, str(source), dtype=dtype, experts_impl=experts_impl, copy=False)


def import_hf_state(
    state: Mapping[str, torch.Tensor],
    hf_config: Any,
    label: str,
    *,
    dtype: torch.dtype | None = None,
    experts_impl: str | None = None,
    copy: bool = True,
) -> tuple[MoECausalLM, str]:
    """`import_hf` of a state dict and its transformers config; `label` names the source in errors.
    copy=False lets the model keep the tensors it can use as they are (a state read from files)."""
    if hf_config is None:
        raise ValueError("import_hf: a state dict needs its hf_config (a transformers config object)")
    family = hf_family(hf_config)
    cfg = MoECausalLMConfig.from_hf(hf_config)
    if experts_impl is not None:
        cfg = MoECausalLMConfig.from_dict({**cfg.to_dict(), "experts_impl": experts_impl})
    model = _meta_model(cfg)
    expected = native_to_hf(model.state_dict(), cfg, family)
    checked = check_hf_state(state, expected, cfg, family, label)
    native = hf_to_native(checked, cfg, family)
    native = {k: v.detach().to(dtype=dtype or v.dtype, copy=copy) for k, v in native.items()}
    return _load_into(model, native), family


def export_hf(
    model: MoECausalLM, family: str, out_dir: str | Path, *, dtype: torch.dtype | None = None, overwrite: bool = False
) -> Path:
    """Write `model` as a Hugging Face `family` folder: config.json and model.safetensors in the
    on-disk per-expert layout, which transformers' AutoModelForCausalLM.from_pretrained loads.
    dtype: cast every tensor to it (None keeps the model's). ConfigError if `family` cannot express
    the model; FileExistsError for a non-empty out_dir unless overwrite."""
    import transformers
    from safetensors.torch import save_file

    hf_config = model.config.to_hf(family)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file; --to-hf writes a folder (config.json + model.safetensors): choose another path")
    _check_no_file_above(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty; choose another folder or pass overwrite=True (--overwrite)")
    state = native_to_hf(model.state_dict(), model.config, family)
    state = {k: v.detach().to(dtype=dtype or v.dtype).contiguous().cpu() for k, v in state.items()}
    hf_config.architectures = [ARCHITECTURES[family]]
    written = str(dtype or state["model.embed_tokens.weight"].dtype).removeprefix("torch.")
    setattr(hf_config, "dtype" if Version(transformers.__version__) >= Version("5") else "torch_dtype", written)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("model.safetensors.index.json",):
        (out_dir / stale).unlink(missing_ok=True)
    hf_config.save_pretrained(str(out_dir))
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


def check_native_out(path: str | Path) -> Path:
    """`path` as a Path if one file can be written there; FileExistsError naming it if it is a folder or
    if a file stands where one of its parent folders would go."""
    path = Path(path)
    if path.is_dir():
        raise FileExistsError(f"--out {path} is a folder; --from-hf writes one file (e.g. {path / 'model.pt'})")
    _check_no_file_above(path)
    return path


def _check_no_file_above(path: Path) -> None:
    """FileExistsError naming `path` if a file stands where one of its parent folders would be made."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise FileExistsError(f"--out {path}: {parent} is a file, so the folder {path.parent} cannot be made")
            return


def save_native(model: MoECausalLM, family: str, path: str | Path) -> Path:
    """One torch file with the family, the config and the whole state dict (written atomically)."""
    path = check_native_out(path)
    if family not in FAMILIES:
        raise ConfigError(f"family = {family!r}: allowed: {', '.join(FAMILIES)}")
    if any(moe.experts.num_experts != model.config.num_experts for moe in model.moe_layers):
        raise ValueError("save_native: the model holds an expert-parallel shard; gather the whole model first")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": NATIVE_FORMAT, "version": NATIVE_VERSION, "family": family,
               "config": model.config.to_dict(), "model": model.state_dict()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_native(
    path: str | Path, *, dtype: torch.dtype | None = None, experts_impl: str | None = None
) -> tuple[MoECausalLM, str]:
    """(model, family) from a `save_native` file; HFCheckpointMismatchError if its tensors do not fit its config."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError) as err:
        raise CheckpointMismatchError(
            f"{path} is not a moe_engine converted model (torch.load: {type(err).__name__})"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != NATIVE_FORMAT:
        raise CheckpointMismatchError(f"{path} is not a moe_engine converted model (written by `moe-engine convert --from-hf`)")
    if payload.get("version") != NATIVE_VERSION:
        raise CheckpointMismatchError(f"{path} has format version {payload.get('version')!r}; this moe_engine reads {NATIVE_VERSION}")
    config = dict(payload["config"])
    if experts_impl is not None:
        config["experts_impl"] = experts_impl
    cfg = MoECausalLMConfig.from_dict(config)
    model = _meta_model(cfg)
    expected, state = model.state_dict(), payload["model"]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
                  if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise HFCheckpointMismatchError(str(path), missing, unexpected, mismatched)
    state = {k: v.to(dtype=dtype or v.dtype) for k, v in state.items()}
    return _load_into(model, state), payload["family"]


# ---------------------------------------------------------------------------------------------
# moe-engine convert
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `moe-engine convert`."""
    way = parser.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-hf", metavar="HF_DIR", help="a local Hugging Face folder (config.json + *.safetensors)")
    way.add_argument("--to-hf", metavar="IN.pt", help="a moe_engine file written by `convert --from-hf`")
    parser.add_argument("--out", required=True, metavar="PATH", help="the moe_engine file (--from-hf) or HF folder (--to-hf) to write")
    parser.add_argument("--family", choices=FAMILIES, help="--to-hf: the Hugging Face family to write (default: the one imported)")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="cast the tensors (auto: keep theirs)")
    parser.add_argument("--overwrite", action="store_true", help="--to-hf: write into a non-empty folder")


def _describe(model: MoECausalLM, family: str) -> str:
    cfg = model.config
    return (
        f"{family}: {model.num_parameters():,} parameters, {cfg.num_layers} layers "
        f"({len(cfg.moe_layer_ids)} MoE, {cfg.num_experts} experts, top-{cfg.top_k}), width {cfg.hidden_size}"
    )


def run_from_args(args: argparse.Namespace) -> int:
    """`moe-engine convert`; 0 on success, 2 (with one line on stderr) for an error a user can fix."""
    from safetensors import safe_open

    dtype = None if args.dtype == "auto" else DTYPES[args.dtype]
    try:
        if args.from_hf is not None:
            if args.family is not None:
                raise ConfigError("--family applies to --to-hf; --from-hf reads the family from config.json")
            check_native_out(args.out)  # before the work of reading and converting
            hf_config, state = read_hf_folder(args.from_hf)
            print(f"read {len(state)} tensors from {args.from_hf} ({hf_config.model_type})")
            model, family = import_hf_state(state, hf_config, args.from_hf, dtype=dtype, copy=False)
            del state
            print(f"converted to moe_engine: {len(model.state_dict())} tensors; {_describe(model, family)}")
            print(f"wrote {save_native(model, family, args.out)}")
        else:
            model, family = load_native(args.to_hf, dtype=dtype)
            family = args.family or family
            print(f"read {args.to_hf}: {_describe(model, family)}")
            out = export_hf(model, family, args.out, overwrite=args.overwrite)
            with safe_open(str(out / "model.safetensors"), "pt") as written:
                tensors = len(list(written.keys()))
            print(f"wrote {tensors} tensors as {ARCHITECTURES[family]} to {out}")
    except (CheckpointMismatchError, ConfigError, FileNotFoundError, FileExistsError) as err:
        print(f"moe-engine convert: error: {err}", file=sys.stderr)
        return 2
    return 0
