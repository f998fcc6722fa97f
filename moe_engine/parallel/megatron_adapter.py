"""megatron-core (0.16.1) integration: moe_engine's router, dispatcher and experts as the `mlp` of a
megatron-core TransformerLayer.

    spec = get_gpt_decoder_block_spec_with_moe_engine(config)        # honours config.moe_layer_freq
    model = GPTModel(config, spec, vocab_size, max_sequence_length)
    # or one layer: get_gpt_layer_spec_with_moe_engine(); or only the mlp: moe_engine_mlp_spec()

`MegatronMoEAdapter` takes megatron's (config: TransformerConfig) constructor and its mlp contract,
forward(hidden_states [S, B, H], padding_mask=None) -> (output [S, B, H], None), and runs
moe_engine.layer.MoELayer built from `moe_config_from_megatron(config)`. TransformerConfig fields it
cannot honour are refused together, in one ConfigError naming each field, its value and what works.

What megatron's training loop needs from an MoE layer, done the way megatron's own router does it:
- Aux loss: the router's weighted load-balancing + z-loss is attached to the output with
  megatron's `MoEAuxLossAutoScaler`, so backward of the main loss gives it gradient
  `MoEAuxLossAutoScaler.main_loss_backward_scale` (which megatron's schedule sets to
  loss_scale / num_microbatches); with `calculate_per_token_loss` it is scaled by the local
  token count first, as megatron's router does. Unweighted values go to megatron's tracker
  (`save_to_aux_losses_tracker`: "load_balancing_loss" or "seq_load_balancing_loss", and
  "z_loss") for `track_moe_metrics`. Both only in training with grad enabled (megatron's rule,
  which also keeps full-layer recomputation from counting a layer twice).
- Aux-loss-free balancing (`moe_router_enable_expert_bias`): our router keeps `expert_bias`; the
  adapter gives it the `local_tokens_per_expert` buffer megatron's `finalize_model_grads`
  reads, all-reduces and resets, and counts the routed choices into it each training step.
- Expert parallelism: the expert-parallel group is `pg_collection.ep`, where pg_collection is
  the ProcessGroupCollection handed to the spec (`moe_engine_mlp_spec(pg_collection=...)`), else
  megatron's own parallel_state groups when `initialize_model_parallel` has run (what megatron's
  MoELayer falls back to), else none (then expert_model_parallel_size must be 1). With more than
  one rank in it, tokens travel by moe_engine's AllToAllDispatcher over that group, each rank
  holds num_moe_experts / EP experts, and those parameters carry `allreduce = False` so that
  megatron's DistributedDataParallel and optimizer reduce them over the expert-data-parallel
  group, as they do megatron's experts. `sharded_state_dict` places each rank's experts in the
  global (E, ...) tensors of a distributed checkpoint.
- Initialisation: with `perform_initialization`, weights use config.init_method (router, up
  projections, shared-expert gate) and config.output_layer_init_method (down projections).
  Expert e is drawn from a seed of its own, derived from one draw of the global CPU generator per
  layer, so an EP run starts from the same weights as the single-rank run with that seed.

Not supported: tensor, context and expert-tensor parallelism (size 1 each: the router and experts
are not split over those ranks), and padding masks. Routing runs in fp32 for moe_router_dtype None
as for "fp32" (megatron routes in the input's dtype for None). megatron's token-dispatcher choice
(allgather / alltoall / flex) and its fusion switches (moe_grouped_gemm, moe_permute_fusion,
moe_router_fusion) select megatron's own implementations: moe_engine's dispatcher and kernels run
instead. The layer specs use megatron's local (non-Transformer-Engine) modules around the MoE.
megatron's TransformerLayer logs "Unknown MLP type ... Using default kwargs" for this mlp: it hands
process groups only to MLP classes it knows, which is why pg_collection travels in the spec.
On CPU megatron-core builds these specs, but its attention forward needs CUDA.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_layer import MoELayer as MegatronMoELayer
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, save_to_aux_losses_tracker
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.utils.checkpoint import checkpoint

from moe_engine.config import ConfigError, MoEConfig, RouterConfig
from moe_engine.layer import MoELayer, MoEOutput
from moe_engine.parallel.all_to_all import AllToAllDispatcher
from moe_engine.routing.types import RoutingContext

# megatron's load-balancing types and ours; the others (global_aux_loss, sinkhorn) are refused.
_BALANCE_TYPES = {"aux_loss": "switch", "seq_aux_loss": "seq_switch", "none": "none"}
# The names megatron's router logs each loss under in its aux-loss tracker.
_TRACKER_NAMES = {"switch": "load_balancing_loss", "seq_switch": "seq_load_balancing_loss"}


def _activation(config: TransformerConfig) -> str | None:
    """'swiglu' or 'gelu' for the (gated_linear_unit, activation_func) pairs our experts compute, else None."""
    if config.gated_linear_unit and config.activation_func is F.silu:
        return "swiglu"
    if not config.gated_linear_unit and config.activation_func is F.gelu:
        return "gelu"
    return None


def _balance_setting(config: TransformerConfig) -> tuple[Any, Any]:
    """(load-balancing type, its coefficient), a one-element list unwrapped."""
    kind, coeff = config.moe_router_load_balancing_type, config.moe_aux_loss_coeff
    if isinstance(kind, list) and len(kind) == 1:
        kind = kind[0]
        coeff = coeff[0] if isinstance(coeff, list) else coeff
    return kind, coeff


def unsupported_megatron_settings(config: TransformerConfig) -> list[str]:
    """Each TransformerConfig setting the moe_engine layer cannot honour, as 'field = value: why / what works'."""
    problems = []

    def refuse(field: str, allowed: str) -> None:
        problems.append(f"{field} = {getattr(config, field)!r}: {allowed}")

    if config.num_moe_experts is None:
        refuse("num_moe_experts", "the MoE layer needs experts; set it")
    if config.add_bias_linear:
        refuse("add_bias_linear", "moe_engine's router and experts have no biases; set False")
    if _activation(config) is None:
        name = getattr(config.activation_func, "__name__", repr(config.activation_func))
        problems.append(
            f"gated_linear_unit = {config.gated_linear_unit}, activation_func = {name}: allowed: "
            "gated_linear_unit=True with F.silu (SwiGLU), or False with F.gelu (GELU)"
        )
    if config.glu_linear_offset != 0.0:
        refuse("glu_linear_offset", "must be 0.0")
    if config.activation_func_clamp_value is not None:
        refuse("activation_func_clamp_value", "must be None")
    kind, coeff = _balance_setting(config)
    if isinstance(kind, list) or kind not in _BALANCE_TYPES:
        refuse("moe_router_load_balancing_type", f"allowed: {', '.join(map(repr, _BALANCE_TYPES))} (one of them)")
        kind = "none"
    has_balance_loss = kind != "none" and coeff > 0
    grouped = bool(config.moe_router_group_topk)
    if grouped:
        group_size = config.num_moe_experts // config.moe_router_num_groups if config.num_moe_experts else 0
        if config.moe_router_topk // config.moe_router_group_topk != min(2, group_size):
            # megatron scores a group by its top (topk // group_topk) experts; ours by its top 2.
            problems.append(
                f"moe_router_topk // moe_router_group_topk = {config.moe_router_topk} // "
                f"{config.moe_router_group_topk}: moe_engine scores a group by its {min(2, group_size)} best "
                f"experts; group-limited routing needs the quotient to be {min(2, group_size)}"
            )
        if config.moe_router_score_function == "softmax" and not config.moe_router_pre_softmax:
            refuse("moe_router_pre_softmax", "group-limited softmax routing needs True "
                   "(megatron ranks the groups by logits otherwise, moe_engine by probabilities)")
    if has_balance_loss and (grouped or config.moe_router_enable_expert_bias):
        # megatron counts f_i over a top-k without groups or bias; ours over the choices made.
        problems.append(
            f"moe_aux_loss_coeff = {coeff!r} with "
            f"{'moe_router_group_topk' if grouped else 'moe_router_enable_expert_bias'}: megatron's balance "
            "loss counts an unconstrained top-k, moe_engine's the choices made; set the coefficient to 0"
        )
    if config.moe_router_enable_expert_bias and config.moe_router_bias_update_rate <= 0:
        refuse("moe_router_bias_update_rate", "must be > 0 with moe_router_enable_expert_bias")
    if config.moe_expert_capacity_factor is not None and config.moe_token_drop_policy != "probs":
        refuse("moe_token_drop_policy", "allowed: 'probs' (megatron's 'position' keeps a different set of choices)")
    if config.moe_router_dtype == "fp64":
        refuse("moe_router_dtype", "allowed: None or 'fp32' (moe_engine routes in fp32)")
    for field in ("moe_input_jitter_eps", "moe_latent_size", "fp8", "fp4"):
        if getattr(config, field) is not None:
            refuse(field, "must be None")
    for field in (
        "moe_router_force_load_balancing", "moe_enable_routing_replay", "moe_apply_probs_on_input",
        "moe_router_padding_for_quantization", "moe_shared_expert_overlap",
    ):
        if getattr(config, field):
            refuse(field, "must be False")
    shared = config.moe_shared_expert_intermediate_size
    if shared is not None and config.moe_ffn_hidden_size and shared % config.moe_ffn_hidden_size:
        refuse("moe_shared_expert_intermediate_size", f"must be a multiple of moe_ffn_hidden_size "
               f"({config.moe_ffn_hidden_size}): moe_engine's shared experts have the routed experts' width")
    for field in ("tensor_model_parallel_size", "context_parallel_size", "expert_tensor_parallel_size"):
        if (getattr(config, field) or 1) > 1:
            refuse(field, "must be 1 (moe_engine's router and experts are not split over these ranks)")
    if getattr(config, "cuda_graph_impl", "none") != "none":
        refuse("cuda_graph_impl", "must be 'none' (moe_engine's dispatch sizes rows on the host)")
    modules = config.recompute_modules or []
    if config.recompute_granularity == "selective" and "shared_experts" in modules and "moe" not in modules:
        refuse("recompute_modules", "'shared_experts' alone is not offered; use 'moe' (the whole layer)")
    return problems


def moe_config_from_megatron(config: TransformerConfig, *, experts_impl: str = "auto") -> MoEConfig:
    """The MoEConfig computing what megatron-core's MoE layer computes for `config`.

    Field map: num_moe_experts -> num_experts; moe_ffn_hidden_size -> ffn_hidden; gated_linear_unit
    + activation_func -> activation; moe_shared_expert_intermediate_size -> num_shared_experts *
    ffn_hidden; moe_shared_expert_gate -> shared_expert_gate; moe_router_score_function ->
    router.type (softmax_topk / sigmoid_topk); moe_router_topk -> top_k; renormalize: softmax
    without moe_router_pre_softmax (top-k then softmax over the k equals renormalised probabilities)
    or sigmoid with k > 1; moe_router_topk_scaling_factor -> scaling_factor;
    moe_router_load_balancing_type aux_loss / seq_aux_loss / none -> aux_loss_type switch /
    seq_switch / none with moe_aux_loss_coeff; moe_z_loss_coeff -> z_loss_coef;
    moe_expert_capacity_factor and moe_token_drop_policy 'probs' -> capacity_factor, drop_policy
    'score'; moe_router_num_groups / moe_router_group_topk -> n_groups / topk_groups;
    moe_router_enable_expert_bias -> expert_bias_rate = moe_router_bias_update_rate.
    Raises ConfigError listing every setting of `unsupported_megatron_settings`.
    """
    problems = unsupported_megatron_settings(config)
    if problems:
        raise ConfigError(
            "megatron-core TransformerConfig settings the moe_engine MoE layer cannot honour: " + "; ".join(problems)
        )
    kind, coeff = _balance_setting(config)
    sigmoid = config.moe_router_score_function == "sigmoid"
    grouped = bool(config.moe_router_group_topk)
    ffn = config.moe_ffn_hidden_size
    shared = config.moe_shared_expert_intermediate_size
    return MoEConfig(
        num_experts=config.num_moe_experts,
        ffn_hidden=ffn,
        activation=_activation(config),
        num_shared_experts=0 if shared is None else shared // ffn,
        shared_expert_gate=shared is not None and config.moe_shared_expert_gate,
        experts_impl=experts_impl,
        router=RouterConfig(
            type="sigmoid_topk" if sigmoid else "softmax_topk",
            top_k=config.moe_router_topk,
            renormalize=config.moe_router_topk > 1 if sigmoid else not config.moe_router_pre_softmax,
            scaling_factor=config.moe_router_topk_scaling_factor or 1.0,
            aux_loss_type=_BALANCE_TYPES[kind],
            aux_loss_coef=float(coeff) if kind != "none" else 0.0,
            z_loss_coef=float(config.moe_z_loss_coeff or 0.0),
            capacity_factor=config.moe_expert_capacity_factor,
            # Megatron's "probs" drops by score; dropless (no capacity) drops nothing, so the default.
            drop_policy="score" if config.moe_expert_capacity_factor is not None else "position",
            expert_bias_rate=config.moe_router_bias_update_rate if config.moe_router_enable_expert_bias else 0.0,
            n_groups=config.moe_router_num_groups if grouped else 1,
            topk_groups=config.moe_router_group_topk if grouped else 1,
        ),
    )


def _default_groups() -> ProcessGroupCollection | None:
    """megatron's parallel_state groups when it was initialised (what megatron's MoELayer falls back to), else None."""
    if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
        return None
    return ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp", "ep", "tp_cp", "expt_dp"])


def _group_size_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    return (1, 0) if group is None else (dist.get_world_size(group), dist.get_rank(group))


class MegatronMoEAdapter(MegatronModule):
    """moe_engine's MoELayer behind megatron-core's mlp interface (see the module docstring).

    Args:
        config: megatron's TransformerConfig (mapped by `moe_config_from_megatron`).
        pg_collection: megatron's ProcessGroupCollection; `ep` is the expert-parallel group,
            `expt_dp` the expert-data-parallel group (checkpoint replicas), `tp_cp` the group
            megatron's tracker reduces the balance loss over. None: parallel_state's, if initialised.
        experts_impl: moe_engine's grouped-GEMM choice ("auto", "loop", "grouped_mm", "triton").
        layer_number: megatron's 1-based layer index for the tracker (TransformerLayer sets it).

    Attributes: moe (moe_engine.layer.MoELayer), ep_size, ep_rank.
    """

    def __init__(
        self,
        config: TransformerConfig,
        pg_collection: ProcessGroupCollection | None = None,
        experts_impl: str = "auto",
        layer_number: int | None = None,
    ) -> None:
        super().__init__(config)
        moe_config = moe_config_from_megatron(config, experts_impl=experts_impl)
        if pg_collection is None:
            pg_collection = _default_groups()
        ep_group = getattr(pg_collection, "ep", None)
        self.ep_size, self.ep_rank = _group_size_rank(ep_group)
        if self.ep_size != config.expert_model_parallel_size:
            raise ConfigError(
                f"expert_model_parallel_size = {config.expert_model_parallel_size}: the expert-parallel group "
                f"{'given' if ep_group is not None else '(none: no pg_collection and no parallel_state)'} has "
                f"{self.ep_size} ranks; pass pg_collection or initialise megatron's parallel_state"
            )
        self.tp_group = getattr(pg_collection, "tp", None)  # read by MegatronModule.sharded_state_dict
        self._expt_dp_group = getattr(pg_collection, "expt_dp", None)
        self._balance_reduce_group = getattr(pg_collection, "tp_cp", None)
        self.layer_number = layer_number
        self.balance_tracker_name = _TRACKER_NAMES.get(moe_config.router.aux_loss_type)
        modules = config.recompute_modules or []
        self.recompute = config.recompute_granularity == "selective" and "moe" in modules

        dispatcher = None
        if self.ep_size > 1:
            dispatcher = AllToAllDispatcher(
                moe_config.num_experts, ep_group, fixed_splits=config.moe_pad_expert_input_to_capacity
            )
        # One draw of the global generator per layer, whatever the EP size; the layer is built and
        # initialised from seeds derived from it, so the global stream moves the same on every rank.
        seed = int(torch.randint(0, 2**62, ()).item())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.moe = MoELayer.from_config(config.hidden_size, moe_config, dispatcher)
        if config.perform_initialization:
            self._initialize(seed)
        for p in self.moe.parameters():
            p.data = p.data.to(config.params_dtype)
        for p in self.moe.experts.parameters():
            # megatron's DDP and optimizer reduce parameters with allreduce=False over the
            # expert-data-parallel group: our expert shards differ across the EP group.
            p.allreduce = self.ep_size == 1
        router = self.moe.router
        if getattr(router, "expert_bias", None) is not None:
            # What megatron's finalize_model_grads reads (and zeroes) next to every `expert_bias`.
            router.register_buffer(
                "local_tokens_per_expert", torch.zeros(moe_config.num_experts, dtype=torch.float32), persistent=False
            )
        if not config.use_cpu_initialization and torch.cuda.is_available():
            self.cuda(torch.cuda.current_device())

    @torch.no_grad()
    def _initialize(self, seed: int) -> None:
        """megatron's init methods; expert e (global id) from seed + 1 + e, the rest from seed."""
        config, moe = self.config, self.moe
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            config.init_method(moe.router.weight)
            if moe.shared_experts is not None:
                config.init_method(moe.shared_experts.w_in.weight)
                config.output_layer_init_method(moe.shared_experts.w_out.weight)
            if moe.shared_expert_gate is not None:
                config.init_method(moe.shared_expert_gate.weight)
        first = self.ep_rank * moe.dispatcher.num_local_experts
        for local in range(moe.dispatcher.num_local_experts):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + 1 + first + local)
                config.init_method(moe.experts.w_in[local])
                config.output_layer_init_method(moe.experts.w_out[local])

    def set_layer_number(self, layer_number: int) -> None:
        """megatron's TransformerLayer calls this after building its mlp (the tracker's row)."""
        self.layer_number = layer_number

    def forward(
        self, hidden_states: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, None]:
        """hidden_states: [S, B, H] in the model dtype -> ([S, B, H] same dtype, None: no bias).

        padding_mask: [B, S] bool, True at padding; refused when it marks any token, since
        moe_engine's routers have no mask (padding tokens would count in the balance loss).
        """
        if padding_mask is not None and bool(padding_mask.any()):  # NOTE: device-to-host sync
            raise ValueError(
                "padding_mask marks padding tokens: the moe_engine MoE layer routes every token and cannot "
                "exclude them from its balance loss; pass no mask (or an all-False one)"
            )
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states has shape {tuple(hidden_states.shape)}: expected [S, B, H]")
        router = self.moe.router
        if getattr(router, "expert_bias", None) is not None and router.expert_bias.dtype != torch.float32:
            # A bf16/fp16 wrapper casts buffers too; steps of ~1e-3 need fp32 (as megatron's router keeps it).
            router.expert_bias.data = router.expert_bias.data.float()
        ctx = self._routing_context(hidden_states)
        if self.recompute and torch.is_grad_enabled():
            out: MoEOutput = checkpoint(self.moe, hidden_states, ctx, use_reentrant=False)
        else:
            out = self.moe(hidden_states, ctx)
        y = out.y
        if self.training and torch.is_grad_enabled():
            y = self._attach_aux_loss(y, out)
            self._count_tokens(out)
        return y, None

    def _routing_context(self, hidden_states: torch.Tensor) -> RoutingContext | None:
        """Token t of the flattened [S, B] grid is (t // B, t % B): sequence t % B (megatron's seq_aux_loss)."""
        if self.balance_tracker_name != "seq_load_balancing_loss":
            return None
        num_seqs = hidden_states.shape[1]
        tokens = hidden_states.shape[0] * num_seqs
        return RoutingContext(sequence_ids_T=torch.arange(tokens, device=hidden_states.device) % num_seqs)

    def _attach_aux_loss(self, y: torch.Tensor, out: MoEOutput) -> torch.Tensor:
        """megatron's router rules: the weighted aux loss rides on y's backward; unweighted terms to the tracker."""
        aux_loss = out.aux_loss
        if aux_loss.requires_grad:
            if self.config.calculate_per_token_loss:
                # megatron divides every gradient by the global token count afterwards.
                aux_loss = aux_loss * out.routing.experts_TK.shape[0]
            y = MoEAuxLossAutoScaler.apply(y, aux_loss)
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        terms = out.routing.aux_terms
        if "balance_loss" in terms and self.balance_tracker_name is not None:
            save_to_aux_losses_tracker(
                self.balance_tracker_name, terms["balance_loss"], self.layer_number, num_layers,
                reduce_group=self._balance_reduce_group,
            )
        if "z_loss" in terms:
            save_to_aux_losses_tracker("z_loss", terms["z_loss"], self.layer_number, num_layers)
        return y

    @torch.no_grad()
    def _count_tokens(self, out: MoEOutput) -> None:
        counts = getattr(self.moe.router, "local_tokens_per_expert", None)
        if counts is None:
            return
        experts_N = out.routing.experts_TK.reshape(-1)
        if out.routing.capacity is not None:
            experts_N = experts_N[experts_N >= 0]  # NOTE: device-to-host sync (dropped choices count nowhere)
        counts += torch.bincount(experts_N, minlength=counts.numel())

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """megatron's distributed-checkpoint view: everything replicated (MegatronModule's default)
        except the experts, which this rank holds rows [ep_rank * E/EP, (ep_rank + 1) * E/EP) of."""
        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.ep_size == 1:
            return sharded
        _, expt_dp_rank = _group_size_rank(self._expt_dp_group)
        axis = len(sharded_offsets)
        for name, param in self.moe.experts.named_parameters():
            key = f"{prefix}moe.experts.{name}"
            sharded[key] = ShardedTensor.from_rank_offsets(
                key, param, *sharded_offsets, (axis, self.ep_rank, self.ep_size),
                replica_id=(0, 0, expt_dp_rank), prepend_axis_num=axis,
            )
        return sharded


def moe_engine_mlp_spec(
    *, pg_collection: ProcessGroupCollection | None = None, experts_impl: str = "auto"
) -> ModuleSpec:
    """A ModuleSpec for a TransformerLayer's `mlp`: `MegatronMoEAdapter` with these arguments.

    pg_collection travels in the spec's params because megatron's TransformerLayer hands process
    groups only to the MLP classes it knows; None: parallel_state's groups when the layer is built.
    """
    params: dict[str, Any] = {"experts_impl": experts_impl}
    if pg_collection is not None:
        params["pg_collection"] = pg_collection
    return ModuleSpec(module=MegatronMoEAdapter, params=params, metainfo={"fuse_pre_mlp_layernorm": False})


def _with_moe_engine_mlp(layer_spec: ModuleSpec, mlp_spec: ModuleSpec) -> ModuleSpec:
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(layer_spec.submodules, mlp=mlp_spec))


def get_gpt_layer_spec_with_moe_engine(
    *,
    qk_layernorm: bool = False,
    multi_latent_attention: bool = False,
    normalization: str | None = None,
    qk_l2_norm: bool = False,
    pg_collection: ProcessGroupCollection | None = None,
    experts_impl: str = "auto",
) -> ModuleSpec:
    """A TransformerLayer spec: megatron's `get_gpt_layer_local_spec` MoE layer (pure-PyTorch megatron
    modules, no Transformer Engine) with moe_engine's layer as its mlp. The expert count and every
    MoE setting come from the TransformerConfig the layer is built with."""
    # num_experts only selects megatron's MoE variant of the layer (its pre-MLP norm and mlp slot).
    megatron_spec = get_gpt_layer_local_spec(
        num_experts=1, qk_layernorm=qk_layernorm, multi_latent_attention=multi_latent_attention,
        normalization=normalization, qk_l2_norm=qk_l2_norm,
    )
    mlp_spec = moe_engine_mlp_spec(pg_collection=pg_collection, experts_impl=experts_impl)
    return _with_moe_engine_mlp(megatron_spec, mlp_spec)


def get_gpt_decoder_block_spec_with_moe_engine(
    config: TransformerConfig,
    *,
    normalization: str | None = None,
    qk_l2_norm: bool = False,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
    pg_collection: ProcessGroupCollection | None = None,
    experts_impl: str = "auto",
) -> TransformerBlockSubmodules:
    """megatron's `get_gpt_decoder_block_spec(config, use_transformer_engine=False, ...)` with
    moe_engine's layer in every MoE layer (config.moe_layer_freq decides which; dense layers keep
    megatron's MLP). Settings moe_engine cannot honour are refused here, before anything is built."""
    moe_config_from_megatron(config, experts_impl=experts_impl)
    block = get_gpt_decoder_block_spec(
        config, use_transformer_engine=False, normalization=normalization, qk_l2_norm=qk_l2_norm,
        vp_stage=vp_stage, pp_rank=pp_rank,
    )
    mlp_spec = moe_engine_mlp_spec(pg_collection=pg_collection, experts_impl=experts_impl)
    layer_specs = [
        _with_moe_engine_mlp(spec, mlp_spec) if spec.submodules.mlp.module is MegatronMoELayer else spec
        for spec in block.layer_specs
    ]
    return dataclasses.replace(block, layer_specs=layer_specs)
