"""Task-level MoE: route by task id, not by token, so each task's sub-network is fixed and extractable.

Kudugunta et al. 2021 ("Beyond Distillation: Task-level Mixture-of-Experts for Efficient
Inference"): every token of task t takes the same K experts with the same weights, so after
training the layer reduces, for task t, to a dense FFN made of those K experts; serving a task
needs only its experts. Two gates give the task's logits over the E experts:

    gate="table":          logits_t = L[t]                       L: (num_tasks, E) parameters
    gate="embedding_mlp":  logits_t = W2 relu(W1 e_t + b1) + b2  e_t: a learned task embedding
                           (Ye et al. 2022, task-level MoE with a router MLP over a task representation)
    weights, experts = top-k of softmax(logits_t / temperature), renormalised over the k chosen
                       (renormalize=True) or not (the k probabilities as they are)

In training, `gumbel=True` adds Gumbel(0, 1) noise to each task's logits before the temperature
(Ye et al.'s Gumbel-softmax exploration); the noise is drawn once per task per forward, so all
tokens of a task still share one routing within a batch. The router adds no auxiliary loss
(aux_loss is 0): which experts each task uses is what the gate learns from the task losses. So
top_k = 1 needs renormalize=False: a renormalised single weight is p / p = 1, which passes no
gradient to the gate.

`extract_task_ffn` turns a layer into the dense module of one task; `extract_task_model` does so
for every task-level layer of a model.
"""

from __future__ import annotations

import copy
import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from moe_engine.experts import MLP, GroupedExperts
from moe_engine.kernels.router import topk_gating
from moe_engine.layer import MoELayer, shared_expert_gate_logits
from moe_engine.mtl.statistics import check_task_ids
from moe_engine.parallel import LocalDispatcher
from moe_engine.routing.capacity import check_routing_args
from moe_engine.routing.types import Routing, RoutingContext

TASK_GATES = ("table", "embedding_mlp")


class TaskLevelRouter(nn.Module):
    """Routes every token of task t to the same K of E experts, with the same weights.

    Args:
        d_model: width D of the tokens (not read: the routing depends on the task only).
        num_experts: E.
        top_k: K, 1 <= K <= E.
        num_tasks: task ids lie in [0, num_tasks); read from ctx.task_ids_T.
        gate: "table" (learned logits per task, init N(0, 0.02^2)) or "embedding_mlp" (a task
            embedding of task_embed_dim through Linear -> ReLU -> Linear to E logits).
        task_embed_dim: width of the task embedding and of the MLP's hidden layer ("embedding_mlp").
        temperature: the logits are divided by it before the softmax; > 0.
        gumbel: in training, add Gumbel(0, 1) noise to the task logits (drawn per task, per forward).
        renormalize: divide the K chosen probabilities by their sum; must be False when K = 1.

    forward(x_TD, ctx) -> Routing: dropless (capacity None), aux_loss 0.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        num_tasks: int,
        *,
        gate: str = "table",
        task_embed_dim: int = 32,
        temperature: float = 1.0,
        gumbel: bool = False,
        renormalize: bool = True,
    ) -> None:
        super().__init__()
        if d_model < 1:
            raise ValueError(f"d_model = {d_model}: must be >= 1")
        if num_experts < 1:
            raise ValueError(f"num_experts = {num_experts}: must be >= 1")
        check_routing_args(num_experts, top_k)
        if num_tasks < 1:
            raise ValueError(f"num_tasks = {num_tasks}: must be >= 1")
        if gate not in TASK_GATES:
            raise ValueError(f"gate = {gate!r}: allowed: {', '.join(TASK_GATES)}")
        if task_embed_dim < 1:
            raise ValueError(f"task_embed_dim = {task_embed_dim}: must be >= 1")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature = {temperature}: must be a finite number > 0")
        if top_k == 1 and renormalize:
            raise ValueError("top_k = 1 with renormalize=True: the one weight would be p / p = 1, which passes no "
                             "gradient to the task gate (it has no aux loss); use renormalize=False")
        self.d_model = d_model
        self.num_experts = num_experts
        self.top_k = top_k
        self.num_tasks = num_tasks
        self.gate = gate
        self.temperature = float(temperature)
        self.gumbel = gumbel
        self.renormalize = renormalize
        if gate == "table":
            # Small: the tasks start near-uniform over their chosen experts and the table learns the rest.
            self.task_logits_XE = nn.Parameter(torch.empty(num_tasks, num_experts))
            nn.init.normal_(self.task_logits_XE, std=0.02)
        else:
            self.task_embed = nn.Embedding(num_tasks, task_embed_dim)
            self.mlp_in = nn.Linear(task_embed_dim, task_embed_dim)
            self.mlp_out = nn.Linear(task_embed_dim, num_experts)

    def task_specific_parameters(self) -> list[nn.Parameter]:
        """The per-task rows (the table, or the task embeddings; the embedding MLP is shared between
        tasks): no shared parameters for gradient-based loss weighting."""
        return [self.task_logits_XE] if self.gate == "table" else [self.task_embed.weight]

    def task_logits(self) -> torch.Tensor:
        """(num_tasks, E) float32: every task's logits, before noise and temperature."""
        with torch.autocast(device_type=self._device().type, enabled=False):
            if self.gate == "table":
                return self.task_logits_XE.float()
            h_XM = F.linear(self.task_embed.weight.float(), self.mlp_in.weight.float(), self.mlp_in.bias.float())
            return F.linear(F.relu(h_XM), self.mlp_out.weight.float(), self.mlp_out.bias.float())

    def forward(self, x_TD: torch.Tensor, ctx: RoutingContext | None = None) -> Routing:
        """x_TD: (T, D), read for T and the device only; ctx.task_ids_T: (T,) integer in [0, num_tasks)."""
        num_tokens = x_TD.shape[0]
        task_ids_T = check_task_ids(ctx.task_ids_T if ctx else None, num_tokens, self.num_tasks, "TaskLevelRouter")
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_XE = self.task_logits()
            if self.training and self.gumbel:
                # Gumbel(0, 1) = -log(Exp(1)); the clamp keeps a (vanishingly rare) 0 draw finite.
                exp_XE = torch.empty_like(logits_XE).exponential_()
                logits_XE = logits_XE - exp_XE.clamp_min(torch.finfo(torch.float32).tiny).log()
            logits_TE = (logits_XE / self.temperature).index_select(0, task_ids_T.to(logits_XE.device))
            gating = topk_gating(logits_TE, self.top_k, renormalize=self.renormalize)
        return Routing(gating.weights_TK, gating.experts_TK, gating.scores_TE, logits_TE.new_zeros(()), {}, None)

    @torch.no_grad()
    def task_experts(self, task: int) -> tuple[list[int], torch.Tensor]:
        """The fixed routing of `task` (as in eval mode: no noise), whatever the module's mode.

        Returns (experts_K: K expert ids, best first; weights_K: (K,) float32, detached).
        """
        task = self.check_task(task)
        logits_1E = self.task_logits()[task : task + 1] / self.temperature
        gating = topk_gating(logits_1E, self.top_k, renormalize=self.renormalize)
        return [int(e) for e in gating.experts_TK[0].tolist()], gating.weights_TK[0].detach().clone()

    def check_task(self, task: int) -> int:
        """`task` as an int in [0, num_tasks); ValueError otherwise."""
        try:
            if isinstance(task, bool):
                raise TypeError
            task_id = operator.index(task)
        except TypeError:
            raise ValueError(f"task = {task!r}: expected an int task id in [0, {self.num_tasks - 1}]") from None
        if not 0 <= task_id < self.num_tasks:
            raise ValueError(f"task = {task_id}: allowed [0, {self.num_tasks - 1}] ({self.num_tasks} tasks)")
        return task_id

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}, num_tasks={self.num_tasks}, "
            f"gate={self.gate}, temperature={self.temperature:g}, gumbel={self.gumbel}, renormalize={self.renormalize}"
        )


def _task_level_router(module: nn.Module, who: str) -> TaskLevelRouter:
    router = module.router if isinstance(module, MoELayer) else module
    if not isinstance(router, TaskLevelRouter):
        raise TypeError(
            f"{who}: needs a TaskLevelRouter or an MoELayer routed by one; got "
            + (f"an MoELayer routed by {type(router).__name__}" if router is not module else type(module).__name__)
        )
    return router


def task_experts(module: nn.Module, task: int) -> tuple[list[int], torch.Tensor]:
    """`TaskLevelRouter.task_experts` of a TaskLevelRouter, or of an MoELayer's; TypeError for other routers."""
    return _task_level_router(module, "task_experts").task_experts(task)


class TaskFFN(nn.Module):
    """The dense FFN an MoELayer with a TaskLevelRouter computes for the tokens of one task.

    routed: one `MLP` of width K*F holding the task's K experts side by side, each expert's
    down-projection scaled by its routing weight, so that routed(x) = sum_k w_k expert_k(x).
    shared_experts, shared_expert_gate: the layer's, as they were.
    forward(x (..., D), ctx=None) -> (..., D), a plain tensor: a model's block calls it as a dense FFN.
    """

    def __init__(
        self,
        routed: MLP,
        task: int,
        experts_K: list[int],
        weights_K: list[float],
        shared_experts: nn.Module | None = None,
        shared_expert_gate: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.routed = routed
        self.shared_experts = shared_experts
        self.shared_expert_gate = shared_expert_gate
        self.task = task
        self.experts_K = tuple(experts_K)
        self.weights_K = tuple(weights_K)

    def forward(self, x: torch.Tensor, ctx: RoutingContext | None = None) -> torch.Tensor:
        y = self.routed(x)
        if self.shared_experts is not None:
            shared = self.shared_experts(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(shared_expert_gate_logits(self.shared_expert_gate, x)) * shared
            y = y + shared
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        weights = ", ".join(f"{w:.4g}" for w in self.weights_K)
        return f"task={self.task}, experts={list(self.experts_K)}, weights=[{weights}]"


@torch.no_grad()
def extract_task_ffn(layer: MoELayer, task: int) -> TaskFFN:
    """A dense module computing what `layer` computes for the tokens of `task`, with only its K experts.

    `layer` must be an MoELayer with a TaskLevelRouter, a LocalDispatcher (all experts here) and
    GroupedExperts. The result is independent of `layer` (copies of the weights), in its mode,
    dtype and device. Equal to the layer up to rounding: the routing weight multiplies the expert
    weights (w_k W_out,k) rather than the expert outputs, which in bf16 rounds differently.
    """
    if not isinstance(layer, MoELayer):
        raise TypeError(f"extract_task_ffn: needs an MoELayer; got {type(layer).__name__}")
    router = _task_level_router(layer, "extract_task_ffn")
    if not isinstance(layer.dispatcher, LocalDispatcher):
        raise TypeError(
            f"extract_task_ffn: the layer's dispatcher is {type(layer.dispatcher).__name__}: needs a LocalDispatcher "
            "(all experts on this process); gather the expert weights into a local layer first"
        )
    experts = layer.experts
    if not isinstance(experts, GroupedExperts):
        raise TypeError(f"extract_task_ffn: the layer's experts are {type(experts).__name__}: needs GroupedExperts")
    if experts.num_experts != router.num_experts:
        raise ValueError(
            f"extract_task_ffn: the layer has {experts.num_experts} experts "
            f"but its router routes over {router.num_experts}"
        )
    experts_K, weights_K = router.task_experts(task)
    w_in, w_out = experts.w_in.detach(), experts.w_out.detach()
    index_K = torch.tensor(experts_K, device=w_in.device)
    w_in_KHD, w_out_KDF = w_in[index_K], w_out[index_K]
    top_k, hidden, d_model = len(experts_K), experts.ffn_hidden, experts.d_model
    if experts.activation == "swiglu":
        # MLP reads its w_in as [gate | up]: all K experts' gate rows, then all their up rows.
        gate_rows, up_rows = w_in_KHD[:, :hidden], w_in_KHD[:, hidden:]
        w_in_HD = torch.cat([gate_rows.reshape(top_k * hidden, d_model), up_rows.reshape(top_k * hidden, d_model)])
    else:
        w_in_HD = w_in_KHD.reshape(top_k * hidden, d_model)
    scaled_KDF = w_out_KDF.float() * weights_K.to(w_out.device)[:, None, None]
    w_out_DF = scaled_KDF.to(w_out.dtype).permute(1, 0, 2).reshape(d_model, top_k * hidden)
    routed = MLP(d_model, top_k * hidden, experts.activation).to(device=w_in.device, dtype=w_in.dtype)
    routed.w_in.weight.copy_(w_in_HD)
    routed.w_out.weight.copy_(w_out_DF)
    ffn = TaskFFN(
        routed, router.check_task(task), experts_K, weights_K.tolist(),
        copy.deepcopy(layer.shared_experts), copy.deepcopy(layer.shared_expert_gate),
    )
    return ffn.train(layer.training)


def extract_task_model(model: nn.Module, task: int) -> nn.Module:
    """A deep copy of `model` in which every MoELayer routed by a TaskLevelRouter is its `extract_task_ffn`.

    Other modules are copied unchanged. The copy computes what `model` computes on inputs of `task`
    only (feed it nothing else): a block that holds an extracted FFN takes the dense path. A model
    that is itself such an MoELayer gives its TaskFFN. ValueError if there is no such layer.
    """
    names = [
        name for name, module in model.named_modules()
        if isinstance(module, MoELayer) and isinstance(module.router, TaskLevelRouter)
    ]
    if not names:
        raise ValueError(f"extract_task_model: {type(model).__name__} has no MoELayer routed by a TaskLevelRouter")
    for name in names:  # fail on a bad task before the copy
        model.get_submodule(name).router.check_task(task)
    if names == [""]:
        return extract_task_ffn(model, task)
    extracted = copy.deepcopy(model)
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = extracted.get_submodule(parent_name)
        setattr(parent, child_name, extract_task_ffn(parent.get_submodule(child_name), task))
    return extracted
