"""`GeneralistModel`: a Uni-Perceiver-style generalist with Conditional MoE (Zhu et al. 2022).

One shared transformer encodes every input and every target. A sequence is

    [SPE] [task prompt]? modality tokens (+ the modality's type embedding, + positions)

(the task prompt on inputs only, when task_prompts) and its feature is the final LayerNorm of
the [SPE] token. Classification and retrieval score an input against the encoded target texts
of its task, `cosine(f(input), f(target)) * exp(logit_scale)` (CLIP's learned temperature,
init 1/0.07, scale clamped at 100); regression is a per-task linear head on f(input).

Blocks are moe_engine.mtl.blocks.TaskMoEBlock, built as MultiTaskTransformer builds them: MoE
FFN in every moe_every-th block, MoE attention there with model.moe_attention, the FFN reusing
the attention's routing with model.share_routing. Routers see `RoutingContext.task_ids_T` (the
task of each token; the targets of task t belong to task t) and 8 Uni-Perceiver-style attribute
bits per token (`ATTRIBUTE_NAMES`): what a token is, not which task, so a new task of a known
kind routes with no new routing parameters.

Collective safety: every forward makes the same MoE-layer calls on every rank whatever the batch
holds: one encoder call per tokenizer (all inputs of that modality, possibly 0 rows), in the
order of `tokenizers`, then one for the target texts of all classification/retrieval tasks.
The backward must run the same exchanges too, so `aux_loss` depends on every call's features
(with coefficient 0 where no score does): any loss that includes aux_loss, even times 0, runs
every call's backward on every rank, in reverse call order (autograd runs nodes in reverse
creation order). A per-task loss alone, or a rank with no loss, does not: add 0 * aux_loss.

Padding: text sequences carry a key padding mask; padding is masked in attention and not routed
(see moe_engine.mtl.moe_attention), so each routing covers the non-padding tokens only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moe_engine.config import ModelConfig, MoEConfig
from moe_engine.experts import MLP
from moe_engine.layer import MoELayer
from moe_engine.mtl.attribute_router import AttributeRouter
from moe_engine.mtl.blocks import TaskMoEBlock, block_routers
from moe_engine.mtl.generalist.tasks import TASK_KINDS, GeneralistTask
from moe_engine.mtl.generalist.tokenizers import ImagePatchTokenizer, ModalityTokenizer, TextTokenizer
from moe_engine.mtl.model import SelfAttention
from moe_engine.mtl.moe_attention import MoEAttention
from moe_engine.parallel import TokenDispatcher
from moe_engine.recompute import run_block
from moe_engine.routers import build_any_router
from moe_engine.routing import PLAIN_ROUTER_TYPES, Routing, RoutingContext

# The attribute bits of every token, in column order (kind one-hot in TASK_KINDS order).
# is_special: the [SPE] token and the task prompt.
ATTRIBUTE_NAMES: tuple[str, ...] = ("is_image", "is_text", "is_input", "is_target", "is_special") + tuple(
    f"kind_{kind}" for kind in TASK_KINDS
)
NUM_ATTRIBUTES = len(ATTRIBUTE_NAMES)
# CLIP: the logit scale starts at 1/0.07 and is clamped at 100.
INIT_TEMPERATURE, MAX_LOGIT_SCALE = 0.07, 100.0
ROLES = ("input", "target")


@dataclass(frozen=True)
class GeneralistOutput:
    """scores: task name -> (B_t, len(targets)) float32 logits (classification, retrieval) or (B_t,)
    float32 predictions (regression), for the tasks of the batch, in the model's task order.
    aux_loss: () float32, summed over the routers, averaged over the encoder calls weighted by
    their routed tokens (`call_weights`); its graph reaches every encoder call (see the module
    docstring), so include it in every loss that is backpropagated.
    routings: one Routing per router (`GeneralistModel.routers` order) over the routed tokens of
    all encoder calls of the forward, concatenated in call order (padding is not routed).
    routing_task_ids_T: (T,) int64, the task index (into model.tasks) of each routed token,
    aligned with the rows of every routings[i]."""

    scores: dict[str, torch.Tensor]
    aux_loss: torch.Tensor
    routings: tuple[Routing, ...]
    routing_task_ids_T: torch.Tensor


def _checked_tokens(
    modality: str, tokenized: Any, batch: int, d_model: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A tokenizer's output, checked against the protocol: (B, L, D) tokens and a (B, L) bool mask or None."""
    if not (isinstance(tokenized, tuple) and len(tokenized) == 2 and torch.is_tensor(tokenized[0])):
        raise ValueError(
            f"tokenizers[{modality!r}] returned {type(tokenized).__name__}: expected (tokens_BLD, padding_mask_BL)"
        )
    tokens, mask = tokenized
    if tokens.dim() != 3 or tokens.shape[0] != batch or tokens.shape[2] != d_model:
        raise ValueError(
            f"tokenizers[{modality!r}] gave tokens of shape {tuple(tokens.shape)}: expected ({batch}, L, {d_model})"
        )
    if mask is not None and (mask.dtype != torch.bool or mask.shape != tokens.shape[:2]):
        raise ValueError(
            f"tokenizers[{modality!r}] gave a padding mask of shape {tuple(mask.shape)} and dtype {mask.dtype}: "
            f"expected {tuple(tokens.shape[:2])} bool, or None"
        )
    return tokens, mask


@dataclass(frozen=True)
class _Encoded:
    """One encoder call: features_BD (B, D) float32; aux_loss () float32; routings, one per router;
    routed_task_ids_T (T,) int64, the task of each routed token."""

    features_BD: torch.Tensor
    aux_loss: torch.Tensor
    routings: tuple[Routing, ...]
    routed_task_ids_T: torch.Tensor


def call_weights(rows: Sequence[int]) -> list[float]:
    """Each encoder call's share of the routed rows, the weight of its auxiliary losses in the
    forward's: the balance and mutual-information losses are statistics of each call's tokens
    (as they are of each rank's), averaged over the calls, not summed, so that their coefficients
    do not grow with the number of calls (one per modality, plus the targets). All-zero rows:
    equal shares (every part's loss is then that of no tokens)."""
    total = sum(rows)
    return [n / total for n in rows] if total > 0 else [1.0 / len(rows)] * len(rows)


def concat_routings(routings: Sequence[Routing]) -> Routing:
    """One Routing over the tokens of several routings of the same router, rows in the given order.

    aux_loss and each aux_terms entry are the parts' means weighted by their rows (`call_weights`),
    so a coefficient means what it means for one call and a term that depends on parameters alone
    (DSelect-k's entropy) counts once; capacity is the sum of the capacities (rows an expert may
    take over all the parts), or None when every part is dropless.
    """
    if not routings:
        raise ValueError("concat_routings: got no routings; expected at least one")
    first = routings[0]
    for r in routings[1:]:
        if r.num_experts != first.num_experts or r.top_k != first.top_k:
            raise ValueError(
                f"concat_routings: a routing over {r.num_experts} experts with top_k = {r.top_k} among routings over "
                f"{first.num_experts} experts with top_k = {first.top_k}; all must match"
            )
    capacities = [r.capacity for r in routings]
    if all(c is None for c in capacities):
        capacity = None
    elif any(c is None for c in capacities):
        raise ValueError(f"concat_routings: capacities {capacities} mix dropless (None) and capacity routings")
    else:
        capacity = sum(capacities)
    shares = call_weights([r.experts_TK.shape[0] for r in routings])
    terms: dict[str, torch.Tensor] = {}
    for r, share in zip(routings, shares):
        for name, value in r.aux_terms.items():
            terms[name] = terms[name] + share * value if name in terms else share * value
    return Routing(
        weights_TK=torch.cat([r.weights_TK for r in routings]),
        experts_TK=torch.cat([r.experts_TK for r in routings]),
        scores_TE=torch.cat([r.scores_TE for r in routings]),
        aux_loss=sum(share * r.aux_loss for r, share in zip(routings, shares)),
        aux_terms=terms,
        capacity=capacity,
    )


def _check_targets_distinct(task: GeneralistTask, ids_NL: torch.Tensor) -> None:
    """ValueError naming the targets of `task` that its text tokenizer encodes alike (ids_NL: one row
    per target): they would score the same, so a label among them could never be predicted."""
    first: dict[tuple[int, ...], str] = {}
    clashes = []
    for text, row in zip(task.targets, ids_NL.tolist()):
        key = tuple(row)
        if key in first:
            clashes.append(f"{first[key]!r} = {text!r}")
        else:
            first[key] = text
    if clashes:
        raise ValueError(
            f"task {task.name!r}: targets that the text tokenizer encodes alike (lowercased, cut to "
            f"model.max_text_len characters, unknown characters as one): {', '.join(clashes[:5])}"
            f"{f' and {len(clashes) - 5} more' if len(clashes) > 5 else ''}; raise model.max_text_len or reword them"
        )


def _grown(param: nn.Parameter, rows: torch.Tensor) -> nn.Parameter:
    """A new parameter: param's rows, then `rows`; frozen if param was."""
    return nn.Parameter(torch.cat([param.detach(), rows]), requires_grad=param.requires_grad)


class GeneralistModel(nn.Module):
    """Inputs of any task and modality, and the target texts of every task, through one encoder.

    Args:
        cfg: the transformer (d_model, num_layers, num_heads, ffn_hidden, moe_every, patch_size,
            moe_attention, share_routing, dropout).
        moe_cfg: experts and router of the MoE blocks (moe.router.type "attribute" reads the 8
            attribute bits; a set moe.router.task.num_attributes must be 8).
        tasks: the tasks, in order; a task's index is its id in routing contexts and outputs.
        image_shape: (H, W) of the default image tokenizer.
        max_text_len: texts are cut to this many characters by the default text tokenizer.
        make_dispatcher: builds each MoE FFN's token dispatcher (default: LocalDispatcher); pass
            one building AllToAllDispatcher for expert parallelism, as for MultiTaskTransformer.
        tokenizers: modality -> tokenizer module (protocol in moe_engine.mtl.generalist.tokenizers);
            entries replace or add to the defaults {"image": ImagePatchTokenizer, "text":
            TextTokenizer}. "text" also encodes the targets. A task's inputs are read from its
            sub-batch under the key `task.modality`.
        task_prompts: prepend a learned per-task prompt token to every input sequence.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        moe_cfg: MoEConfig,
        tasks: Sequence[GeneralistTask],
        image_shape: tuple[int, int] = (8, 12),
        *,
        max_text_len: int = 24,
        make_dispatcher: Callable[[MoEConfig], TokenDispatcher] | None = None,
        tokenizers: Mapping[str, nn.Module] | None = None,
        task_prompts: bool = True,
    ) -> None:
        super().__init__()
        tasks = tuple(tasks)
        if not tasks:
            raise ValueError("tasks = (): the generalist needs at least one task")
        D = cfg.d_model
        given = dict(tokenizers or {})
        defaults: dict[str, Callable[[], nn.Module]] = {
            "image": lambda: ImagePatchTokenizer(image_shape, cfg.patch_size, D),
            "text": lambda: TextTokenizer(D, max_text_len),
        }
        for modality, tokenizer in given.items():
            if not isinstance(tokenizer, nn.Module) or not isinstance(tokenizer, ModalityTokenizer):
                raise ValueError(
                    f"tokenizers[{modality!r}] = {type(tokenizer).__name__}: expected an nn.Module with collate(parts) "
                    "and forward(inputs) -> (tokens_BLD, padding_mask_BL)"
                )
        self.tokenizers = nn.ModuleDict(
            {m: given[m] if m in given else make() for m, make in defaults.items()}
            | {m: t for m, t in given.items() if m not in defaults}
        )
        self.router_type = moe_cfg.router.type
        self.activation_checkpointing = cfg.activation_checkpointing
        self.task_prompts = task_prompts
        self.tasks: tuple[GeneralistTask, ...] = ()
        self._check_new_tasks(tasks)
        self.tasks = tasks

        self.spe = nn.Parameter(torch.empty(D))
        self.task_prompt = nn.Parameter(torch.empty(len(tasks), D))
        self.modality_embed = nn.ParameterDict({m: nn.Parameter(torch.empty(D)) for m in self.tokenizers})
        for p in (self.spe, self.task_prompt, *self.modality_embed.values()):
            nn.init.normal_(p, std=0.02)
        self.blocks = nn.ModuleList(self._build_block(cfg, moe_cfg, i, make_dispatcher) for i in range(cfg.num_layers))
        self.norm = nn.LayerNorm(D)
        # (1,), not a 0-dim scalar: DeepSpeed's engine broadcasts parameters as bytes (`p.view(uint8)`),
        # which a 0-dim tensor cannot do. Files saved with the scalar still load (_load_from_state_dict).
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / INIT_TEMPERATURE)))
        # Row t is task t's regression head (rows of other kinds stay unused at 0). Zero init:
        # every regression starts by predicting 0.
        self.regression_weight = nn.Parameter(torch.zeros(len(tasks), D))
        self.regression_bias = nn.Parameter(torch.zeros(len(tasks)))

    def _build_block(
        self,
        cfg: ModelConfig,
        moe_cfg: MoEConfig,
        i: int,
        make_dispatcher: Callable[[MoEConfig], TokenDispatcher] | None,
    ) -> TaskMoEBlock:
        """Block i, as MultiTaskTransformer builds it, with routers over 8 attributes per token."""
        attn: nn.Module = SelfAttention(cfg.d_model, cfg.num_heads, cfg.dropout)
        is_moe = (i + 1) % cfg.moe_every == 0
        if not is_moe:
            ffn: nn.Module = MLP(cfg.d_model, cfg.ffn_hidden, moe_cfg.activation)
            return TaskMoEBlock(cfg.d_model, cfg.num_heads, attn=attn, ffn=ffn, dropout=cfg.dropout)
        dispatcher = make_dispatcher(moe_cfg) if make_dispatcher else None
        num_tasks = len(self.tasks)
        ffn = MoELayer.from_config(cfg.d_model, moe_cfg, dispatcher, num_tasks=num_tasks, num_attributes=NUM_ATTRIBUTES)
        if cfg.moe_attention:
            router = build_any_router(
                cfg.d_model, moe_cfg.num_experts, moe_cfg.router, num_tasks=num_tasks, num_attributes=NUM_ATTRIBUTES
            )
            attn = MoEAttention(cfg.d_model, cfg.num_heads, moe_cfg.num_experts, router, dropout=cfg.dropout)
            if cfg.share_routing:
                ffn.router = router  # one router decides for both halves of the block
        return TaskMoEBlock(
            cfg.d_model, cfg.num_heads, attn=attn, ffn=ffn, dropout=cfg.dropout,
            share_routing=cfg.moe_attention and cfg.share_routing,
        )

    # ---------------------------------------------------------------- structure

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tasks)

    @property
    def moe_layers(self) -> list[MoELayer]:
        """The MoE FFN layers (whose experts a dispatcher places), in order."""
        return [b.ffn for b in self.blocks if b.moe_ffn]

    @property
    def routers(self) -> list[nn.Module]:
        """The router of each routing decision, in the order of `GeneralistOutput.routings`: per MoE
        block the attention's (with model.moe_attention), then the FFN's unless it shares."""
        return block_routers(self.blocks)

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The learned embeddings (SPE, task prompts, modality types, token and position tables,
        the logit scale): the parameters weight decay should leave alone, with norms and biases."""
        params = [self.spe, self.task_prompt, self.logit_scale, *self.modality_embed.values()]
        for module in self.tokenizers.modules():
            if isinstance(module, nn.Embedding):
                params.append(module.weight)
            params.extend(p for name, p in module.named_parameters(recurse=False) if name == "pos_embed")
        return params

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # logit_scale was a 0-dim scalar in files saved before it became (1,): read those as (1,).
        old = state_dict.get(prefix + "logit_scale")
        if old is not None and old.dim() == 0:
            state_dict[prefix + "logit_scale"] = old.reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---------------------------------------------------------------- fine-tuning

    def add_tasks(self, new_tasks: Sequence[GeneralistTask]) -> None:
        """Append tasks, keeping every existing parameter and the outputs of the old tasks.

        New task prompt rows are the mean of the existing rows; new regression heads the mean of
        the existing regression tasks' heads (0 when there are none). Routers with per-task
        parameters (task_gate, mod_squad, dselect_k, task_level) are refused: attribute routing
        and the plain routers need nothing new. Call before building the optimizer: the
        per-task parameters are replaced by larger ones.
        """
        new_tasks = tuple(new_tasks)
        if not new_tasks:
            return
        if self.router_type not in PLAIN_ROUTER_TYPES and self.router_type != "attribute":
            raise ValueError(
                f"add_tasks: moe.router.type = {self.router_type!r} keeps parameters per task id, which a new task "
                f"lacks; allowed: attribute, {', '.join(PLAIN_ROUTER_TYPES)}"
            )
        self._check_new_tasks(new_tasks)
        n = len(new_tasks)
        with torch.no_grad():
            prompt_rows = self.task_prompt.mean(0, keepdim=True).expand(n, -1)
            regression = [i for i, t in enumerate(self.tasks) if t.kind == "regression"]
            if regression:
                index = torch.tensor(regression, device=self.regression_weight.device)
                weight_row = self.regression_weight.index_select(0, index).mean(0, keepdim=True)
                bias_row = self.regression_bias.index_select(0, index).mean(0, keepdim=True)
            else:
                weight_row = self.regression_weight.new_zeros(1, self.regression_weight.shape[1])
                bias_row = self.regression_bias.new_zeros(1)
            self.task_prompt = _grown(self.task_prompt, prompt_rows)
            self.regression_weight = _grown(self.regression_weight, weight_row.expand(n, -1))
            self.regression_bias = _grown(self.regression_bias, bias_row.expand(n))
        self.tasks = self.tasks + new_tasks

    def _check_new_tasks(self, new_tasks: tuple[GeneralistTask, ...]) -> None:
        names = [t.name for t in self.tasks]
        for task in new_tasks:
            if not isinstance(task, GeneralistTask):
                raise ValueError(f"task {task!r}: expected a GeneralistTask")
            if task.name in names:
                raise ValueError(f"task name {task.name!r} appears twice (tasks so far: {names})")
            names.append(task.name)
            if task.modality not in self.tokenizers:
                raise ValueError(
                    f"task {task.name!r}: modality {task.modality!r} has no tokenizer; have {list(self.tokenizers)}"
                )
        if "text" not in self.tokenizers:
            raise ValueError(f"tokenizers {list(self.tokenizers)}: a 'text' tokenizer is needed for the targets")
        encode = getattr(self.tokenizers["text"], "encode", None)
        for task in new_tasks:
            if task.targets and encode is not None:
                _check_targets_distinct(task, encode(task.targets)[0])

    # ---------------------------------------------------------------- forward

    def forward(self, batch: Mapping[str, Mapping[str, Any]]) -> GeneralistOutput:
        """batch: task name -> sub-batch holding the task's inputs under `task.modality`
        ((B_t, H, W) float images, or B_t strings); other keys (labels) are ignored."""
        present = self._present_tasks(batch)
        device = self.spe.device
        features: dict[int, torch.Tensor] = {}
        calls: list[_Encoded] = []
        # One call per modality, even with no input of it: every rank makes the same MoE calls.
        for modality, tokenizer in self.tokenizers.items():
            ids = [i for i in present if self.tasks[i].modality == modality]
            parts = [batch[self.tasks[i].name][modality] for i in ids]
            sizes = [len(part) for part in parts]
            task_ids_B = torch.tensor(ids, dtype=torch.int64).repeat_interleave(torch.tensor(sizes, dtype=torch.int64))
            tokenized = _checked_tokens(modality, tokenizer(tokenizer.collate(parts)), sum(sizes), self.spe.shape[0])
            encoded = self._encode(modality, tokenized, task_ids_B.to(device), "input")
            calls.append(encoded)
            features.update(zip(ids, encoded.features_BD.split(sizes)))

        target_ids = [i for i, t in enumerate(self.tasks) if t.kind != "regression"]
        counts = [len(self.tasks[i].targets) for i in target_ids]
        texts = [text for i in target_ids for text in self.tasks[i].targets]
        task_ids_B = torch.tensor(target_ids, dtype=torch.int64).repeat_interleave(
            torch.tensor(counts, dtype=torch.int64)
        )
        tokenized = _checked_tokens("text", self.tokenizers["text"](texts), len(texts), self.spe.shape[0])
        encoded = self._encode("text", tokenized, task_ids_B.to(device), "target")
        calls.append(encoded)
        target_features = dict(zip(target_ids, encoded.features_BD.split(counts)))

        scores = {self.tasks[i].name: self._score(i, features[i], target_features.get(i)) for i in present}
        routings = tuple(concat_routings([call.routings[r] for call in calls]) for r in range(len(self.routers)))
        shares = call_weights([len(call.routed_task_ids_T) for call in calls])
        return GeneralistOutput(
            scores=scores,
            aux_loss=sum(share * call.aux_loss for call, share in zip(calls, shares)),
            routings=routings,
            routing_task_ids_T=torch.cat([call.routed_task_ids_T for call in calls]),
        )

    def _present_tasks(self, batch: Mapping[str, Mapping[str, Any]]) -> list[int]:
        """Indices of the batch's tasks in model order; raises ValueError on unknown tasks or missing inputs."""
        unknown = [name for name in batch if name not in self.task_names]
        if unknown:
            raise ValueError(f"batch tasks {unknown}: not tasks of this model; known: {list(self.task_names)}")
        present = [i for i, t in enumerate(self.tasks) if t.name in batch]
        for i in present:
            task = self.tasks[i]
            if task.modality not in batch[task.name]:
                raise ValueError(
                    f"batch[{task.name!r}] has keys {list(batch[task.name])}: "
                    f"a {task.modality} task needs {task.modality!r}"
                )
        return present

    def _encode(
        self, modality: str, tokenized: tuple[torch.Tensor, torch.Tensor | None], task_ids_B: torch.Tensor, role: str
    ) -> _Encoded:
        """Sequences [SPE] [prompt]? tokens through the blocks; features = final LayerNorm of [SPE]."""
        tokens_BLD, padding_mask_BL = tokenized
        B, L, D = tokens_BLD.shape
        special = [self.spe.expand(B, 1, D)]
        if role == "input" and self.task_prompts:
            special.append(self.task_prompt.index_select(0, task_ids_B)[:, None])
        num_special = len(special)
        x_BSD = torch.cat([*special, tokens_BLD + self.modality_embed[modality]], dim=1)
        S = num_special + L
        mask_BS = None
        if padding_mask_BL is not None:
            mask_BS = torch.cat([padding_mask_BL.new_zeros(B, num_special), padding_mask_BL], dim=1)
        task_ids_T = task_ids_B.repeat_interleave(S)
        ctx = RoutingContext(
            task_ids_T=task_ids_T,
            # Built only for routers that read them: the other routers would never look.
            attributes_TA=self.token_attributes(modality, role, task_ids_B, num_special, S)
            if any(isinstance(r, AttributeRouter) for r in self.routers) else None,
            sequence_ids_T=torch.arange(B, device=x_BSD.device).repeat_interleave(S),
        )
        aux_loss = x_BSD.new_zeros((), dtype=torch.float32)
        routings: list[Routing] = []
        for block in self.blocks:
            out = run_block(block, x_BSD, ctx, key_padding_mask_BS=mask_BS, checkpointed=self.activation_checkpointing)
            x_BSD = out.x
            aux_loss = aux_loss + out.aux_loss
            routings.extend(out.routings)
        routed_task_ids_T = task_ids_T if mask_BS is None else task_ids_T[~mask_BS.reshape(-1)]
        features_BD = self.norm(x_BSD[:, 0]).float()
        # Ties this call's backward to aux_loss even when no score reads its features (a modality
        # absent from this rank's batch): expert-parallel exchanges run backward on every rank then.
        aux_loss = aux_loss + 0.0 * features_BD.sum()
        return _Encoded(features_BD, aux_loss, tuple(routings), routed_task_ids_T)

    def token_attributes(
        self, modality: str, role: str, task_ids_B: torch.Tensor, num_special: int, seq_len: int
    ) -> torch.Tensor:
        """attributes_TA (B*S, 8) float32, the bits of `ATTRIBUTE_NAMES` for B sequences of S tokens:
        the sequence's modality (neither bit for a modality other than image and text) and role
        (input or target) on every token, is_special on [SPE] and the prompt, and the one-hot kind
        of the token's task."""
        if role not in ROLES:
            raise ValueError(f"role = {role!r}: allowed: {', '.join(ROLES)}")
        device = task_ids_B.device
        B = task_ids_B.shape[0]
        shared_A = torch.tensor(
            [modality == "image", modality == "text", role == "input", role == "target"],
            dtype=torch.float32, device=device,
        )
        special_S = (torch.arange(seq_len, device=device) < num_special).float()
        kinds = torch.tensor([TASK_KINDS.index(t.kind) for t in self.tasks], device=device)
        kind_BK = F.one_hot(kinds[task_ids_B], len(TASK_KINDS)).float()
        return torch.cat([
            shared_A.expand(B, seq_len, -1),
            special_S[None, :, None].expand(B, -1, -1),
            kind_BK[:, None].expand(-1, seq_len, -1),
        ], dim=-1).reshape(B * seq_len, NUM_ATTRIBUTES)

    def _score(self, task_index: int, features_BD: torch.Tensor, targets_ND: torch.Tensor | None) -> torch.Tensor:
        """float32 logits (B, N) against the task's N targets, or (B,) regression predictions."""
        # In fp32 under any autocast: the cosine logits are scaled by up to 100.
        with torch.autocast(device_type=features_BD.device.type, enabled=False):
            if targets_ND is None:
                weight_D = self.regression_weight[task_index].float()
                return features_BD @ weight_D + self.regression_bias[task_index].float()
            scale = self.logit_scale.float().exp().clamp(max=MAX_LOGIT_SCALE)
            return scale * F.normalize(features_BD, dim=-1) @ F.normalize(targets_ND, dim=-1).t()
