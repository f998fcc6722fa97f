"""The paths of the layer benchmark: ours and its peers, each built from the same `Problem`.

Every builder takes (problem, env) and returns a `PeerRun` whose `forward()` gives y_TD, or raises
`PeerSkipped` with the reason it cannot run here. Peers get the problem's weights copied in, so
every path computes the same function:

- `ours`: moe_engine.layer.MoELayer from MoEConfig (softmax top-k, renormalised, dropless, SwiGLU);
  Triton kernels switch in through MOE_ENGINE_KERNELS. `ours_recompute`: the same with
  moe.recompute_experts (no h kept; the backward recomputes it), timed to price that memory.
- `torch_loop`: the classic loop over experts (index-select, two matmuls, SwiGLU, index_add).
- `grouped_mm`: argsort permute, two torch._grouped_mm calls, a batched-matmul weighted combine.
- `deepspeed`: deepspeed.moe.layer.MoE at capacity factor 1.0 (drops tokens); its agreement is
  checked on the same module with `gate.drop_tokens = False`. `deepspeed_dropless`: the dropless layer
  timed too. DeepSpeed's top-2 samples its second expert (Gumbel) unless top2_2nd_expert_sampling=False,
  and drops with random token selection unless use_rts=False: both are turned off so it computes our
  function. Its top-1 gate does not renormalise, so K = 1 is skipped.
- `megatron`: megatron-core's MoELayer (SequentialMLP experts: no grouped_gemm or Transformer Engine
  here), CUDA only; on CPU it is built and loaded to check the adapter, then skipped.
- `hf_eager`, `hf_grouped_mm`, `hf_moe_engine`: Hugging Face transformers' MixtralExperts (the expert MLP
  of its MoE models) with our weights, run through its experts interface as "eager" (its loop over
  experts), "grouped_mm" (sort, torch grouped_mm, weighted sum) and "moe_engine" (ours, registered by
  moe_engine.hf.experts_interface). They are routed by the problem's softmax top-k, the rule every path
  implements: HF's router computes logits in the input dtype and would route bf16 near-ties differently.

DeepSpeed, megatron-core and transformers are imported only when their path runs (DeepSpeed takes seconds).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import socket
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from moe_engine.bench.common import describe_error
from moe_engine.bench.problem import Problem, expected_drop_fraction, swiglu
from moe_engine.parallel.deepspeed_engine import init_deepspeed_distributed

DISTRIBUTED_PEERS = ("deepspeed", "deepspeed_dropless", "megatron")
# Skip DeepSpeed's dropless layer when its [E, C, *] buffers would take more than this share of free memory.
DROPLESS_MEMORY_SHARE = 0.6


class PeerSkipped(Exception):
    """A path that cannot run here; the message says why."""


@dataclass
class PeerEnv:
    """What builders need besides the problem: the device, and the process group when one was set up."""

    device: torch.device
    group: Any = None
    backend: str | None = None
    tokens_per_expert_E: torch.Tensor | None = None


@dataclass
class PeerRun:
    """A built path. forward() -> y_TD. params: the weights fwd+bwd differentiates (x is added by the caller).
    check_forward: the forward whose output is compared, when it is not `forward` itself.
    problem_weights: the path's (router_weight_ED, w_in_EHD, w_out_EDF) in the problem's layouts, whose
    gradients are checked against the reference's; None where the path keeps them otherwise (per-expert
    modules), and then only y and dx are checked."""

    forward: Callable[[], torch.Tensor]
    params: list[torch.Tensor]
    notes: dict[str, Any] = field(default_factory=dict)
    check_forward: Callable[[], torch.Tensor] | None = None
    problem_weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def distributed_session(device: torch.device) -> Iterator[PeerEnv]:
    """A 1-process group (gloo on CPU, nccl on CUDA) on localhost if none exists; torn down after if we made it."""
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        created = True
    try:
        yield PeerEnv(device, group=dist.group.WORLD, backend=dist.get_backend())
    finally:
        if created:
            _destroy_process_group()


def _destroy_process_group() -> None:
    import torch.distributed as dist

    ds_comm = sys.modules.get("deepspeed.comm")
    if ds_comm is not None and ds_comm.is_initialized():
        ds_comm.destroy_process_group()  # also releases DeepSpeed's cached expert groups
    elif dist.is_initialized():
        dist.destroy_process_group()


def _build_on(device: torch.device, dtype: torch.dtype, build: Callable[[], nn.Module]) -> nn.Module:
    """Build a module directly on `device` (drawing GB of init weights on the CPU would take minutes), in `dtype`.

    Not on the meta device: buffers a constructor initialises (a router's bias, say) would come out
    of `to_empty` uninitialised, and only the weights are copied in afterwards.
    """
    with torch.device(device):
        module = build()
    return module.to(dtype).train()


def build_ours(problem: Problem, env: PeerEnv, recompute: bool = False) -> PeerRun:
    """Our MoELayer; recompute: with `moe.recompute_experts` (its time / ours is the recompute's cost)."""
    from moe_engine.config import MoEConfig, RouterConfig
    from moe_engine.layer import MoELayer

    s = problem.shape
    router = RouterConfig(
        type="softmax_topk", top_k=s.K, renormalize=True, aux_loss_type="none", aux_loss_coef=0.0, z_loss_coef=0.0,
        capacity_factor=None,
    )
    cfg = MoEConfig(num_experts=s.E, ffn_hidden=s.F, activation="swiglu", experts_impl="auto", router=router,
                    recompute_experts=recompute)
    layer = _build_on(problem.device, problem.dtype, lambda: MoELayer.from_config(s.D, cfg))
    with torch.no_grad():
        layer.router.weight.copy_(problem.router_weight_ED)
        layer.experts.w_in.copy_(problem.w_in_EHD)
        layer.experts.w_out.copy_(problem.w_out_EDF)
    notes: dict[str, Any] = {"config": "MoEConfig(swiglu, softmax_topk renormalised, dropless, no aux loss"
                                       + (", recompute_experts)" if recompute else ")")}
    resolve = getattr(layer.experts, "resolve_impl", None)
    if resolve is not None:
        notes["experts_impl"] = resolve(problem.device, problem.dtype)
    weights = (layer.router.weight, layer.experts.w_in, layer.experts.w_out)
    return PeerRun(lambda: layer(problem.x_TD).y, list(layer.parameters()), notes, problem_weights=weights)


def build_torch_loop(problem: Problem, env: PeerEnv) -> PeerRun:
    from moe_engine.bench.problem import loop_moe_forward

    weights = (problem.router_weight_ED, problem.w_in_EHD, problem.w_out_EDF)
    return PeerRun(lambda: loop_moe_forward(problem.x_TD, *weights, problem.shape.K), list(weights),
                   problem_weights=weights)


def grouped_mm_moe_forward(
    x_TD: torch.Tensor, router_weight_ED: torch.Tensor, w_in_EHD: torch.Tensor, w_out_EDF: torch.Tensor, top_k: int
) -> torch.Tensor:
    """Sort-based permute, torch._grouped_mm up and down projections, then the rows back in token order
    and each token's K rows weighted and summed by one batched matmul (`weighted_combine`)."""
    from moe_engine.bench.problem import softmax_topk, weighted_combine

    weights_TK, experts_TK = softmax_topk(x_TD, router_weight_ED, top_k)
    flat_C = experts_TK.reshape(-1)
    order_N = torch.argsort(flat_C, stable=True)
    token_N = order_N // top_k
    offsets_E = torch.cumsum(torch.bincount(flat_C, minlength=w_in_EHD.shape[0]), dim=0, dtype=torch.int32)
    h_NH = torch._grouped_mm(x_TD.index_select(0, token_N), w_in_EHD.transpose(-2, -1), offs=offsets_E)
    out_ND = torch._grouped_mm(swiglu(h_NH), w_out_EDF.transpose(-2, -1), offs=offsets_E)
    return weighted_combine(out_ND, order_N, weights_TK)


def build_grouped_mm(problem: Problem, env: PeerEnv) -> PeerRun:
    from moe_engine.kernels.torch_grouped_mm import grouped_mm_unsupported_reason

    s = problem.shape
    reason = grouped_mm_unsupported_reason(problem.device, problem.dtype, (s.D, s.F, 2 * s.F))
    if reason is not None:
        raise PeerSkipped(reason)
    weights = (problem.router_weight_ED, problem.w_in_EHD, problem.w_out_EDF)
    return PeerRun(lambda: grouped_mm_moe_forward(problem.x_TD, *weights, s.K), list(weights), problem_weights=weights)


class SwiGLUExpert(nn.Module):
    """One expert for DeepSpeed's MoE: w_out(silu(gate) * up), [gate | up] = w_in(x), nn.Linear layouts."""

    def __init__(self, d_model: int, ffn_hidden: int) -> None:
        super().__init__()
        self.w_in = nn.Linear(d_model, 2 * ffn_hidden, bias=False)
        self.w_out = nn.Linear(ffn_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_out(swiglu(self.w_in(x)))


def _dropless_bytes(problem: Problem, tokens_per_expert_E: torch.Tensor) -> int:
    """Rough fwd+bwd activation bytes of DeepSpeed's dropless layer: every expert pads to the busiest one."""
    s = problem.shape
    rows = s.E * int(tokens_per_expert_E.max())
    return rows * (4 * s.D + 8 * s.F) * problem.x_TD.element_size()


@contextlib.contextmanager
def _dropless(gate: nn.Module) -> Iterator[None]:
    """DeepSpeed's TopKGate reads `drop_tokens` on every call: False sizes capacity to the busiest expert."""
    saved = gate.drop_tokens
    gate.drop_tokens = False
    try:
        yield
    finally:
        gate.drop_tokens = saved


def _require(module: str) -> None:
    """Import an optional peer's package, or skip the peer: a missing install is not a failure of ours."""
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise PeerSkipped(f"{module} is not importable here: {err}") from None


def _init_deepspeed(env: PeerEnv) -> None:
    _require("deepspeed")
    if env.group is None:
        raise PeerSkipped("DeepSpeed's MoE needs torch.distributed; no process group was set up")
    # torch.distributed is already up (distributed_session): this only wraps it as DeepSpeed's comm backend.
    init_deepspeed_distributed(env.backend, verbose=False, mpi_discovery=False)


def build_deepspeed(problem: Problem, env: PeerEnv, drop_tokens: bool = True) -> PeerRun:
    s = problem.shape
    if s.K == 1:
        raise PeerSkipped("DeepSpeed's top-1 gate weights a token by its softmax probability without "
                          "renormalising, ours by 1: the two layers compute different functions at K = 1")
    counts_E = env.tokens_per_expert_E
    if env.device.type == "cuda" and counts_E is not None:
        need, free = _dropless_bytes(problem, counts_E), torch.cuda.mem_get_info(env.device)[0]
        if need > DROPLESS_MEMORY_SHARE * free:
            raise PeerSkipped(f"the dropless [E, C, D] check (C = {int(counts_E.max())}, the busiest expert) would "
                              f"need about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
    _init_deepspeed(env)
    from deepspeed.moe.layer import MoE

    def build() -> nn.Module:
        return MoE(
            s.D, SwiGLUExpert(s.D, s.F), num_experts=s.E, ep_size=1, k=s.K, capacity_factor=1.0,
            eval_capacity_factor=1.0, min_capacity=0, drop_tokens=drop_tokens, use_rts=False,
            top2_2nd_expert_sampling=False,
        )

    moe = _build_on(problem.device, problem.dtype, build)
    moe.set_deepspeed_parallelism()
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(problem.router_weight_ED)
        for e, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            expert.w_in.weight.copy_(problem.w_in_EHD[e])
            expert.w_out.weight.copy_(problem.w_out_EDF[e])
    gate = moe.deepspeed_moe.gate
    x_TD = problem.x_TD

    def forward() -> torch.Tensor:
        return moe(x_TD)[0]

    def dropless_forward() -> torch.Tensor:
        with _dropless(gate):
            return moe(x_TD)[0]

    notes: dict[str, Any] = {
        "config": f"MoE(k={s.K}, drop_tokens={drop_tokens}, capacity_factor=1.0, min_capacity=0, use_rts=False, "
                  "top2_2nd_expert_sampling=False), SwiGLU experts with our weights",
        "experts": "a Python loop over experts, each padded to capacity C",
    }
    if drop_tokens:
        notes["drops_tokens"] = True
        notes["agreement_on"] = "the same module with gate.drop_tokens=False (dropless)"
        if counts_E is not None:
            notes["dropped_fraction"] = expected_drop_fraction(counts_E, s.T, s.K, 1.0)
    return PeerRun(forward, list(moe.parameters()), notes, None if not drop_tokens else dropless_forward)


def build_deepspeed_dropless(problem: Problem, env: PeerEnv) -> PeerRun:
    return build_deepspeed(problem, env, drop_tokens=False)


def _megatron_layer(problem: Problem, env: PeerEnv, dispatcher: str) -> nn.Module:
    """megatron-core's MoELayer (local spec: SequentialMLP experts) with the problem's weights copied in."""
    import torch.nn.functional as F
    from moe_engine.bench.megatron_peer import megatron_moe_submodules
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.moe_layer import MoELayer as MegatronMoELayer
    from megatron.core.transformer.transformer_config import TransformerConfig

    s = problem.shape
    cfg = TransformerConfig(
        num_layers=1, hidden_size=s.D, num_attention_heads=1, ffn_hidden_size=s.F, moe_ffn_hidden_size=s.F,
        num_moe_experts=s.E, moe_router_topk=s.K, moe_router_score_function="softmax", moe_router_pre_softmax=False,
        moe_router_dtype="fp32", moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type=dispatcher, gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        bf16=problem.dtype == torch.bfloat16, fp16=problem.dtype == torch.float16, params_dtype=problem.dtype,
        use_cpu_initialization=env.device.type != "cuda", perform_initialization=False,
    )
    g = env.group  # every group of a 1-process run is the world
    groups = ProcessGroupCollection(tp=g, cp=g, ep=g, expt_tp=g, expt_dp=g, tp_ep=g, tp_cp=g, tp_dp_cp=g, dp=g, pp=g)
    # megatron-core 0.16.1's router calls Transformer Engine's GEMM, absent here: the same logits in torch.
    layer = MegatronMoELayer(cfg, megatron_moe_submodules(s.E), pg_collection=groups).to(env.device).train()
    with torch.no_grad():
        layer.router.weight.copy_(problem.router_weight_ED)
        for e, expert in enumerate(layer.experts.local_experts):
            expert.linear_fc1.weight.copy_(problem.w_in_EHD[e])
            expert.linear_fc2.weight.copy_(problem.w_out_EDF[e])
    return layer


def build_megatron(problem: Problem, env: PeerEnv) -> PeerRun:
    """megatron-core's MoELayer with our weights; forward on CUDA only (its router calls torch.cuda).

    On CUDA it uses the alltoall dispatcher (megatron's default for MoE training), and falls back to
    allgather, noting why, if a first forward+backward with alltoall fails. On CPU the layer is built
    and loaded (allgather: alltoall makes a CUDA stream when built) to check this adapter, then skipped.
    """
    if env.group is None:
        raise PeerSkipped("megatron-core's MoELayer needs torch.distributed; no process group was set up")
    _require("megatron.core")
    s = problem.shape
    x_SBD = problem.x_TD.view(s.T, 1, s.D)
    if env.device.type != "cuda":
        _megatron_layer(problem, env, "allgather")
        raise PeerSkipped("needs CUDA: megatron-core's router moves its weight to torch.cuda.current_device() "
                          "(built and loaded with our weights on CPU, forward not run)")
    notes: dict[str, Any] = {}
    layer = _megatron_layer(problem, env, "alltoall")
    try:
        y_SBD = layer(x_SBD)[0]
        torch.autograd.grad(y_SBD, [problem.x_TD], problem.grad_y_TD.view_as(y_SBD))
        del y_SBD
        dispatcher = "alltoall"
    except Exception as err:  # noqa: BLE001 - try the other dispatcher before giving up on the peer
        notes["alltoall_error"] = describe_error(err)
        layer = _megatron_layer(problem, env, "allgather")
        dispatcher = "allgather"
    notes.update(config=f"TransformerConfig(softmax top-{s.K}, pre_softmax=False, router fp32, dispatcher {dispatcher})",
                 experts=f"{type(layer.experts).__name__} (no grouped_gemm / Transformer Engine here)")
    return PeerRun(lambda: layer(x_SBD)[0].view(s.T, s.D), list(layer.parameters()), notes)


def build_hf_experts(problem: Problem, env: PeerEnv, implementation: str) -> PeerRun:
    """transformers' MixtralExperts with our weights, dispatched through its experts interface as `implementation`."""
    from moe_engine.bench.problem import softmax_topk

    _require("transformers")
    import transformers

    try:
        from transformers.integrations.moe import ExpertsInterface  # noqa: F401 - the interface, 5.x only
        from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralExperts
    except ImportError as err:
        raise PeerSkipped(f"transformers {transformers.__version__} has no experts interface: {err}") from None
    s = problem.shape
    if implementation == "grouped_mm":
        from moe_engine.kernels.torch_grouped_mm import grouped_mm_unsupported_reason

        reason = grouped_mm_unsupported_reason(problem.device, problem.dtype, (s.D, s.F, 2 * s.F))
        if reason is not None:
            raise PeerSkipped(f"HF's grouped_mm calls torch's grouped_mm: {reason}")
    notes: dict[str, Any] = {"transformers": transformers.__version__,
                             "config": f"MixtralExperts, experts_implementation={implementation!r}, "
                                       "routed by the problem's softmax top-k"}
    if implementation == "moe_engine":
        from moe_engine.hf.experts_interface import experts_layout, register_experts_implementation, resolve_impl

        register_experts_implementation(implementation)
    config = MixtralConfig(hidden_size=s.D, intermediate_size=s.F, num_local_experts=s.E, num_experts_per_tok=s.K,
                           hidden_act="silu")
    config._experts_implementation = implementation
    experts = _build_on(problem.device, problem.dtype, lambda: MixtralExperts(config))
    with torch.no_grad():
        experts.gate_up_proj.copy_(problem.w_in_EHD)  # (E, 2F, D), [gate; up] rows: HF's layout and ours
        experts.down_proj.copy_(problem.w_out_EDF)
    if implementation == "moe_engine":
        layout = experts_layout(experts)
        notes["experts_impl"] = resolve_impl(problem.device, problem.dtype, (s.D, s.F, 2 * s.F))
        notes["fused_activation"] = layout.fused_activation
    x_TD, router_weight_ED = problem.x_TD, problem.router_weight_ED

    def forward() -> torch.Tensor:
        weights_TK, experts_TK = softmax_topk(x_TD, router_weight_ED, s.K)
        return experts(x_TD, experts_TK, weights_TK)

    return PeerRun(forward, [router_weight_ED, *experts.parameters()], notes,
                   problem_weights=(router_weight_ED, experts.gate_up_proj, experts.down_proj))


BUILDERS: types.MappingProxyType[str, Callable[[Problem, PeerEnv], PeerRun]] = types.MappingProxyType({
    "ours": build_ours,
    "ours_recompute": functools.partial(build_ours, recompute=True),
    "torch_loop": build_torch_loop,
    "grouped_mm": build_grouped_mm,
    "deepspeed": build_deepspeed,
    "deepspeed_dropless": build_deepspeed_dropless,
    "megatron": build_megatron,
    "hf_eager": functools.partial(build_hf_experts, implementation="eager"),
    "hf_grouped_mm": functools.partial(build_hf_experts, implementation="grouped_mm"),
    "hf_moe_engine": functools.partial(build_hf_experts, implementation="moe_engine"),
})
PEERS = tuple(BUILDERS)
