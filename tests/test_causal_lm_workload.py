"""CausalLMWorkload: fine-tuning an imported Hugging Face MoE model on text through the trainer.

A tiny random Mixtral (4 experts, vocabulary 301 >= the 258 ids of the byte-level tokenizer) is
saved with save_pretrained and converted to a native file. The trainer loads it (our logits equal
transformers'), fine-tunes it on a two-task corpus (the loss falls), and its gathered state exports
to a folder transformers loads. A 2-rank expert-parallel run (gloo) follows the single process step
for step. The per-task losses are transformers' own token-mean losses, padding left out.

Spawned ranks import this module: transformers is imported inside the tests that need it, so
the ranks (which read the native file and tokenize bytes) never pay for it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from distributed import run_ranks
from moe_engine.checkpoint import CheckpointMismatchError, read_model_state, write_checkpoint_file
from moe_engine.config import ConfigError, load_config
from moe_engine.finetune import freeze_groups
from moe_engine.hf import MoECausalLM, export_hf, import_hf, save_native
from moe_engine.parallel.runtime import DistributedRun
from moe_engine.train import Trainer
from moe_engine.experts import GroupedExperts
from moe_engine.workloads.causal_lm import CausalLMWorkload, load_pretrained_model
from moe_engine.workloads.text_data import ByteTokenizer, build_tokenizer, load_text_data, pack_rows

VOCAB = 301
SEQ = 16
STEPS = 4
TASKS = ["count", "abc"]
SINGLE = DistributedRun(0, 1, 0, None)
TINY = [
    "moe.num_experts=4", "moe.router.top_k=2", "moe.experts_impl=loop",
    "optim.lr=0.01", "optim.warmup_steps=0", "optim.schedule=constant", "optim.weight_decay=0.0",
    "data.batch_size=6", "data.eval_batch_size=4", f"model.max_text_len={SEQ}",
    f"train.max_steps={STEPS}", "train.eval_every=1000", f"train.checkpoint_every={STEPS}", "train.num_threads=1",
    "train.device=cpu", "logging.log_every=1", "logging.progress_bar=false", "logging.tensorboard=false",
    "logging.routing_telemetry=false",
]


def _cfg(out_dir: Path, init_from: Path | str, data: Path, *extra: str, tokenizer: str | None = None, packing: bool = True):
    """A causal_lm config, built from YAML-style overrides as a user's would be."""
    return load_config(None, [
        *TINY, "model.architecture=causal_lm", "data.name=text", f"train.out_dir={out_dir}", f"finetune.init_from={init_from}",
        f"data.path={data}", f"data.tasks=[{','.join(TASKS)}]", f"data.tokenizer={tokenizer if tokenizer else 'null'}",
        f"data.packing={'true' if packing else 'false'}", *extra,
    ])


def _trainer(cfg, **kwargs) -> Trainer:
    return Trainer(cfg, **kwargs)


def _write_corpus(folder: Path, task_column: bool = True) -> Path:
    """Two small tasks: counting (digits) and a repeated pattern, a few documents each."""
    folder.mkdir(parents=True, exist_ok=True)
    count = [" ".join(str(i) for i in range(s, s + 6)) for s in range(1, 10)]
    abc = ["abc " * n + "d" for n in range(2, 8)] + ["é abc"]  # a two-byte character
    splits = {"train": (count[:7], abc[:5]), "test": (count[7:], abc[5:])}
    for split, (count_docs, abc_docs) in splits.items():
        rows = [{"text": t, "task": "count"} for t in count_docs] + [{"text": t, "task": "abc"} for t in abc_docs]
        if not task_column:
            rows = [{"text": r["text"]} for r in rows]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _hf_model(**overrides):
    import transformers

    torch.manual_seed(0)
    shape = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        router_aux_loss_coef=0.0,
    )
    config = transformers.MixtralConfig(**{**shape, **overrides})
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> dict:
    """{"hf": the transformers model, "folder": its save_pretrained folder, "native": the converted
    file, "data": the corpus folder}. No balance loss: it is a per-rank statistic, which an
    expert-parallel run could not match step for step."""
    root = tmp_path_factory.mktemp("pretrained")
    hf = _hf_model()
    hf.save_pretrained(root / "hf")
    model, family = import_hf(root / "hf")
    save_native(model, family, root / "mixtral.pt")
    return {"hf": hf, "folder": root / "hf", "native": root / "mixtral.pt", "data": _write_corpus(root / "data")}


def _losses(out_dir: Path) -> list[float]:
    with (out_dir / "train.csv").open() as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def _eval_metrics(out_dir: Path) -> dict[str, float]:
    with (out_dir / "eval.csv").open() as f:
        return {k: float(v) for k, v in list(csv.DictReader(f))[-1].items()}


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(ids).logits


# ------------------------------------------------------------------------- weights and the trainer


@pytest.mark.parametrize("source", ["folder", "native"])
def test_trainer_starts_from_the_pretrained_weights(pretrained, tmp_path, source):
    trainer = _trainer(_cfg(tmp_path, pretrained[source], pretrained["data"]), overwrite=True)
    assert isinstance(trainer.model, MoECausalLM) and trainer.model.config.num_experts == 4
    ids = torch.randint(0, VOCAB, (2, SEQ))
    torch.testing.assert_close(_logits(trainer.model, ids), _logits(pretrained["hf"], ids), atol=1e-5, rtol=1e-5)
    assert trainer.workload.data.tokenizer.name == "bytes (UTF-8)"  # no tokenizer files anywhere


def test_recompute_experts_reaches_the_pretrained_models_experts(pretrained, tmp_path):
    # moe.recompute_experts is the run's choice, as moe.experts_impl: every MoE layer's experts take it.
    trainer = _trainer(_cfg(tmp_path, pretrained["native"], pretrained["data"], "moe.recompute_experts=true"),
                       overwrite=True)
    experts = [m for m in trainer.model.modules() if isinstance(m, GroupedExperts)]
    assert experts and all(e.recompute for e in experts)
    ids = torch.randint(0, VOCAB, (2, SEQ))
    torch.testing.assert_close(_logits(trainer.model, ids), _logits(pretrained["hf"], ids), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def single_run(pretrained, tmp_path_factory) -> Path:
    """STEPS steps in one process from the native file (what the expert-parallel run repeats)."""
    out_dir = tmp_path_factory.mktemp("single")
    trainer = _trainer(_cfg(out_dir, pretrained["native"], pretrained["data"], "logging.routing_telemetry=true"))
    result = trainer.run()
    assert set(result.eval_metrics) == {f"{m}_{t}" for m in ("loss", "perplexity") for t in TASKS}
    assert result.tokens_per_task_expert_LXE.shape == (2, 2, 4) and result.tokens_per_task_expert_LXE.sum() > 0
    export_hf(_gathered(trainer), "mixtral", out_dir / "export")
    assert len(trainer.workload.data.test) % 4 == 1  # the last test batch of 4 rows has one row
    return out_dir


def _gathered(trainer: Trainer) -> MoECausalLM:
    """The trainer's whole model (every rank calls this: the state gathers the expert shards)."""
    state = trainer.state_dict()["model"]
    model = MoECausalLM(trainer.workload.model_config)
    model.load_state_dict(state)
    return model


def test_finetuning_lowers_the_loss_and_exports_to_transformers(pretrained, single_run):
    import transformers

    losses = _losses(single_run)
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.1
    with (single_run / "eval.csv").open() as f:
        final = list(csv.DictReader(f))[-1]
    assert float(final["perplexity_count"]) == pytest.approx(torch.tensor(float(final["loss_count"])).exp().item(), rel=1e-5)
    exported = transformers.AutoModelForCausalLM.from_pretrained(single_run / "export")
    tuned, family = load_pretrained_model(single_run)  # the run's last checkpoint, as a whole model
    assert family == "mixtral"
    ids = torch.randint(0, VOCAB, (2, SEQ))
    torch.testing.assert_close(_logits(exported, ids), _logits(tuned, ids), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_logits(exported, ids), _logits(pretrained["hf"], ids), atol=1e-3)  # it did train


def test_finetuning_continues_from_a_causal_lm_checkpoint(pretrained, single_run, tmp_path):
    """init_from = the run directory of a causal_lm run: its weights, the architecture of its source."""
    workload = CausalLMWorkload(_cfg(tmp_path, single_run, pretrained["data"], "data.tasks=[abc]"))
    assert workload.source.kind == "checkpoint" and workload.source.tasks == tuple(TASKS)
    model = workload.build_model(None)
    info = workload.load_initial_weights(model, single_run, None)
    assert info["pretrained_tasks"] == TASKS and info["new_tasks"] == [] and info["family"] == "mixtral"
    saved = read_model_state(single_run / "checkpoints")
    assert all(torch.equal(t, saved[k]) for k, t in model.state_dict().items())
    # finetune.freeze sees the MoE model's groups (no task-specific parameters).
    frozen = freeze_groups(model, workload, ["experts", "routers"])
    assert frozen.frozen["experts"] == sum(p.numel() for m in model.moe_layers for p in m.experts.parameters())
    assert frozen.frozen["routers"] == 2 * 4 * 32 and frozen.trainable > 0


def _train_on_ranks(rank: int, world_size: int, out_dir: str, native: str, data: str) -> None:
    cfg = _cfg(Path(out_dir), native, Path(data), "parallel.dispatcher=all_to_all", "parallel.expert_parallel_size=2")
    trainer = _trainer(cfg)
    assert trainer.model.moe_layers[0].experts.num_experts == 2  # two of the four experts on each rank
    trainer.run()
    model = _gathered(trainer)
    if rank == 0:
        export_hf(model, "mixtral", Path(out_dir) / "export")


def test_expert_parallel_run_follows_the_single_process_run(pretrained, single_run, tmp_path):
    import transformers

    run_ranks(2, _train_on_ranks, str(tmp_path), str(pretrained["native"]), str(pretrained["data"]))
    assert _losses(tmp_path) == pytest.approx(_losses(single_run), rel=1e-5)
    # The test split's last batch has one row (see single_run): rank 1 evaluates none of it, yet takes part.
    ep_eval, single_eval = (_eval_metrics(d) for d in (tmp_path, single_run))
    assert ep_eval == pytest.approx(single_eval, rel=1e-5)
    ids = torch.randint(0, VOCAB, (2, SEQ))
    ep, single = (transformers.AutoModelForCausalLM.from_pretrained(d / "export") for d in (tmp_path, single_run))
    torch.testing.assert_close(_logits(ep, ids), _logits(single, ids), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("packing", [True, False])
def test_gradient_accumulation_follows_the_whole_batch(pretrained, tmp_path, packing):
    # Without packing the rows are padded, so the micro-batches hold different numbers of predicted
    # tokens: each task's token mean must still be over the whole batch's tokens.
    runs = {}
    for accum in (1, 3):
        out_dir = tmp_path / f"accum{accum}"
        cfg = _cfg(out_dir, pretrained["native"], pretrained["data"], f"train.grad_accum_steps={accum}", packing=packing)
        _trainer(cfg).run()
        runs[accum] = out_dir
    assert _losses(runs[3]) == pytest.approx(_losses(runs[1]), rel=1e-5)


# ------------------------------------------------------------------------- losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_task_losses_are_transformers_token_means_without_padding(pretrained, tmp_path, dtype):
    workload = CausalLMWorkload(_cfg(tmp_path, pretrained["native"], pretrained["data"], packing=False))
    model = workload.build_model(None)
    workload.load_initial_weights(model, pretrained["native"], None)
    model.eval()
    batch = next(iter(workload.train_batches(seed=3)))
    assert (batch["length"] < SEQ).any() and set(batch["task"].tolist()) == {0, 1}  # padded rows of both tasks
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        step = workload.forward_step(model, batch, SINGLE, torch.device("cpu"))
    real_BS = torch.arange(SEQ)[None] < batch["length"][:, None]
    assert step.num_tokens == int(real_BS.sum()) and step.routing_task_ids_T.shape == (step.num_tokens,)
    assert all(r.experts_TK.shape == (step.num_tokens, 2) for r in step.routings)
    assert step.counts_T.tolist() == [float((batch["length"][batch["task"] == t] - 1).sum()) for t in range(2)]
    hf = pretrained["hf"]
    for t, name in enumerate(TASKS):
        rows = batch["task"] == t
        ids, mask = batch["input_ids"][rows], real_BS[rows]
        with torch.no_grad():
            want = hf(ids, attention_mask=mask.long(), labels=ids.masked_fill(~mask, -100)).loss
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
        torch.testing.assert_close(step.loss_sums[name].detach() / step.counts_T[t], want, **tol)
    # Gradients reach every parameter; what sits in the padding changes nothing.
    (sum(step.loss_sums.values()) + step.aux_loss + step.anchor).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    repadded = {**batch, "input_ids": batch["input_ids"].masked_fill(~real_BS, 7)}
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        again = workload.forward_step(model, repadded, SINGLE, torch.device("cpu"))
    for name in TASKS:
        torch.testing.assert_close(again.loss_sums[name], step.loss_sums[name].detach())


def test_a_rank_without_rows_of_a_task_reports_none(pretrained, tmp_path):
    workload = CausalLMWorkload(_cfg(tmp_path, pretrained["native"], pretrained["data"]))
    model = workload.build_model(None)
    batch = {k: v[:1] for k, v in next(iter(workload.train_batches(seed=0))).items()}  # one row, one task
    step = workload.forward_step(model, batch, SINGLE, torch.device("cpu"))
    task = int(batch["task"][0])
    assert list(step.loss_sums) == [TASKS[task]] and step.counts_T[1 - task] == 0
    assert step.anchor.item() == 0 and step.anchor.requires_grad


# ------------------------------------------------------------------------- data and tokenizers


def test_rows_are_packed_or_padded_per_document():
    docs = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    ids, lengths = pack_rows(docs, 4, eos_id=1, pad_id=0, packing=True)
    assert ids.tolist() == [[5, 6, 7, 1], [8, 1, 9, 10], [11, 12, 13, 1]] and lengths.tolist() == [4, 4, 4]
    ids, lengths = pack_rows(docs, 5, eos_id=1, pad_id=0, packing=True)
    assert ids.tolist() == [[5, 6, 7, 1, 8], [1, 9, 10, 11, 12], [13, 1, 0, 0, 0]] and lengths.tolist() == [5, 5, 2]
    ids, lengths = pack_rows(docs, 4, eos_id=1, pad_id=0, packing=False)
    assert ids.tolist() == [[5, 6, 7, 1], [8, 1, 0, 0], [9, 10, 11, 12]] and lengths.tolist() == [4, 2, 4]
    # Without an end-of-text id a one-token document predicts nothing: it is dropped.
    ids, lengths = pack_rows(docs, 4, eos_id=None, pad_id=0, packing=False)
    assert lengths.tolist() == [3, 4] and ids[0].tolist() == [5, 6, 7, 0]
    assert pack_rows([], 4, eos_id=1, pad_id=0, packing=True)[0].shape == (0, 4)


def test_text_without_a_task_column_is_one_lm_task(tmp_path):
    data = _write_corpus(tmp_path / "data", task_column=False)
    tokenizer = ByteTokenizer.as_text_tokenizer()
    text = load_text_data(data, ["lm"], tokenizer, seq_len=7, packing=True)
    train = text.train[:]
    assert text.task_names == ["lm"] and train["input_ids"].shape[1] == 7
    assert set(train["task"].tolist()) == {0}
    first = train["input_ids"][0, : train["length"][0]].tolist()
    assert ByteTokenizer.decode(first) == "1 2 3 4" and ByteTokenizer.decode(ByteTokenizer.encode_batch(["é"])[0]) == "é"
    with pytest.raises(ValueError, match=r"\['count'\] have no document in .*train.jsonl \(its tasks: \['lm'\]\)"):
        load_text_data(data, ["count"], tokenizer, seq_len=7)


def test_batches_are_deterministic_and_resume(pretrained, tmp_path):
    workload = CausalLMWorkload(_cfg(tmp_path, pretrained["native"], pretrained["data"]))
    first = workload.train_batches(seed=5)
    for _ in range(3):
        next(first)
    state = first.state_dict()
    expected = [next(first) for _ in range(4)]
    resumed = workload.train_batches(seed=5)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert all(torch.equal(got[k], want[k]) for k in want)


def _word_tokenizer(words: list[str]):
    """A word-level Hugging Face tokenizer: [PAD] 0, [EOS] 1, [UNK] 2, then `words`."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = ["[PAD]", "[EOS]", "[UNK]", *words]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]"
    )


def test_a_tokenizer_next_to_the_model_is_used(pretrained, tmp_path):
    tokenizer = _word_tokenizer(["abc", "d", *(str(i) for i in range(1, 15))])
    folder = tmp_path / "hf"
    pretrained["hf"].save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    workload = CausalLMWorkload(_cfg(tmp_path / "run", folder, pretrained["data"], packing=False))
    assert workload.data.tokenizer.name == f"Hugging Face tokenizer {folder}" and workload.data.tokenizer.pad_id == 0
    first = workload.data.train[0]
    assert first["input_ids"][: first["length"]].tolist() == [5, 6, 7, 8, 9, 10, 1]  # "1 2 3 4 5 6" and [EOS]
    # data.tokenizer = bytes overrides it; an explicit folder without tokenizer files is refused.
    assert CausalLMWorkload(_cfg(tmp_path / "run", folder, pretrained["data"], tokenizer="bytes")).data.tokenizer.eos_id == 1
    with pytest.raises(FileNotFoundError, match="data.tokenizer = .*not a folder with Hugging Face tokenizer files"):
        build_tokenizer(str(tmp_path / "run"), [])


def test_the_models_tokenizer_comes_before_the_datas(tmp_path):
    """Without data.tokenizer the first folder of the search (the model's, then data.path) that
    holds tokenizer files gives the tokenizer; one without any is skipped."""
    model_dir, data_dir, empty = tmp_path / "model", tmp_path / "data", tmp_path / "empty"
    _word_tokenizer(["a"]).save_pretrained(model_dir)
    _word_tokenizer(["a", "b", "c"]).save_pretrained(data_dir)
    empty.mkdir()
    assert build_tokenizer(None, [model_dir, data_dir]).num_ids == 4
    assert build_tokenizer(None, [empty, None, data_dir]).num_ids == 6
    assert build_tokenizer(None, [empty, None]).name == "bytes (UTF-8)"


def test_a_split_in_two_formats_is_refused(tmp_path):
    import datasets

    data = _write_corpus(tmp_path / "data")
    datasets.Dataset.from_dict({"text": ["other"], "task": ["abc"]}).to_parquet(str(data / "train.parquet"))
    with pytest.raises(ValueError, match=r"the train split is ambiguous, several files exist: .*train.jsonl.*train.parquet"):
        load_text_data(data, TASKS, ByteTokenizer.as_text_tokenizer(), seq_len=SEQ)


def test_a_vocabulary_of_exactly_the_tokenizers_ids_fits(pretrained, tmp_path):
    """The byte tokenizer's 258 ids fit a vocabulary of 258 (the refusal is for fewer)."""
    folder = tmp_path / "v258"
    _hf_model(vocab_size=ByteTokenizer.NUM_IDS).save_pretrained(folder)
    workload = CausalLMWorkload(_cfg(tmp_path / "run", folder, pretrained["data"]))
    assert workload.model_config.vocab_size == workload.data.tokenizer.num_ids == 258


def test_evaluation_is_the_token_mean_loss_and_routing_of_the_test_split(pretrained, tmp_path):
    """evaluate() against transformers on the padded test rows: each task's loss is the mean over
    its predicted tokens (rows weighted by their tokens), perplexity its exp, and each task's
    routed choices are K per real token of its rows in every MoE layer."""
    from contextlib import nullcontext

    workload = CausalLMWorkload(_cfg(tmp_path, pretrained["native"], pretrained["data"], packing=False))
    model = workload.build_model(None)
    workload.load_initial_weights(model, pretrained["native"], None)
    metrics, counts_LXE = workload.evaluate(model.eval(), SINGLE, torch.device("cpu"), nullcontext, 4)
    test = workload.data.test[:]
    assert (test["length"] < SEQ).any() and len(set(test["length"][test["task"] == 1].tolist())) > 1
    real_BS = torch.arange(SEQ)[None] < test["length"][:, None]
    hf = pretrained["hf"]
    for t, name in enumerate(TASKS):
        rows = test["task"] == t
        ids, mask = test["input_ids"][rows], real_BS[rows]
        with torch.no_grad():
            row_means = [hf(i[None], attention_mask=m[None].long(), labels=i.masked_fill(~m, -100)[None]).loss
                         for i, m in zip(ids, mask)]
        predicted = test["length"][rows] - 1
        want = float(sum(loss * n for loss, n in zip(row_means, predicted)) / predicted.sum())
        assert metrics[f"loss_{name}"] == pytest.approx(want, rel=1e-5)
        assert metrics[f"perplexity_{name}"] == pytest.approx(torch.tensor(want).exp().item(), rel=1e-5)
        assert counts_LXE.shape == (2, 2, 4)
        assert counts_LXE[:, t].sum(-1).tolist() == [2 * int(test["length"][rows].sum())] * 2


def test_refusals_name_the_value(pretrained, tmp_path):
    data, native = pretrained["data"], pretrained["native"]
    with pytest.raises(ConfigError, match="moe.num_experts = 8: the pre-trained model .* has 4 experts"):
        CausalLMWorkload(_cfg(tmp_path, native, data, "moe.num_experts=8"))
    # The router is the pre-trained one: a moe.router setting would be ignored (the expert bias would fail mid-run).
    with pytest.raises(ConfigError, match=r"moe.router.expert_bias_rate = 0.001: model.architecture = 'causal_lm' routes with "
                                          r"the pre-trained model's router"):
        CausalLMWorkload(_cfg(tmp_path, native, data, "moe.router.expert_bias_rate=0.001"))
    with pytest.raises(ConfigError, match=r"moe.router.capacity_factor = 0.5 \(and moe.router.top_k\)"):
        CausalLMWorkload(_cfg(tmp_path, native, data, "moe.router.top_k=1", "moe.router.capacity_factor=0.5"))
    cfg = _cfg(tmp_path, native, data)
    cfg.finetune.init_from = None
    with pytest.raises(ConfigError, match="finetune.init_from = None"):
        CausalLMWorkload(cfg)
    small = tmp_path / "small"
    _hf_model(vocab_size=200).save_pretrained(small)
    with pytest.raises(ConfigError, match="emits 258 ids, the model's vocabulary has 200"):
        CausalLMWorkload(_cfg(tmp_path, small, data))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointMismatchError, match="neither a `moe-engine convert --from-hf` file nor a moe_engine"):
        CausalLMWorkload(_cfg(tmp_path, junk, data))
    other = tmp_path / "other" / "step_00000001.pt"
    write_checkpoint_file(other, 1, {"config": {"model": {"architecture": "multitask"}, "finetune": {"init_from": None}}})
    with pytest.raises(CheckpointMismatchError, match="a model.architecture = 'multitask' run"):
        CausalLMWorkload(_cfg(tmp_path, other.parent, data))
    with pytest.raises(FileNotFoundError, match="expected a Hugging Face folder"):
        CausalLMWorkload(_cfg(tmp_path, tmp_path / "nowhere", data))
    with pytest.raises(ConfigError, match="data.batch_size = 64: the training text makes only"):
        CausalLMWorkload(_cfg(tmp_path, native, data, "data.batch_size=64")).train_batches(0)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "train.jsonl").write_text('{"text": "abc", "task": "abc"}\n')
    with pytest.raises(FileNotFoundError, match="no test split"):
        CausalLMWorkload(_cfg(tmp_path, native, tmp_path / "one", "data.tasks=[abc]"))


def test_cli_convert_then_finetune(pretrained, tmp_path, capsys):
    """What a user types: convert the HF folder, then `moe-engine finetune --from` the converted file."""
    from moe_engine import cli

    native = tmp_path / "model.pt"
    assert cli.main(["convert", "--from-hf", str(pretrained["folder"]), "--out", str(native)]) == 0
    sets = [a for o in [*TINY, "model.architecture=causal_lm", "data.name=text", f"data.path={pretrained['data']}",
                        f"data.tasks=[{','.join(TASKS)}]", f"train.out_dir={tmp_path / 'run'}"] for a in ("--set", o)]
    assert cli.main(["finetune", "--from", str(native), "--freeze", "routers", *sets]) == 0
    out = capsys.readouterr().out
    assert "frozen: routers" in out and "perplexity" in out
    # Without --from the causal LM has no architecture to build: refused before any work.
    assert cli.main(["finetune", *sets]) == 2
