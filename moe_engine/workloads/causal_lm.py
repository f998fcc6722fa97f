"""Language-model fine-tuning of an imported Hugging Face MoE model (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE).

The architecture and the starting weights come from finetune.init_from (`PretrainedSource`):

* a Hugging Face folder (config.json + safetensors), read by moe_engine.hf.import_hf;
* a file written by `moe-engine convert --from-hf DIR --out F.pt` (moe_engine.hf.load_native);
* a checkpoint of an earlier causal_lm run (file, step folder or run directory): its weights, and
  the architecture of the source its own finetune.init_from names.

The model is moe_engine.hf.MoECausalLM, its experts placed by the trainer's dispatcher; the trainer
builds it fresh and then calls `load_initial_weights`, which gives every expert-parallel rank its
experts. Data: text (moe_engine.workloads.text_data), rows of model.max_text_len tokens. Each task
of data.tasks is a language-modelling task whose loss is its mean next-token cross-entropy over the
tokens it predicts (padding ignored): `forward_step` returns per-task sums and predicted-token
counts, so the trainer's per-task mean is a token mean. Padding is not routed (MoECausalLM routes the
real tokens only), so it counts in no balance loss, expert-bias update, task loss or routing statistic. Evaluation reports each
task's loss and perplexity (exp of the token-mean loss; lower is better).

Config: finetune.init_from (the source), data.path / data.tasks / data.tokenizer / data.packing
(moe_engine.workloads.text_data), model.max_text_len (tokens per row), data.batch_size and
data.eval_batch_size (rows), moe.num_experts (must be the model's), moe.experts_impl (the expert
GEMM), moe.recompute_experts and model.activation_checkpointing. Everything else about the model (widths, router, top-k, balance-loss coefficient, dropout)
is the pre-trained model's own; a moe.router setting other than its default is refused here, a
changed model.* or moe.* width or structure setting by moe_engine.config (Config).
"""

from __future__ import annotations

import dataclasses
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from moe_engine.checkpoint import CheckpointMismatchError, read_checkpoint_entries, read_model_state, resolve_checkpoint
from moe_engine.config import Config, ConfigError, MoEConfig, RouterConfig
from moe_engine.hf.causal_lm import IGNORE_INDEX, MoECausalLM
from moe_engine.hf.config import MoECausalLMConfig, hf_family
from moe_engine.hf.convert import NATIVE_FORMAT, hf_config_of, import_hf_state, load_native, read_hf_folder
from moe_engine.mtl.data import ResumableBatches, eval_batches
from moe_engine.parallel import TokenDispatcher
from moe_engine.parallel.groups import ParallelGroups
from moe_engine.parallel.runtime import DistributedRun, all_reduce_sum, rank_slice
from moe_engine.parallel.sharding import load_canonical_state
from moe_engine.workloads.base import StepForward, Workload, count_routed_choices
from moe_engine.workloads.text_data import TextData, build_tokenizer, load_text_data

# A checkpoint names its source through its own config; a longer chain is taken for a cycle.
_MAX_CHAIN = 16


@dataclass(frozen=True)
class PretrainedSource:
    """Where a causal LM's architecture and weights come from.

    kind: "hf" (a Hugging Face folder), "native" (a `moe-engine convert` file) or "checkpoint" (a
    trainer checkpoint of a causal_lm run). config, family: the model's, from the chain's root.
    folder: the root's Hugging Face folder (where a tokenizer may sit), None for a native file.
    tasks: a checkpoint's data.tasks; empty for the other kinds.
    """

    kind: Literal["hf", "native", "checkpoint"]
    path: Path
    config: MoECausalLMConfig
    family: str
    folder: Path | None
    tasks: tuple[str, ...] = ()


def _native_header(path: Path) -> dict[str, Any] | None:
    """The payload of a torch file, memory-mapped (nothing read beyond what is looked at); None if
    torch cannot read it."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, ValueError, EOFError, OSError, pickle.UnpicklingError):
        return None
    return payload if isinstance(payload, dict) else None


def resolve_pretrained(init_from: str | Path, _chain: int = 0) -> PretrainedSource:
    """The `PretrainedSource` finetune.init_from names (module docstring); reads configs only."""
    path = Path(init_from)
    if _chain > _MAX_CHAIN:
        raise CheckpointMismatchError(
            f"finetune.init_from = {str(init_from)!r}: more than {_MAX_CHAIN} checkpoints each name another"
        )
    if path.is_dir() and (path / "config.json").is_file():
        hf_config = hf_config_of(path)
        return PretrainedSource("hf", path, MoECausalLMConfig.from_hf(hf_config), hf_family(hf_config), path)
    if path.is_file():
        payload = _native_header(path)
        if payload is not None and payload.get("format") == NATIVE_FORMAT:
            return PretrainedSource("native", path, MoECausalLMConfig.from_dict(dict(payload["config"])), payload["family"], None)
        if payload is None or "format_version" not in payload:
            raise CheckpointMismatchError(
                f"finetune.init_from = {str(init_from)!r}: neither a `moe-engine convert --from-hf` file "
                "nor a moe_engine checkpoint"
            )
    try:
        checkpoint = resolve_checkpoint(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"finetune.init_from = {str(init_from)!r}: expected a Hugging Face folder (config.json + *.safetensors), "
            f"a `moe-engine convert --from-hf` file, or a checkpoint of a causal_lm run ({err})"
        ) from err
    saved = read_checkpoint_entries(checkpoint, ("config",))["config"]
    architecture = saved["model"]["architecture"]
    if architecture != "causal_lm" or not saved["finetune"]["init_from"]:
        raise CheckpointMismatchError(
            f"finetune.init_from = {str(init_from)!r}: {checkpoint} is a checkpoint of a "
            f"model.architecture = {architecture!r} run; "
            "model.architecture = 'causal_lm' starts from a Hugging Face model or a causal_lm checkpoint"
        )
    root = resolve_pretrained(saved["finetune"]["init_from"], _chain + 1)
    return dataclasses.replace(root, kind="checkpoint", path=checkpoint, tasks=tuple(saved["data"]["tasks"]))


def read_pretrained_state(source: PretrainedSource) -> dict[str, torch.Tensor]:
    """The whole model's state (MoECausalLM names, every expert tensor (E, ...)) of `source`.
    HFCheckpointMismatchError lists the tensors of a Hugging Face folder or native file that do not fit."""
    if source.kind == "hf":
        hf_config, state = read_hf_folder(source.path)
        model, _ = import_hf_state(state, hf_config, str(source.path), copy=False)
        return model.state_dict()
    if source.kind == "native":
        return load_native(source.path)[0].state_dict()
    return read_model_state(source.path)


def load_pretrained_model(init_from: str | Path) -> tuple[MoECausalLM, str]:
    """(the whole model, its family) of any source finetune.init_from takes, e.g. to export a
    fine-tuned causal_lm checkpoint with moe_engine.hf.export_hf."""
    source = resolve_pretrained(init_from)
    model = MoECausalLM(source.config)
    model.load_state_dict(read_pretrained_state(source))
    return model, source.family


@dataclass(frozen=True)
class _Rows:
    """This rank's rows of a batch, on the device.

    ids_BS (B, S) int64; mask_BS (B, S) int64, 1 on real tokens, or None when no row is padded;
    targets_BS1 (B, S-1) int64: the token each position predicts, IGNORE_INDEX past a row's end;
    task_B (B,) int64; keep_T (B*S,) bool, real tokens, or None when all are; counts_T
    (num_tasks,) fp32 predicted tokens per task; present: the tasks with any (host-side).
    """

    ids_BS: torch.Tensor
    mask_BS: torch.Tensor | None
    targets_BS1: torch.Tensor
    task_B: torch.Tensor
    keep_T: torch.Tensor | None
    counts_T: torch.Tensor
    present: list[int]
    num_tokens: int


class CausalLMWorkload(Workload):
    """Next-token prediction on text, one loss per task, for an imported MoE language model."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        if cfg.finetune.init_from is None:
            raise ConfigError(
                "finetune.init_from = None: model.architecture = 'causal_lm' fine-tunes a pre-trained model; name a Hugging Face "
                "folder, a `moe-engine convert --from-hf` file or a causal_lm checkpoint (moe-engine finetune --from ...)"
            )
        if cfg.data.path is None:
            raise ConfigError("data.path = None: text data needs a folder with train.jsonl|parquet and test.jsonl|parquet")
        self.source = resolve_pretrained(cfg.finetune.init_from)
        # The run's expert GEMM and recompute choices, not the file's.
        self.model_config = dataclasses.replace(
            self.source.config, experts_impl=cfg.moe.experts_impl, recompute_experts=cfg.moe.recompute_experts,
            activation_checkpointing=cfg.model.activation_checkpointing,
        )
        # The router is the pre-trained model's: a moe.router setting would be ignored (or, for the
        # expert bias the trainer moves, fail after the first step), so any that was set is refused.
        default_router = dataclasses.asdict(RouterConfig())
        changed = sorted(k for k, v in dataclasses.asdict(cfg.moe.router).items() if v != default_router[k])
        if changed:
            raise ConfigError(
                f"moe.router.{changed[0]} = {getattr(cfg.moe.router, changed[0])!r}"
                + (f" (and {', '.join('moe.router.' + k for k in changed[1:])})" if changed[1:] else "")
                + f": model.architecture = 'causal_lm' routes with the pre-trained model's router ({self.source.path}); "
                "leave moe.router at its defaults"
            )
        experts = self.model_config.num_experts
        if cfg.moe.num_experts != experts:
            raise ConfigError(
                f"moe.num_experts = {cfg.moe.num_experts}: the pre-trained model {self.source.path} has {experts} experts "
                f"per MoE layer; set moe.num_experts = {experts} (expert parallelism and routing statistics count them)"
            )
        tokenizer = build_tokenizer(cfg.data.tokenizer, [self.source.folder, cfg.data.path])
        vocab = self.model_config.vocab_size
        if tokenizer.num_ids > vocab:
            raise ConfigError(
                f"data.tokenizer = {cfg.data.tokenizer!r}: the {tokenizer.name} emits {tokenizer.num_ids} ids, the model's "
                f"vocabulary has {vocab}; point data.tokenizer at the model's own tokenizer folder"
            )
        self.data: TextData = load_text_data(
            cfg.data.path, cfg.data.tasks, tokenizer, cfg.model.max_text_len, packing=cfg.data.packing,
        )
        self.task_names = list(self.data.task_names)

    # ---------------------------------------------------------------- model, weights and data

    def build_model(self, make_dispatcher: Callable[[MoEConfig], TokenDispatcher] | None) -> MoECausalLM:
        return MoECausalLM(self.model_config, make_dispatcher=make_dispatcher)

    def load_initial_weights(self, model: nn.Module, init_from: str | Path, groups: ParallelGroups | None) -> dict[str, Any]:
        """Load the pre-trained weights into `model`, each expert-parallel rank its own experts.

        Returns {"checkpoint", "family", "pretrained_tasks", "new_tasks"} (tasks of a causal_lm
        checkpoint; a Hugging Face model has none, and an LM's tasks share every parameter, so any
        task list fits). CheckpointMismatchError names the tensors that do not fit.
        """
        source = self.source if Path(init_from) == Path(self.cfg.finetune.init_from) else resolve_pretrained(init_from)
        state = read_pretrained_state(source)
        ep_rank, ep_size = (groups.ep_rank, groups.ep_size) if groups is not None else (0, 1)
        try:
            load_canonical_state(model, None, state, None, ep_rank, ep_size)
        except RuntimeError as err:
            raise CheckpointMismatchError(
                f"finetune.init_from = {str(init_from)!r}: the weights do not fit this model: {err}"
            ) from err
        new_tasks = [t for t in self.task_names if t not in source.tasks]
        return {
            "checkpoint": str(source.path), "family": source.family,
            "pretrained_tasks": list(source.tasks), "new_tasks": new_tasks,
        }

    def train_batches(self, seed: int) -> Iterator[Any]:
        rows, batch = len(self.data.train), self.cfg.data.batch_size
        if batch > rows:
            raise ConfigError(
                f"data.batch_size = {batch}: the training text makes only {rows} rows of model.max_text_len = "
                f"{self.data.seq_len} tokens; lower data.batch_size or add text"
            )
        return ResumableBatches(self.data.train, batch, seed=seed)

    def task_counts(self, batch: Any) -> torch.Tensor:
        """Predicted tokens (length - 1 per row) of each task."""
        return torch.bincount(batch["task"], weights=(batch["length"] - 1).double(), minlength=len(self.task_names)).float()

    def _rows(self, batch: dict[str, torch.Tensor], run: DistributedRun, device: torch.device) -> _Rows:
        """This rank's rows (every rank takes rows rank::world) with their targets and task counts."""
        batch = rank_slice(batch, run)
        ids_BS, length_B, task_B = batch["input_ids"], batch["length"], batch["task"]
        S = ids_BS.shape[1]
        # Host-side: the lengths come from the loader on the CPU, so no device sync here.
        real_BS = torch.arange(S)[None, :] < length_B[:, None]
        padded = bool((length_B < S).any())
        targets_BS1 = ids_BS[:, 1:].masked_fill(~real_BS[:, 1:], IGNORE_INDEX)
        counts_T = self.task_counts(batch)
        present = [t for t, c in enumerate(counts_T.tolist()) if c > 0]
        return _Rows(
            ids_BS.to(device, non_blocking=True),
            real_BS.long().to(device, non_blocking=True) if padded else None,
            targets_BS1.to(device, non_blocking=True),
            task_B.to(device, non_blocking=True),
            real_BS.reshape(-1).to(device, non_blocking=True) if padded else None,
            counts_T.to(device),
            present,
            int(length_B.sum()),
        )

    def _task_loss_sums_T(self, logits_BSV: torch.Tensor, rows: _Rows) -> torch.Tensor:
        """(num_tasks,) fp32 summed next-token cross-entropy of each task's predicted tokens."""
        B, S, V = logits_BSV.shape
        token_loss = F.cross_entropy(
            logits_BSV[:, :-1].float().reshape(-1, V), rows.targets_BS1.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none",
        )
        row_loss_B = token_loss.view(B, S - 1).sum(1)
        return row_loss_B.new_zeros(len(self.task_names)).index_add(0, rows.task_B, row_loss_B)

    # ---------------------------------------------------------------- training and evaluation

    def forward_step(self, model: nn.Module, batch: Any, run: DistributedRun, device: torch.device) -> StepForward:
        rows = self._rows(batch, run, device)
        out = model(rows.ids_BS, attention_mask_BS=rows.mask_BS)
        loss_T = self._task_loss_sums_T(out.logits, rows)
        loss_sums = {self.task_names[t]: loss_T[t] for t in rows.present}
        S = rows.ids_BS.shape[1]
        task_ids_T = rows.task_B.repeat_interleave(S)
        if rows.keep_T is not None:
            task_ids_T = task_ids_T[rows.keep_T]
        return StepForward(
            loss_sums, rows.counts_T, out.aux_loss, out.routings, task_ids_T, rows.num_tokens,
            # Every logit depends on every MoE layer's all-to-all: a zero that reaches all of them.
            anchor=0.0 * (out.logits.float().sum() + out.aux_loss),
        )

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, run: DistributedRun, device: torch.device, autocast: Callable[[], Any], num_experts: int,
    ) -> tuple[dict[str, float], torch.Tensor]:
        """Each task's token-mean loss and perplexity over the whole test split, equal on every rank.
        Every rank walks every batch (its rows of each), so the MoE layers' collectives line up."""
        num_tasks = len(self.task_names)
        sums = torch.zeros(2, num_tasks, dtype=torch.float64, device=device)  # summed loss, predicted tokens
        counts_LXE = torch.zeros(len(model.routers), num_tasks, num_experts, dtype=torch.long, device=device)
        for batch in eval_batches(self.data.test, self.cfg.data.eval_batch_size):
            rows = self._rows(batch, run, device)
            with autocast():
                out = model(rows.ids_BS, attention_mask_BS=rows.mask_BS)
            sums[0] += self._task_loss_sums_T(out.logits, rows).double()
            sums[1] += rows.counts_T.double()
            task_ids_T = rows.task_B.repeat_interleave(rows.ids_BS.shape[1])
            if rows.keep_T is not None:
                task_ids_T = task_ids_T[rows.keep_T]
            count_routed_choices(out.routings, task_ids_T, num_tasks, num_experts, counts_LXE)
        loss_sum, tokens = all_reduce_sum(sums, run).cpu()
        counts_LXE = all_reduce_sum(counts_LXE, run).cpu()
        metrics = {}
        for t, name in enumerate(self.task_names):
            loss = float(loss_sum[t] / tokens[t].clamp_min(1))
            metrics[f"loss_{name}"] = loss
            metrics[f"perplexity_{name}"] = math.exp(min(loss, 700.0))  # exp overflows a double past ~709
        return metrics, counts_LXE

    def task_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return []  # every task shares the whole model

    # ---------------------------------------------------------------- reports

    def metric_directions(self) -> dict[str, bool]:
        return {"perplexity": False}

    def primary_metrics(self) -> dict[str, str]:
        return {name: "perplexity" for name in self.task_names}

    def chance(self) -> dict[str, float]:
        """A uniform guess over the vocabulary has perplexity V."""
        return {name: float(self.model_config.vocab_size) for name in self.task_names}
