"""moe_engine as a transformers experts implementation (moe_engine/hf/experts_interface.py).

Tiny random HF MoE models (fp32, 2 layers, top-2) with experts_implementation="moe_engine" must give the
logits and the gradients of every parameter of the same model on "eager", on each path our forward takes:
torch._grouped_mm (16-byte-aligned widths), the matmul loop (widths that are not), and the Triton kernels
under the interpreter. The experts module is also called directly with routings a router never makes:
sentinel ids (a token routed to no expert), experts with no tokens, one token and none.
"""

from __future__ import annotations

import inspect
from unittest import mock

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moe_engine.hf import experts_interface as hf_experts  # noqa: E402
from moe_engine.hf.experts_interface import (  # noqa: E402
    experts_layout,
    moe_engine_experts_forward,
    register_experts_implementation,
)

NAME = "moe_engine"
VOCAB = 48
ATTN = dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

# (config class, kwargs): hidden 32 or 64, 2 layers, 4-8 experts, top-2. The expert widths F pick the torch path
# on CPU: torch._grouped_mm where F * 4 bytes is a multiple of 16 (F = 48, 24, 16, 32), the loop where not (30, 26).
FAMILIES = {
    "mixtral": ("MixtralConfig", dict(hidden_size=32, intermediate_size=48, num_local_experts=6, **ATTN)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(hidden_size=32, intermediate_size=40, moe_intermediate_size=30,
                                         shared_expert_intermediate_size=24, num_experts=8, decoder_sparse_step=1,
                                         norm_topk_prob=False, **ATTN)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(hidden_size=32, intermediate_size=40, moe_intermediate_size=24, num_experts=5,
                                         head_dim=8, norm_topk_prob=True, **ATTN)),
    "olmoe": ("OlmoeConfig", dict(hidden_size=64, intermediate_size=26, num_experts=4, **ATTN)),
    "deepseek_v3": ("DeepseekV3Config", dict(
        hidden_size=32, intermediate_size=40, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
        first_k_dense_replace=0, n_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
        v_head_dim=8, qk_nope_head_dim=8, **dict(ATTN, num_key_value_heads=4))),
    # Not a target family, but the one whose layout differs in every way the interface describes:
    # transposed weights, biases, an interleaved clamped gate (_apply_gate).
    "gpt_oss": ("GptOssConfig", dict(hidden_size=32, intermediate_size=32, num_local_experts=4, head_dim=8,
                                     sliding_window=8, layer_types=["sliding_attention", "full_attention"], **ATTN)),
}
FAMILY_ROWS = [
    pytest.param("mixtral", id="mixtral-grouped_mm"),
    pytest.param("qwen2_moe", id="qwen2_moe-loop_F30_shared_expert"),
    pytest.param("qwen3_moe", id="qwen3_moe-grouped_mm_E5_prime"),
    pytest.param("olmoe", id="olmoe-loop_F26"),
    pytest.param("deepseek_v3", id="deepseek_v3-group_limited_sigmoid"),
    pytest.param("gpt_oss", id="gpt_oss-transposed_bias_custom_gate"),
]


@pytest.fixture(autouse=True, scope="module")
def registered() -> None:
    assert register_experts_implementation() == NAME


@pytest.fixture
def triton_kernels(monkeypatch) -> None:
    """MOE_ENGINE_KERNELS=triton for CPU tensors: Triton's interpreter (tests/conftest.py sets it without CUDA)."""
    from moe_engine.kernels._triton import TRITON_AVAILABLE, interpreting

    if not (TRITON_AVAILABLE and interpreting()):
        pytest.skip("CPU tensors on Triton need its interpreter; on CUDA, test_cuda_bf16_triton_matches_eager covers it")
    monkeypatch.setenv("MOE_ENGINE_KERNELS", "triton")


def impl_of(experts) -> str:
    """The torch path our forward takes on CPU fp32 for this experts module (MOE_ENGINE_KERNELS=torch)."""
    layout = experts_layout(experts)
    dims = (layout.w_in_EHD.shape[2], layout.w_out_EDF.shape[2], layout.w_in_EHD.shape[1])
    return hf_experts.resolve_impl(torch.device("cpu"), torch.float32, dims)


def make_config(family: str, num_layers: int = 2, **overrides):
    class_name, kwargs = FAMILIES[family]
    config_class = getattr(transformers, class_name, None)
    if config_class is None:
        pytest.skip(f"transformers {transformers.__version__} has no {class_name}")
    # A wide init so the experts move the logits well above the tolerance.
    kwargs = dict(kwargs, vocab_size=VOCAB, num_hidden_layers=num_layers, num_experts_per_tok=2,
                  initializer_range=0.2, **overrides)
    return config_class(**kwargs)


def build_model(config, implementation: str = "eager"):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        config, experts_implementation=implementation, attn_implementation="eager"
    )
    return model.float().train()


def logits_and_grads(model, input_ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids, labels=input_ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def assert_matches_eager(model, input_ids, rtol=1e-5, atol=1e-5, name=NAME) -> None:
    """Our logits and every parameter's gradient (implementation `name`) equal eager's on the same model."""
    model.set_experts_implementation("eager")
    logits_ref, grads_ref = logits_and_grads(model, input_ids)
    model.set_experts_implementation(name)
    with mock.patch.object(hf_experts, "expert_order", wraps=hf_experts.expert_order) as ours:
        logits, grads = logits_and_grads(model, input_ids)
    assert ours.call_count == model.config.num_hidden_layers  # our forward ran, once per MoE layer
    torch.testing.assert_close(logits, logits_ref, rtol=rtol, atol=atol)
    assert grads.keys() == grads_ref.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, grad_ref in grads_ref.items():
        torch.testing.assert_close(grads[name], grad_ref, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    expert_grads = [g for n, g in grads.items() if "experts" in n]
    assert expert_grads and all(g.abs().max() > 1e-3 for g in expert_grads)  # the experts did matter


def moe_experts_modules(model):
    return [m for m in model.modules() if isinstance(getattr(m, "down_proj", None), torch.Tensor)]


# ------------------------------------------------------------------- whole models against eager


@pytest.mark.parametrize("family", FAMILY_ROWS)
def test_model_logits_and_gradients_match_eager(family, monkeypatch) -> None:
    monkeypatch.setenv("MOE_ENGINE_KERNELS", "torch")
    model = build_model(make_config(family))
    experts = moe_experts_modules(model)
    assert len(experts) == 2
    assert impl_of(experts[0]) == ("loop" if family in ("qwen2_moe", "olmoe") else "grouped_mm")
    input_ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    assert_matches_eager(model, input_ids)


def test_from_config_runs_ours_and_matches_eager() -> None:
    config = make_config("mixtral")
    ours, eager = build_model(config, NAME), build_model(make_config("mixtral"), "eager")
    assert ours.config._experts_implementation == NAME
    eager.load_state_dict(ours.state_dict())
    input_ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    with mock.patch.object(hf_experts, "expert_order", wraps=hf_experts.expert_order) as called:
        logits, grads = logits_and_grads(ours, input_ids)
    assert called.call_count == 2
    logits_ref, grads_ref = logits_and_grads(eager, input_ids)
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-5)


def test_generate_without_grad_gives_eager_tokens() -> None:
    """Decoding (no grad, one token per step after the prompt) picks the same greedy tokens as eager."""
    model = build_model(make_config("olmoe", num_layers=1)).eval()
    prompt = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(5))
    tokens = {}
    for implementation in ("eager", NAME):
        model.set_experts_implementation(implementation)
        tokens[implementation] = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert tokens[NAME].shape == (2, 8)
    assert torch.equal(tokens[NAME], tokens["eager"])


def test_triton_kernels_match_eager_under_the_interpreter(triton_kernels) -> None:
    """MOE_ENGINE_KERNELS=triton: expert_order, the fused SwiGLU grouped MLP and unpermute (interpreted on CPU)."""
    model = build_model(make_config("mixtral", hidden_size=32, intermediate_size=16, num_local_experts=4))
    assert experts_layout(moe_experts_modules(model)[0]).fused_activation == "swiglu"
    with mock.patch.object(hf_experts, "grouped_mlp_combine_triton", wraps=hf_experts.grouped_mlp_combine_triton) as fused:
        assert_matches_eager(model, torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3)))
    assert fused.call_count == 2


def test_recompute_registration_keeps_no_pre_activation(triton_kernels) -> None:
    """register_experts_implementation(recompute=True): "moe_engine_recompute", the fused op without h kept."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    try:
        name = register_experts_implementation(recompute=True)
        assert name == "moe_engine_recompute" == register_experts_implementation(name, recompute=True)
        assert ALL_EXPERTS_FUNCTIONS[name] is hf_experts.moe_engine_experts_forward_recompute
        with pytest.raises(ValueError, match="already registered"):
            register_experts_implementation(name)  # the plain forward under the recompute name
        with pytest.raises(ValueError, match="recompute = 'yes'"):
            register_experts_implementation(recompute="yes")
        model = build_model(make_config("mixtral", hidden_size=32, intermediate_size=16, num_local_experts=4))
        with mock.patch.object(hf_experts, "grouped_mlp_combine_triton",
                               wraps=hf_experts.grouped_mlp_combine_triton) as fused:
            assert_matches_eager(model, torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3)),
                                 name=name)
        assert fused.call_count == 2 and all(call.kwargs["recompute_h"] for call in fused.call_args_list)
    finally:
        ExpertsInterface._global_mapping.pop("moe_engine_recompute", None)


def test_bf16_autocast_forward_and_backward_run() -> None:
    model = build_model(make_config("qwen3_moe"))
    input_ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    logits = {}
    for implementation in ("eager", NAME):
        model.set_experts_implementation(implementation)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids, labels=input_ids)
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        logits[implementation] = out.logits.float()
    # Both round to bf16 in different places: equal to bf16 precision, not bit for bit.
    torch.testing.assert_close(logits[NAME], logits["eager"], rtol=5e-2, atol=5e-2)


# ------------------------------------------------------------------- the experts module on its own


def mixtral_experts(num_experts=6, hidden=32, ffn=24):
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    config = make_config("mixtral", hidden_size=hidden, intermediate_size=ffn, num_local_experts=num_experts)
    torch.manual_seed(0)
    module = MixtralExperts(config)
    with torch.no_grad():
        module.gate_up_proj.normal_(0, 0.3)
        module.down_proj.normal_(0, 0.3)
    return module


def experts_outputs(module, implementation, x_TD, index_TK, weights_TK) -> dict[str, torch.Tensor]:
    """y and the gradients of x, of every parameter and of the routing weights, for one call of the module."""
    module.config._experts_implementation = implementation
    x = x_TD.clone().requires_grad_(True)
    w = weights_TK.clone().requires_grad_(True)
    names, params = zip(*module.named_parameters())
    y = module(x, index_TK, w)
    grad_y = torch.linspace(-1, 1, y.numel()).view_as(y)
    inputs = [x, *params, w]
    if y.requires_grad:
        grads = torch.autograd.grad(y, inputs, grad_y, allow_unused=True, materialize_grads=True)
    else:  # eager with no tokens returns zeros built from nothing
        grads = [torch.zeros_like(t) for t in inputs]
    return dict(zip(("y", "x", *names, "weights"), (y.detach(), *grads)))


def assert_experts_match_eager(module, x_TD, index_TK, weights_TK) -> dict[str, torch.Tensor]:
    ref = experts_outputs(module, "eager", x_TD, index_TK, weights_TK)
    got = experts_outputs(module, NAME, x_TD, index_TK, weights_TK)
    assert got.keys() == ref.keys()
    for what in ref:
        torch.testing.assert_close(got[what], ref[what], rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")
    return got


def random_routing(num_tokens, num_experts, top_k=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)]
    index_TK = torch.stack(rows) if rows else torch.empty(0, top_k, dtype=torch.int64)
    return index_TK, torch.rand(num_tokens, top_k, generator=gen) + 0.1


@pytest.fixture(params=["torch", "triton"], ids=["torch", "triton-interpreted"])
def backend(request, monkeypatch) -> str:
    if request.param == "triton":
        request.getfixturevalue("triton_kernels")
    else:
        monkeypatch.setenv("MOE_ENGINE_KERNELS", "torch")
    return request.param


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["sentinel_weight0", "ep_sentinels_dropped"])
def test_token_routed_to_no_expert_and_experts_without_tokens(backend, expert_parallel) -> None:
    """Sentinel ids (E, as transformers' EP marks non-local experts) contribute nothing; token 2 has only
    sentinels, so it gets zeros and no gradient; experts 1, 3 and 5 get no rows."""
    module = mixtral_experts(num_experts=6)
    module._is_expert_parallel = expert_parallel
    E = 6
    index_TK = torch.tensor([[0, 2], [4, E], [E, E], [2, 0], [4, 4]])
    weights_TK = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5], [0.2, 0.8], [0.1, 0.9]])
    x_TD = torch.randn(5, 32, generator=torch.Generator().manual_seed(5))
    got = assert_experts_match_eager(module, x_TD, index_TK, weights_TK)
    assert got["y"][2].abs().max() == 0 and got["x"][2].abs().max() == 0
    assert got["weights"][1, 1] == 0 and got["weights"][2].abs().max() == 0
    for idle in (1, 3, 5):
        assert got["gate_up_proj"][idle].abs().max() == 0 and got["down_proj"][idle].abs().max() == 0
    assert got["gate_up_proj"][2].abs().max() > 0


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["sentinel_weight0", "ep_sentinels_dropped"])
def test_negative_ids_contribute_nothing_like_sentinels(backend, expert_parallel) -> None:
    """Ids below 0 are outside [0, E) too: the result and every gradient equal eager's with the sentinel E in
    their place (eager itself cannot index -1). Token 2 has only -1s."""
    module = mixtral_experts(num_experts=6)
    module._is_expert_parallel = expert_parallel
    index_TK = torch.tensor([[0, 2], [4, -1], [-1, -1], [2, 0]])
    weights_TK = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5], [0.2, 0.8]])
    x_TD = torch.randn(4, 32, generator=torch.Generator().manual_seed(10))
    ref = experts_outputs(module, "eager", x_TD, index_TK.masked_fill(index_TK < 0, 6), weights_TK)
    got = experts_outputs(module, NAME, x_TD, index_TK, weights_TK)
    for what in ref:
        torch.testing.assert_close(got[what], ref[what], rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")
    assert got["y"][2].abs().max() == 0 and got["weights"][1, 1] == 0


@pytest.mark.parametrize("num_tokens", [1, 0], ids=["one_token", "no_tokens"])
def test_one_token_and_no_tokens(num_tokens, backend) -> None:
    module = mixtral_experts(num_experts=4, ffn=30)
    index_TK, weights_TK = random_routing(num_tokens, 4, seed=6)
    x_TD = torch.randn(num_tokens, 32, generator=torch.Generator().manual_seed(6))
    y = assert_experts_match_eager(module, x_TD, index_TK, weights_TK)["y"]
    assert y.shape == (num_tokens, 32)


def test_all_tokens_on_one_expert_triton(triton_kernels) -> None:
    module = mixtral_experts(num_experts=5, hidden=32, ffn=16)
    index_TK = torch.tensor([[3, 3]] * 7)  # K = 2 choices of the same expert, all tokens on expert 3
    weights_TK = torch.rand(7, 2, generator=torch.Generator().manual_seed(7))
    x_TD = torch.randn(7, 32, generator=torch.Generator().manual_seed(7))
    assert_experts_match_eager(module, x_TD, index_TK, weights_TK)


def test_gpt_oss_layout_on_triton_grouped_gemm(triton_kernels) -> None:
    """Transposed weights, biases and an interleaved clamped gate: two Triton grouped GEMMs around _apply_gate."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    module = GptOssExperts(make_config("gpt_oss", hidden_size=32, intermediate_size=16, num_local_experts=4))
    torch.manual_seed(8)
    for p in module.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    layout = experts_layout(module)
    assert layout.fused_activation is None and layout.bias_in_EH is not None
    index_TK, weights_TK = random_routing(6, 4, seed=8)
    x_TD = torch.randn(6, 32, generator=torch.Generator().manual_seed(8))
    with mock.patch.object(hf_experts, "grouped_gemm_triton", wraps=hf_experts.grouped_gemm_triton) as gemm:
        assert_experts_match_eager(module, x_TD, index_TK, weights_TK)
    assert gemm.call_count == 2


def _decorator_takes_layout_flags() -> bool:
    from transformers.integrations.moe import use_experts_implementation

    return "has_gate" in inspect.signature(use_experts_implementation).parameters


@pytest.mark.skipif(not _decorator_takes_layout_flags(),
                    reason="this transformers' @use_experts_implementation takes no layout flags (has_gate, has_bias)")
def test_ungated_gelu_experts_with_bias_and_without(backend) -> None:
    """An experts class without a gate (up_proj, exact GELU): fused GELU epilogue without bias, unfused with."""
    from torch import nn
    from transformers.activations import ACT2FN
    from transformers.integrations.moe import use_experts_implementation

    for has_bias in (False, True):
        @use_experts_implementation(has_gate=False, has_bias=has_bias)
        class GeluExperts(nn.Module):
            def __init__(self, config):
                super().__init__()
                E, D, Fh = 4, 32, 16
                self.num_experts = E
                self.up_proj = nn.Parameter(torch.randn(E, Fh, D) * 0.3)
                self.down_proj = nn.Parameter(torch.randn(E, D, Fh) * 0.3)
                if has_bias:
                    self.up_proj_bias = nn.Parameter(torch.randn(E, Fh) * 0.3)
                    self.down_proj_bias = nn.Parameter(torch.randn(E, D) * 0.3)
                self.act_fn = ACT2FN["gelu"]

            def forward(self, hidden_states, top_k_index, top_k_weights):
                out = torch.zeros_like(hidden_states)
                for t in range(hidden_states.shape[0]):
                    for k in range(top_k_index.shape[1]):
                        e = int(top_k_index[t, k])
                        h = hidden_states[t] @ self.up_proj[e].t() + (self.up_proj_bias[e] if has_bias else 0)
                        y = self.act_fn(h) @ self.down_proj[e].t() + (self.down_proj_bias[e] if has_bias else 0)
                        out[t] += top_k_weights[t, k] * y
                return out

        torch.manual_seed(9)
        module = GeluExperts(make_config("mixtral"))
        assert experts_layout(module).fused_activation == (None if has_bias else "gelu")
        index_TK, weights_TK = random_routing(5, 4, seed=9)
        x_TD = torch.randn(5, 32, generator=torch.Generator().manual_seed(9))
        assert_experts_match_eager(module, x_TD, index_TK, weights_TK)


class _UngatedExperts(torch.nn.Module):
    """A bare experts module as the interface describes one (flags the decorator would set): no gate, no bias."""

    has_gate, has_bias = False, False

    def __init__(self, act_fn, num_experts=4, d_model=32, ffn=16, down_shape=None) -> None:
        super().__init__()
        self.up_proj = torch.nn.Parameter(torch.randn(num_experts, ffn, d_model))
        self.down_proj = torch.nn.Parameter(torch.randn(*(down_shape or (num_experts, d_model, ffn))))
        self.act_fn = act_fn


@pytest.mark.parametrize("act_fn, fused", [
    (torch.nn.GELU(), "gelu"),
    (torch.nn.functional.gelu, "gelu"),
    (torch.nn.GELU(approximate="tanh"), None),  # the Triton epilogue computes exact GELU only
    (torch.nn.SiLU(), None),  # SiLU without a gate is no fused activation
], ids=["nn_gelu", "f_gelu", "tanh_gelu", "ungated_silu"])
def test_only_exact_gelu_is_fused_without_a_gate(act_fn, fused) -> None:
    assert experts_layout(_UngatedExperts(act_fn)).fused_activation == fused


@pytest.mark.parametrize("down_shape", [(3, 32, 16), (4, 24, 16)], ids=["other_E", "other_D"])
def test_experts_weights_that_disagree_on_E_or_D_are_refused(down_shape) -> None:
    with pytest.raises(ValueError, match="E and D must match"):
        experts_layout(_UngatedExperts(torch.nn.GELU(), down_shape=down_shape))


# ------------------------------------------------------------------- registration and errors


def test_registration_is_explicit_and_idempotent() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert register_experts_implementation() == NAME == "moe_engine"
    assert register_experts_implementation(NAME) == NAME
    assert ALL_EXPERTS_FUNCTIONS[NAME] is moe_engine_experts_forward


def test_registration_under_another_name() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    try:
        assert register_experts_implementation("moe_engine_alt") == "moe_engine_alt"
        assert ALL_EXPERTS_FUNCTIONS["moe_engine_alt"] is moe_engine_experts_forward
        model = build_model(make_config("olmoe", num_layers=1), "moe_engine_alt")
        assert model.config._experts_implementation == "moe_engine_alt"
    finally:
        ExpertsInterface._global_mapping.pop("moe_engine_alt", None)


@pytest.mark.parametrize("name, match", [
    ("", "non-empty"), (" moe_engine", "surrounding spaces"), ("eager", "transformers' own"),
    ("grouped_mm", "already registered"),
])
def test_bad_registration_names_are_refused(name, match) -> None:
    with pytest.raises(ValueError, match=match):
        register_experts_implementation(name)


def test_unknown_implementation_name_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="moe_engin_typo"):
        build_model(make_config("mixtral", num_layers=1), "moe_engin_typo")
    model = build_model(make_config("mixtral", num_layers=1))
    with pytest.raises(ValueError, match="moe_engin_typo"):
        model.set_experts_implementation("moe_engin_typo")


def test_missing_interface_is_a_clear_error(monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "transformers.integrations.moe", None)
    with pytest.raises(ImportError, match="no experts-implementation interface"):
        register_experts_implementation("anything")


def test_wrong_routing_shapes_are_refused() -> None:
    module = mixtral_experts(num_experts=4)
    module.config._experts_implementation = NAME
    x_TD = torch.randn(3, 32)
    index_TK, weights_TK = random_routing(3, 4)
    with pytest.raises(ValueError, match="top_k_weights has shape"):
        module(x_TD, index_TK, weights_TK[:, :1])
    with pytest.raises(ValueError, match="top_k_index has shape"):
        module(x_TD, index_TK.float(), weights_TK)
    with pytest.raises(ValueError, match="hidden_states has shape"):
        module(x_TD[:, :16], index_TK, weights_TK)


# ------------------------------------------------------------------- bench peers


@pytest.mark.parametrize("peer", ["hf_eager", "hf_grouped_mm", "hf_moe_engine"])
def test_hf_bench_peers_agree_with_the_reference_and_are_timed(peer) -> None:
    from moe_engine.bench.common import BenchOptions, TimingSettings
    from moe_engine.bench.layer import run_path
    from moe_engine.bench.peers import BUILDERS, PeerEnv
    from moe_engine.bench.problem import Shape, compute_reference, make_problem

    cpu = torch.device("cpu")
    for shape, runs in ((Shape("tiny", 40, 32, 32, 5, 2, "float32"), True),
                        (Shape("tiny_f30", 40, 32, 30, 5, 2, "float32"), peer != "hf_grouped_mm")):
        problem = make_problem(shape, "balanced", cpu, seed=3)
        opts = BenchOptions(cpu, (shape,), ("balanced",), (peer,), TimingSettings(warmup=1, reps=1))
        entry = run_path(BUILDERS[peer], problem, compute_reference(problem), PeerEnv(cpu), opts)
        if not runs:  # F * 4 bytes not a multiple of 16: torch's grouped_mm cannot take it
            assert entry["status"] == "skipped" and "16 bytes" in entry["skip_reason"], entry
            continue
        assert entry["status"] == "ok" and entry["agreement"]["ok"] and entry["fwd_bwd_ms"] > 0, entry
        assert entry["notes"]["transformers"] == transformers.__version__
        assert f"experts_implementation={peer[3:]!r}" in entry["notes"]["config"]


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_cuda_bf16_triton_matches_eager(family) -> None:
    """On a GPU: the compiled Triton kernels in bf16 against eager in bf16 (forward and expert gradients)."""
    model = build_model(make_config(family)).cuda().to(torch.bfloat16)
    input_ids = torch.randint(0, VOCAB, (4, 33), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    model.set_experts_implementation("eager")
    logits_ref, grads_ref = logits_and_grads(model, input_ids)
    model.set_experts_implementation(NAME)
    with mock.patch.object(hf_experts, "grouped_mlp_combine_triton", wraps=hf_experts.grouped_mlp_combine_triton) as fused:
        logits, grads = logits_and_grads(model, input_ids)
    assert fused.call_count == 2  # compiled Triton, SwiGLU fused
    torch.testing.assert_close(logits.float(), logits_ref.float(), rtol=3e-2, atol=3e-2)
    for name, grad_ref in grads_ref.items():
        if "experts" in name:
            scale = grad_ref.float().abs().max()
            assert (grads[name].float() - grad_ref.float()).abs().max() <= 5e-2 * scale, name
