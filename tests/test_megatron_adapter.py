"""moe_engine's MoE layer inside megatron-core (0.16.1): moe_engine.parallel.megatron_adapter.

megatron-core's own MoELayer is the reference. Its router cannot run as shipped here (without
Transformer Engine its gating raises NameError; on CPU it also moves the weight to CUDA), so it
runs with moe_engine.bench.megatron_peer.TopKRouterWithoutTE, the same logits in plain torch:
everything else (top-k, aux losses and their MoEAuxLossAutoScaler gradients, capacity, dispatch,
SequentialMLP and shared experts, the aux-loss tracker) is megatron's code, and the adapter must
match it. megatron's attention needs CUDA, so the whole TransformerLayer runs in the gpu-marked test.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias, reset_model_temporary_tensors
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_layer import MoELayer as MegatronMoELayer
from megatron.core.transformer.moe.moe_utils import HAVE_TE, MoEAuxLossAutoScaler, get_moe_layer_wise_logging_tracker
from megatron.core.transformer.moe.router import TopKRouter as MegatronTopKRouter
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

from distributed import run_ranks
from moe_engine.bench.megatron_peer import TopKRouterWithoutTE, megatron_moe_submodules
from moe_engine.config import ConfigError
from moe_engine.layer import MoELayer
from moe_engine.parallel import AllToAllDispatcher, LocalDispatcher
from moe_engine.parallel.megatron_adapter import (
    MegatronMoEAdapter,
    get_gpt_decoder_block_spec_with_moe_engine,
    get_gpt_layer_spec_with_moe_engine,
    moe_config_from_megatron,
    moe_engine_mlp_spec,
)

H, FFN, E = 12, 20, 6  # odd-ish widths; 6 experts split 3 + 3 under EP = 2
NUM_LAYERS = 2  # kept the same everywhere: megatron's tracker sizes its rows on first use


def _config(**overrides) -> TransformerConfig:
    settings = dict(
        num_layers=NUM_LAYERS, hidden_size=H, num_attention_heads=2, ffn_hidden_size=FFN, moe_ffn_hidden_size=FFN,
        num_moe_experts=E, moe_router_topk=2, gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        moe_aux_loss_coeff=0.01, moe_z_loss_coeff=1e-3, moe_router_dtype="fp32", moe_token_dispatcher_type="allgather",
        use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
    )
    settings.update(overrides)
    return TransformerConfig(**settings)


def _world_groups(group: dist.ProcessGroup) -> ProcessGroupCollection:
    """Every group megatron's layers read, all `group` (one process: each is the world)."""
    names = ("tp", "cp", "ep", "expt_tp", "expt_dp", "tp_ep", "tp_cp", "tp_dp_cp", "dp", "dp_cp", "pp", "mp", "embd",
             "pos_embd")
    return ProcessGroupCollection(**{name: group for name in names})


@pytest.fixture(scope="module")
def groups():
    """A one-process gloo world (megatron's layers want process groups even on one rank)."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if dist.get_world_size() != 1:
        pytest.skip("needs a single-process world")
    yield _world_groups(dist.group.WORLD)
    if created:
        dist.destroy_process_group()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These layers are tiny: intra-op threads only contend with the other processes on a small machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def clean_tracker():
    """megatron keeps its aux-loss tracker and aux-loss gradient scale at module level: start each test clean."""
    get_moe_layer_wise_logging_tracker().clear()
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    yield
    get_moe_layer_wise_logging_tracker().clear()
    MoEAuxLossAutoScaler.main_loss_backward_scale = None


def _tracked() -> dict[str, torch.Tensor]:
    return {name: entry["values"].clone() for name, entry in get_moe_layer_wise_logging_tracker().items()}


# ---------------------------------------------------------------------------------------------
# Config mapping and refusals
# ---------------------------------------------------------------------------------------------


def test_config_mapping_default_softmax() -> None:
    cfg = moe_config_from_megatron(_config(moe_expert_capacity_factor=1.25), experts_impl="loop")
    assert (cfg.num_experts, cfg.ffn_hidden, cfg.activation, cfg.num_shared_experts, cfg.experts_impl) == (
        E, FFN, "swiglu", 0, "loop")
    r = cfg.router
    assert (r.type, r.top_k, r.renormalize, r.scaling_factor) == ("softmax_topk", 2, True, 1.0)
    assert (r.aux_loss_type, r.aux_loss_coef, r.z_loss_coef) == ("switch", 0.01, 1e-3)
    assert (r.capacity_factor, r.drop_policy, r.expert_bias_rate) == (1.25, "score", 0.0)
    assert (r.n_groups, r.topk_groups) == (1, 1)


def test_config_mapping_sigmoid_groups_shared_gelu() -> None:
    cfg = moe_config_from_megatron(_config(
        num_moe_experts=8, moe_router_topk=4, moe_router_score_function="sigmoid", moe_router_num_groups=4,
        moe_router_group_topk=2, moe_router_topk_scaling_factor=2.5, moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=0.01, moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None, gated_linear_unit=False,
        activation_func=F.gelu, moe_shared_expert_intermediate_size=2 * FFN, moe_shared_expert_gate=True,
    ))
    assert (cfg.activation, cfg.num_shared_experts, cfg.shared_expert_gate) == ("gelu", 2, True)
    r = cfg.router
    assert (r.type, r.top_k, r.renormalize, r.scaling_factor) == ("sigmoid_topk", 4, True, 2.5)
    assert (r.aux_loss_coef, r.z_loss_coef, r.expert_bias_rate, r.n_groups, r.topk_groups) == (0.0, 0.0, 0.01, 4, 2)


@pytest.mark.parametrize(
    "overrides, renormalize, aux_type",
    [
        ({"moe_router_pre_softmax": True}, False, "switch"),  # softmax over all E, then top-k: no renormalisation
        ({"moe_router_topk": 1, "moe_router_pre_softmax": True}, False, "switch"),
        # megatron leaves sigmoid top-1 weights unnormalised
        ({"moe_router_score_function": "sigmoid", "moe_router_topk": 1}, False, "switch"),
        ({"moe_router_load_balancing_type": "seq_aux_loss"}, True, "seq_switch"),
        ({"moe_router_load_balancing_type": ["aux_loss"], "moe_aux_loss_coeff": [0.02]}, True, "switch"),
        ({"moe_router_load_balancing_type": "none"}, True, "none"),
    ],
)
def test_config_mapping_router_variants(overrides, renormalize, aux_type) -> None:
    r = moe_config_from_megatron(_config(**overrides)).router
    assert (r.renormalize, r.aux_loss_type) == (renormalize, aux_type)


@pytest.mark.parametrize(
    "overrides, names",
    [
        ({"add_bias_linear": True}, ["add_bias_linear = True"]),
        ({"activation_func": F.gelu}, ["gated_linear_unit = True, activation_func = gelu"]),
        ({"gated_linear_unit": False, "activation_func": F.silu}, ["activation_func = silu"]),
        ({"moe_router_load_balancing_type": "sinkhorn", "moe_aux_loss_coeff": 0.0}, ["moe_router_load_balancing_type"]),
        ({"moe_router_load_balancing_type": "global_aux_loss"}, ["moe_router_load_balancing_type = 'global_aux_loss'"]),
        ({"moe_expert_capacity_factor": 1.0, "moe_token_drop_policy": "position"},
         ["moe_token_drop_policy = 'position'"]),
        ({"num_moe_experts": 8, "moe_router_num_groups": 4, "moe_router_group_topk": 2, "moe_router_pre_softmax": True},
         ["moe_aux_loss_coeff = 0.01 with moe_router_group_topk"]),
        ({"num_moe_experts": 8, "moe_router_num_groups": 4, "moe_router_group_topk": 2, "moe_router_topk": 4,
          "moe_aux_loss_coeff": 0.0}, ["moe_router_pre_softmax = False"]),
        ({"num_moe_experts": 8, "moe_router_num_groups": 2, "moe_router_group_topk": 2, "moe_router_topk": 2,
          "moe_router_score_function": "sigmoid", "moe_aux_loss_coeff": 0.0},
         ["moe_router_topk // moe_router_group_topk"]),
        ({"moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True},
         ["moe_aux_loss_coeff = 0.01 with moe_router_enable_expert_bias"]),
        ({"moe_router_dtype": "fp64"}, ["moe_router_dtype = 'fp64'"]),
        ({"moe_input_jitter_eps": 0.1, "moe_latent_size": 4}, ["moe_input_jitter_eps = 0.1", "moe_latent_size = 4"]),
        ({"moe_shared_expert_intermediate_size": 30}, ["moe_shared_expert_intermediate_size = 30"]),
        ({"moe_shared_expert_intermediate_size": FFN, "moe_shared_expert_overlap": True,
          "moe_token_dispatcher_type": "alltoall"},
         ["moe_shared_expert_overlap = True"]),
        ({"tensor_model_parallel_size": 2, "sequence_parallel": True}, ["tensor_model_parallel_size = 2"]),
        ({"context_parallel_size": 2}, ["context_parallel_size = 2"]),
        ({"recompute_granularity": "selective", "recompute_modules": ["shared_experts"]}, ["recompute_modules"]),
        ({"moe_apply_probs_on_input": True, "moe_router_topk": 1, "moe_router_pre_softmax": True},
         ["moe_apply_probs_on_input = True"]),
    ],
)
def test_unsupported_settings_are_refused_by_name(overrides, names) -> None:
    with pytest.raises(ConfigError) as err:
        moe_config_from_megatron(_config(**overrides))
    message = str(err.value)
    for name in names:
        assert name in message, message


def test_every_refusal_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        moe_config_from_megatron(_config(add_bias_linear=True, moe_router_dtype="fp64", moe_latent_size=4))
    assert all(name in str(err.value) for name in ("add_bias_linear", "moe_router_dtype", "moe_latent_size"))


def test_no_experts_is_refused(groups) -> None:
    with pytest.raises(ConfigError, match="num_moe_experts = None"):
        MegatronMoEAdapter(_config(num_moe_experts=None, moe_ffn_hidden_size=None), pg_collection=groups)


def test_expert_parallel_size_must_match_the_group(groups) -> None:
    with pytest.raises(ConfigError, match="expert_model_parallel_size = 2: the expert-parallel group given has 1 "):
        MegatronMoEAdapter(_config(expert_model_parallel_size=2), pg_collection=groups)


# ---------------------------------------------------------------------------------------------
# Against megatron-core's own MoE layer (CPU)
# ---------------------------------------------------------------------------------------------


def _megatron_moe(config: TransformerConfig, groups: ProcessGroupCollection) -> MegatronMoELayer:
    submodules = dataclasses.replace(megatron_moe_submodules(config.num_moe_experts), router=TopKRouterWithoutTE)
    layer = MegatronMoELayer(config, submodules, pg_collection=groups)
    layer.set_layer_number(1)
    return layer


@torch.no_grad()
def _copy_megatron_weights(adapter: MegatronMoEAdapter, megatron: MegatronMoELayer) -> None:
    moe = adapter.moe
    moe.router.weight.copy_(megatron.router.weight)
    for e, expert in enumerate(megatron.experts.local_experts):
        moe.experts.w_in[e].copy_(expert.linear_fc1.weight)
        moe.experts.w_out[e].copy_(expert.linear_fc2.weight)
    if megatron.shared_experts is not None:
        moe.shared_experts.w_in.weight.copy_(megatron.shared_experts.linear_fc1.weight)
        moe.shared_experts.w_out.weight.copy_(megatron.shared_experts.linear_fc2.weight)
        if megatron.shared_experts.gate_weight is not None:
            moe.shared_expert_gate.weight.copy_(megatron.shared_experts.gate_weight)


def _forward_backward(module, x_SBH: torch.Tensor, grad_SBH: torch.Tensor):
    x = x_SBH.clone().requires_grad_()
    y, bias = module(x)
    assert bias is None
    (y * grad_SBH).sum().backward()
    return y.detach(), x.grad


MEGATRON_CASES = {
    # Mixtral-like: softmax top-2, renormalised, switch loss and z-loss (both reach x.grad and the router).
    "softmax_top2_aux_z": {},
    # Switch-like top-1 after a softmax over all experts, per-sequence balance loss, GELU experts.
    "pre_softmax_top1_seq_aux_gelu": {
        "moe_router_topk": 1, "moe_router_pre_softmax": True, "moe_router_load_balancing_type": "seq_aux_loss",
        "gated_linear_unit": False, "activation_func": F.gelu,
    },
    # DeepSeek-like: sigmoid top-4 among the best 2 of 4 groups, scaled weights, gated shared experts.
    "sigmoid_groups_shared": {
        "num_moe_experts": 8, "moe_router_topk": 4, "moe_router_score_function": "sigmoid",
        "moe_router_num_groups": 4, "moe_router_group_topk": 2, "moe_router_topk_scaling_factor": 2.5,
        "moe_aux_loss_coeff": 0.0, "moe_shared_expert_intermediate_size": 2 * FFN, "moe_shared_expert_gate": True,
    },
    # Capacity factor 0.5 drops choices (highest probabilities kept); per-token loss scaling of the aux loss.
    "capacity_probs_per_token_loss": {
        "moe_expert_capacity_factor": 0.5, "moe_token_drop_policy": "probs", "calculate_per_token_loss": True,
    },
}


@pytest.mark.parametrize("case", list(MEGATRON_CASES))
def test_matches_megatron_moe_layer(groups, case: str) -> None:
    """Output, input gradient (aux-loss gradients included), parameter gradients and tracker values."""
    config = _config(**MEGATRON_CASES[case])
    torch.manual_seed(0)
    megatron = _megatron_moe(config, groups)
    adapter = MegatronMoEAdapter(config, pg_collection=groups)
    adapter.set_layer_number(1)
    _copy_megatron_weights(adapter, megatron)
    S, B = 7, 3
    x = torch.randn(S, B, H) * 2.0
    grad = torch.randn(S, B, H)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(0.5))  # what megatron's schedule sets: loss scale / microbatches

    y_ref, dx_ref = _forward_backward(megatron, x, grad)
    tracked_ref = _tracked()
    get_moe_layer_wise_logging_tracker().clear()
    y, dx = _forward_backward(adapter, x, grad)
    tracked = _tracked()

    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(dx, dx_ref, **tol)
    moe = adapter.moe
    torch.testing.assert_close(moe.router.weight.grad, megatron.router.weight.grad, **tol)
    for e, expert in enumerate(megatron.experts.local_experts):
        torch.testing.assert_close(moe.experts.w_in.grad[e], expert.linear_fc1.weight.grad, **tol)
        torch.testing.assert_close(moe.experts.w_out.grad[e], expert.linear_fc2.weight.grad, **tol)
    if megatron.shared_experts is not None:
        shared = megatron.shared_experts
        torch.testing.assert_close(moe.shared_experts.w_in.weight.grad, shared.linear_fc1.weight.grad, **tol)
        torch.testing.assert_close(moe.shared_experts.w_out.weight.grad, shared.linear_fc2.weight.grad, **tol)
        torch.testing.assert_close(moe.shared_expert_gate.weight.grad, shared.gate_weight.grad, **tol)
    assert tracked.keys() == tracked_ref.keys()
    for name in tracked_ref:
        torch.testing.assert_close(tracked[name], tracked_ref[name], **tol)


def test_aux_loss_gradient_scale_and_tracker(groups) -> None:
    """The router's gradient is that of (y . g) + scale * aux_loss; tracker rows hold the unweighted terms."""
    config = _config(moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01)
    adapter = MegatronMoEAdapter(config, pg_collection=groups)
    adapter.set_layer_number(2)
    x, grad = torch.randn(5, 2, H), torch.randn(5, 2, H)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(3.0))
    y, _ = adapter(x)
    (y * grad).sum().backward()
    router_grad = adapter.moe.router.weight.grad.clone()
    tracked = _tracked()

    adapter.zero_grad()
    out = adapter.moe(x)  # the same layer with the aux loss added by hand
    ((out.y * grad).sum() + 3.0 * out.aux_loss).backward()
    torch.testing.assert_close(router_grad, adapter.moe.router.weight.grad, rtol=1e-5, atol=1e-7)
    terms = out.routing.aux_terms
    assert set(tracked) == {"load_balancing_loss", "z_loss"}
    for name, term in (("load_balancing_loss", terms["balance_loss"]), ("z_loss", terms["z_loss"])):
        torch.testing.assert_close(tracked[name], torch.stack([torch.zeros(()), term]))


def test_eval_and_no_grad_attach_and_track_nothing(groups) -> None:
    adapter = MegatronMoEAdapter(_config(), pg_collection=groups)
    adapter.set_layer_number(1)
    x = torch.randn(4, 2, H)
    with torch.no_grad():
        y_train, _ = adapter(x)
    adapter.eval()
    y_eval, _ = adapter(x.requires_grad_())
    assert _tracked() == {}
    torch.testing.assert_close(y_eval.detach(), y_train)
    assert y_eval.grad_fn is not None and "MoEAuxLossAutoScaler" not in type(y_eval.grad_fn).__name__


# ---------------------------------------------------------------------------------------------
# Against moe_engine's MoELayer on the same weights
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "S, B, dtype",
    [
        (1, 1, torch.float32),  # one token
        (5, 3, torch.float32),
        (3, 1, torch.bfloat16),  # params_dtype and activations bf16, routing still fp32
    ],
)
def test_forward_equals_moe_layer_and_gradients_flow(groups, S, B, dtype) -> None:
    config = _config(params_dtype=dtype, bf16=dtype == torch.bfloat16, moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None)
    adapter = MegatronMoEAdapter(config, pg_collection=groups)
    assert all(p.dtype == dtype for p in adapter.parameters())
    assert isinstance(adapter.moe.dispatcher, LocalDispatcher)
    reference = MoELayer.from_config(H, moe_config_from_megatron(config)).to(dtype)
    reference.load_state_dict(adapter.moe.state_dict())
    x = torch.randn(S, B, H, dtype=dtype)
    grad = torch.randn(S, B, H, dtype=dtype)
    y, dx = _forward_backward(adapter, x, grad)
    x_ref = x.clone().requires_grad_()
    out = reference(x_ref)
    (out.y * grad).sum().backward()
    assert y.shape == (S, B, H) and y.dtype == dtype
    torch.testing.assert_close(y, out.y.detach(), rtol=0, atol=0)
    torch.testing.assert_close(dx, x_ref.grad, rtol=0, atol=0)
    for (name, p), p_ref in zip(adapter.moe.named_parameters(), reference.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=0, atol=0)


def test_recompute_gives_the_same_gradients(groups) -> None:
    plain = _config()
    recomputed = _config(recompute_granularity="selective", recompute_modules=["moe"])
    torch.manual_seed(1)
    adapter = MegatronMoEAdapter(plain, pg_collection=groups)
    torch.manual_seed(1)
    adapter_rc = MegatronMoEAdapter(recomputed, pg_collection=groups)
    assert adapter_rc.recompute and not adapter.recompute
    x, grad = torch.randn(6, 2, H), torch.randn(6, 2, H)
    y, dx = _forward_backward(adapter, x, grad)
    y_rc, dx_rc = _forward_backward(adapter_rc, x, grad)
    torch.testing.assert_close(y_rc, y, rtol=0, atol=0)
    torch.testing.assert_close(dx_rc, dx, rtol=1e-6, atol=1e-7)
    for p, p_rc in zip(adapter.parameters(), adapter_rc.parameters()):
        torch.testing.assert_close(p_rc.grad, p.grad, rtol=1e-6, atol=1e-7)


def test_expert_bias_counts_training_tokens_only(groups) -> None:
    config = _config(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_aux_loss_coeff=0.0)
    adapter = MegatronMoEAdapter(config, pg_collection=groups)
    router = adapter.moe.router
    assert router.expert_bias is not None and router.local_tokens_per_expert.dtype == torch.float32
    x = torch.randn(5, 2, H)
    with torch.no_grad():
        adapter(x)
    assert router.local_tokens_per_expert.sum() == 0
    adapter(x)
    adapter(x)
    experts_TK = router(x.view(-1, H)).experts_TK
    expected_E = 2.0 * torch.bincount(experts_TK.reshape(-1), minlength=E)
    torch.testing.assert_close(router.local_tokens_per_expert, expected_E)
    # A bf16 cast of the module (megatron's Float16Module) is undone for the bias before routing.
    adapter.bfloat16()
    adapter(x.bfloat16())
    assert router.expert_bias.dtype == torch.float32


def test_expert_bias_counts_only_the_choices_capacity_kept(groups) -> None:
    """With a capacity the dropped choices (-1) count nowhere; every kept one counts at its expert, expert 0 too."""
    config = _config(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_aux_loss_coeff=0.0,
                     moe_expert_capacity_factor=0.5, moe_token_drop_policy="probs")
    torch.manual_seed(2)
    adapter = MegatronMoEAdapter(config, pg_collection=groups)
    router = adapter.moe.router
    x = torch.randn(8, 2, H, generator=torch.Generator().manual_seed(3))
    adapter(x)
    experts_TK = router(x.view(-1, H)).experts_TK
    kept = experts_TK[experts_TK >= 0]
    assert 0 < kept.numel() < experts_TK.numel() and (kept == 0).any()  # some dropped, some kept on expert 0
    torch.testing.assert_close(router.local_tokens_per_expert, torch.bincount(kept, minlength=E).float())


def test_expert_init_seeds_follow_global_expert_ids(groups) -> None:
    """Expert e (global id) is drawn from seed + 1 + e: the experts of EP rank 1 of 2 are rows [E/2, E) of the
    single-rank layer's. One process: a layer of E/2 experts whose rank and dispatcher say it is rank 1 (the 2-rank
    run, test_expert_parallel_over_megatron_parallel_state, is marked slow)."""
    full = MegatronMoEAdapter(_config(), pg_collection=groups)
    shard = MegatronMoEAdapter(_config(), pg_collection=groups)
    shard.ep_rank = 1
    shard.moe.dispatcher = SimpleNamespace(num_local_experts=E // 2)  # all `_initialize` reads of it
    shard.moe.experts = type(full.moe.experts)(E // 2, H, FFN)
    full._initialize(seed=123)
    shard._initialize(seed=123)
    torch.testing.assert_close(shard.moe.router.weight, full.moe.router.weight, rtol=0, atol=0)
    torch.testing.assert_close(shard.moe.experts.w_in, full.moe.experts.w_in[E // 2:], rtol=0, atol=0)
    torch.testing.assert_close(shard.moe.experts.w_out, full.moe.experts.w_out[E // 2:], rtol=0, atol=0)


def test_padding_mask_with_padding_is_refused(groups) -> None:
    adapter = MegatronMoEAdapter(_config(), pg_collection=groups)
    x = torch.randn(4, 2, H)
    adapter(x, padding_mask=torch.zeros(2, 4, dtype=torch.bool))  # no padding: accepted
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[1, 3] = True
    with pytest.raises(ValueError, match="padding_mask marks padding tokens"):
        adapter(x, padding_mask=mask)


# ---------------------------------------------------------------------------------------------
# Specs: a megatron-core TransformerLayer and GPT model built with moe_engine's MoE
# ---------------------------------------------------------------------------------------------


def test_layer_spec_builds_a_transformer_layer(groups) -> None:
    config = _config()
    spec = get_gpt_layer_spec_with_moe_engine(pg_collection=groups, experts_impl="loop")
    layer = TransformerLayer(config, spec.submodules, layer_number=2, pg_collection=groups)
    assert isinstance(layer.mlp, MegatronMoEAdapter) and layer.mlp.layer_number == 2
    assert layer.mlp.moe.experts.impl == "loop"
    # The pre-MLP norm of megatron's MoE layer variant is kept (our mlp does not fuse it).
    assert type(layer.pre_mlp_layernorm).__name__ != "IdentityOp"
    # The mlp half of the layer runs on CPU; attention needs CUDA (the gpu test runs the whole layer).
    y, _ = layer.mlp(layer.pre_mlp_layernorm(torch.randn(3, 2, H)))
    assert y.shape == (3, 2, H)


def test_block_spec_builds_a_gpt_model_with_moe_layer_freq(groups) -> None:
    config = _config(moe_layer_freq=[1, 0])
    block = get_gpt_decoder_block_spec_with_moe_engine(config, pg_collection=groups, pp_rank=0)
    model = GPTModel(config, block, vocab_size=32, max_sequence_length=16, pg_collection=groups)
    layers = model.decoder.layers
    assert isinstance(layers[0].mlp, MegatronMoEAdapter) and layers[0].mlp.layer_number == 1
    assert type(layers[1].mlp).__name__ == "MLP"  # the dense layer keeps megatron's MLP
    names = {name for name, _ in model.named_parameters()}
    assert {"decoder.layers.0.mlp.moe.router.weight", "decoder.layers.0.mlp.moe.experts.w_in"} <= names


def test_block_spec_refuses_before_building() -> None:
    with pytest.raises(ConfigError, match="add_bias_linear"):
        get_gpt_decoder_block_spec_with_moe_engine(_config(add_bias_linear=True), pp_rank=0)


def test_mlp_spec_carries_its_arguments(groups) -> None:
    spec = moe_engine_mlp_spec(pg_collection=groups, experts_impl="grouped_mm")
    assert spec.module is MegatronMoEAdapter
    assert spec.params == {"experts_impl": "grouped_mm", "pg_collection": groups}
    assert moe_engine_mlp_spec().params == {"experts_impl": "auto"}


# ---------------------------------------------------------------------------------------------
# Expert parallelism from megatron's parallel_state, 2 CPU ranks on gloo
# ---------------------------------------------------------------------------------------------


def _expert_parallel_rank(rank: int, world_size: int) -> None:
    torch.set_num_threads(1)
    parallel_state.initialize_model_parallel(expert_model_parallel_size=world_size, create_gloo_process_groups=False)
    try:
        _check_expert_parallel(rank, world_size)
        _check_expert_bias_update(rank)
    finally:
        parallel_state.destroy_model_parallel()


def _check_expert_parallel(rank: int, world_size: int) -> None:
    config_ep = _config(expert_model_parallel_size=world_size)
    torch.manual_seed(0)
    adapter = MegatronMoEAdapter(config_ep)  # no pg_collection: megatron's parallel_state groups
    # A one-rank reference built from the same seed: the same router, all E experts.
    singles = [dist.new_group([r]) for r in range(world_size)]
    torch.manual_seed(0)
    reference = MegatronMoEAdapter(_config(), pg_collection=_world_groups(singles[rank]))

    num_local = E // world_size
    local = slice(rank * num_local, (rank + 1) * num_local)
    assert isinstance(adapter.moe.dispatcher, AllToAllDispatcher) and adapter.moe.dispatcher.group is not None
    assert (adapter.ep_size, adapter.ep_rank, adapter.moe.experts.num_experts) == (world_size, rank, num_local)
    assert all(p.allreduce is False for p in adapter.moe.experts.parameters())
    assert getattr(adapter.moe.router.weight, "allreduce", True)
    torch.testing.assert_close(adapter.moe.router.weight, reference.moe.router.weight, rtol=0, atol=0)
    torch.testing.assert_close(adapter.moe.experts.w_in, reference.moe.experts.w_in[local], rtol=0, atol=0)

    g = torch.Generator().manual_seed(10 + rank)  # each rank routes its own tokens
    x, grad = torch.randn(5, 2, H, generator=g), torch.randn(5, 2, H, generator=g)
    y, dx = _forward_backward(adapter, x, grad)
    y_ref, dx_ref = _forward_backward(reference, x, grad)
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(dx, dx_ref, **tol)  # aux-loss gradients included: local statistics both ways
    torch.testing.assert_close(adapter.moe.router.weight.grad, reference.moe.router.weight.grad, **tol)
    for name in ("w_in", "w_out"):
        # An expert's gradient is the sum over every rank's tokens that reached it.
        summed = getattr(reference.moe.experts, name).grad.clone()
        dist.all_reduce(summed)
        torch.testing.assert_close(getattr(adapter.moe.experts, name).grad, summed[local], **tol)

    # Distributed checkpoint: this rank's experts at their global rows, PP offsets prepended.
    metadata = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    sharded = adapter.sharded_state_dict("mlp.", ((0, 1, 2),), metadata)
    w_in = sharded["mlp.moe.experts.w_in"]
    assert tuple(w_in.global_shape) == (2, E, 2 * FFN, H)
    assert tuple(w_in.global_offset) == (1, rank * num_local, 0, 0) and w_in.replica_id == (0, 0, 0)
    router = sharded["mlp.moe.router.weight"]
    assert tuple(router.global_shape) == (2, E, H) and router.replica_id == (0, 0, rank)  # replicated over DP


def _check_expert_bias_update(rank: int) -> None:
    """megatron's finalize_model_grads step: all-reduce our counts, move our router's bias, zero the counts."""
    config = _config(expert_model_parallel_size=2, moe_router_score_function="sigmoid",
                     moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.01, moe_aux_loss_coeff=0.0)
    adapter = MegatronMoEAdapter(config)
    x = torch.randn(6, 2, H, generator=torch.Generator().manual_seed(20 + rank))
    adapter(x)[0].sum().backward()
    router = adapter.moe.router
    counts = torch.bincount(router(x.view(-1, H)).experts_TK.reshape(-1), minlength=E).float()
    dist.all_reduce(counts)
    _update_router_expert_bias([adapter], config)
    torch.testing.assert_close(router.expert_bias, 0.01 * torch.sign(counts.mean() - counts))
    reset_model_temporary_tensors(config, [adapter])
    assert router.local_tokens_per_expert.sum() == 0


@pytest.mark.slow  # two ranks that each import megatron-core: about 45 s of CI's budget
def test_expert_parallel_over_megatron_parallel_state() -> None:
    run_ranks(2, _expert_parallel_rank)


# ---------------------------------------------------------------------------------------------
# GPU: a whole megatron-core TransformerLayer with moe_engine's MoE against megatron's MoE
# ---------------------------------------------------------------------------------------------


def test_megatron_peer_router_without_te(groups) -> None:
    """The TE-free router gives megatron's logits: x W^T in moe_router_dtype, on the weight's device."""
    assert megatron_moe_submodules(E).router is (MegatronTopKRouter if HAVE_TE else TopKRouterWithoutTE)
    router = TopKRouterWithoutTE(config=_config(moe_router_dtype=None), pg_collection=groups)
    x = torch.randn(3, 2, H, dtype=torch.float64)
    logits = router.gating(x)
    assert logits.dtype == torch.float64 and logits.shape == (3, 2, E)  # None: the input's dtype
    torch.testing.assert_close(logits, x @ router.weight.double().t())
    router_fp32 = TopKRouterWithoutTE(config=_config(), pg_collection=groups)
    assert router_fp32.gating(x.bfloat16()).dtype == torch.float32


@pytest.mark.gpu
def test_transformer_layer_on_cuda_matches_megatron_moe(groups) -> None:
    """A whole TransformerLayer (attention + our MoE) forward+backward against the same layer with megatron's MoE."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    # Attention takes its score buffer from parallel_state's global memory buffer.
    parallel_state.initialize_model_parallel(create_gloo_process_groups=False)
    try:
        model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
        _check_transformer_layer_on_cuda(groups)
    finally:
        parallel_state.destroy_model_parallel()


def _check_transformer_layer_on_cuda(groups: ProcessGroupCollection) -> None:
    config = _config(use_cpu_initialization=False)
    ours = TransformerLayer(config, get_gpt_layer_spec_with_moe_engine(pg_collection=groups).submodules,
                            pg_collection=groups).cuda()
    megatron_spec = get_gpt_layer_local_spec(num_experts=E)
    megatron_mlp = dataclasses.replace(megatron_spec.submodules.mlp, submodules=megatron_moe_submodules(E))
    megatron_submodules = dataclasses.replace(megatron_spec.submodules, mlp=megatron_mlp)
    megatron = TransformerLayer(config, megatron_submodules, pg_collection=groups).cuda()
    assert isinstance(megatron.mlp, MegatronMoELayer) and isinstance(ours.mlp, MegatronMoEAdapter)
    # Same attention and norms; then megatron's MoE weights into ours.
    shared = {k: v for k, v in megatron.state_dict().items() if not k.startswith("mlp.")}
    missing, unexpected = ours.load_state_dict(shared, strict=False)
    assert all(k.startswith("mlp.") for k in missing) and not unexpected
    _copy_megatron_weights(ours.mlp, megatron.mlp)

    x = torch.randn(16, 2, H, device="cuda")
    grad = torch.randn(16, 2, H, device="cuda")
    results = []
    for layer in (megatron, ours):
        x_in = x.clone().requires_grad_()
        y, _ = layer(x_in, attention_mask=None)
        (y * grad).sum().backward()
        results.append((y.detach(), x_in.grad))
    (y_ref, dx_ref), (y, dx) = results
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-4)
    router_grad = megatron.mlp.router.weight.grad.float()
    torch.testing.assert_close(ours.mlp.moe.router.weight.grad, router_grad, rtol=1e-4, atol=1e-5)
    # bf16 forward+backward of the whole layer with our MoE (Triton kernels on CUDA).
    ours.bfloat16()
    x_bf16 = x.bfloat16().requires_grad_()
    y_bf16, _ = ours(x_bf16, attention_mask=None)
    y_bf16.float().square().mean().backward()
    assert torch.isfinite(x_bf16.grad).all() and ours.mlp.moe.experts.w_in.grad.abs().sum() > 0
