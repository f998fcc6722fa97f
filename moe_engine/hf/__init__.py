"""Hugging Face MoE language models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) as moe_engine models.

`MoECausalLM` computes what transformers' models compute, from moe_engine's router, dispatcher and
grouped experts; `import_hf` / `export_hf` move checkpoints between the two, exactly.
`register_experts_implementation()` lets transformers' own MoE models run their experts on
moe_engine's kernels (`experts_implementation="moe_engine"`), with no conversion.
"""

from moe_engine.hf.causal_lm import CausalLMOutput, MoECausalLM
from moe_engine.hf.config import FAMILIES, MoECausalLMConfig, hf_family
from moe_engine.hf.convert import (
    export_hf,
    import_hf,
    import_hf_state,
    load_native,
    read_hf_folder,
    read_safetensors,
    save_native,
)
from moe_engine.hf.experts_interface import (
    ExpertsLayout,
    experts_layout,
    moe_engine_experts_forward,
    register_experts_implementation,
    resolve_impl,
)
from moe_engine.hf.state import HFCheckpointMismatchError, check_hf_state, hf_to_native, native_to_hf

__all__ = [
    "FAMILIES",
    "CausalLMOutput",
    "ExpertsLayout",
    "HFCheckpointMismatchError",
    "MoECausalLM",
    "MoECausalLMConfig",
    "check_hf_state",
    "experts_layout",
    "export_hf",
    "hf_family",
    "hf_to_native",
    "import_hf",
    "import_hf_state",
    "load_native",
    "moe_engine_experts_forward",
    "native_to_hf",
    "read_hf_folder",
    "read_safetensors",
    "register_experts_implementation",
    "resolve_impl",
    "save_native",
]
