"""Tests of the Uni-Perceiver-style generalist: tokenizers, GeneralistModel, its losses, and the key
padding mask of the blocks it reuses (moe_engine.mtl.blocks, moe_attention, model.SelfAttention).

Independent checks: a padded batch equals each sequence run alone without padding; the routed
tokens are counted by hand from the texts; add_tasks leaves old outputs bit-identical; the
expert-parallel model (all-to-all over gloo, 2 ranks) equals the single-process one in scores
and gradients, with one rank holding only image tasks and the other only text tasks (so each
rank makes zero-row encoder calls the other does not need).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from distributed import run_ranks
from moe_engine.config import ModelConfig, MoEConfig, RouterConfig, TaskRoutingConfig
from moe_engine.layer import MoELayer
from moe_engine.mtl.attribute_router import AttributeRouter
from moe_engine.mtl.blocks import TaskMoEBlock
from moe_engine.mtl.generalist.losses import task_loss_sums, task_metric_sums
from moe_engine.mtl.generalist.model import (
    ATTRIBUTE_NAMES,
    MAX_LOGIT_SCALE,
    GeneralistModel,
    GeneralistOutput,
    concat_routings,
)
from moe_engine.mtl.generalist.tasks import GeneralistTask
from moe_engine.mtl.generalist.tokenizers import PAD_ID, UNK_ID, ImagePatchTokenizer, TextTokenizer
from moe_engine.mtl.model import SelfAttention
from moe_engine.mtl.moe_attention import MoEAttention
from moe_engine.parallel import AllToAllDispatcher, build_parallel_groups
from moe_engine.parallel.runtime import expert_parameters
from moe_engine.parallel.sharding import load_canonical_state
from moe_engine.routing import Routing, TopKRouter

DIGITS = ("zero", "one", "two")
CAPTIONS = ("one two", "three", "four five six")
TASKS = (
    GeneralistTask("digit", "classification", "image", DIGITS, "accuracy", True, 1 / 3, "digit class"),
    GeneralistTask("caption", "retrieval", "image", CAPTIONS, "recall@1", True, 1 / 3, "image to caption"),
    GeneralistTask("parity", "classification", "text", ("even", "odd"), "accuracy", True, 0.5, "parity of a number"),
    GeneralistTask("length", "regression", "text", (), "mse", False, 1.0, "length of a text"),
)
NEW_TASK = GeneralistTask("sign", "classification", "text", ("plus", "minus"), "accuracy", True, 0.5, "sign")
NEW_REGRESSION = GeneralistTask("area", "regression", "image", (), "mse", False, 1.0, "ink area")


def configs(
    router: str = "attribute", moe_attention: bool = True, share_routing: bool = True, dropout: float = 0.0,
    capacity_factor: float | None = None, aux_loss_coef: float = 0.01,
) -> tuple[ModelConfig, MoEConfig]:
    model = ModelConfig(
        d_model=16, num_layers=2, num_heads=2, ffn_hidden=24, moe_every=2, patch_size=2,
        moe_attention=moe_attention, share_routing=share_routing, dropout=dropout,
    )
    # Fixed noise where the router reads it (task gates, attribute routing); the config refuses it elsewhere.
    task = TaskRoutingConfig(noise="fixed" if router in ("task_gate", "mod_squad", "attribute") else "none")
    moe = MoEConfig(
        num_experts=4, ffn_hidden=12,
        router=RouterConfig(
            type=router, top_k=2, capacity_factor=capacity_factor, aux_loss_coef=aux_loss_coef, task=task
        ),
    )
    return model, moe


def build(seed: int = 0, tasks=TASKS, **kwargs) -> GeneralistModel:
    torch.manual_seed(seed)
    tokenizers = kwargs.pop("tokenizers", None)
    return GeneralistModel(*configs(**kwargs), tasks, tokenizers=tokenizers)


def make_batch(seed: int = 0, names=("digit", "caption", "parity", "length")) -> dict[str, dict]:
    g = torch.Generator().manual_seed(seed)
    full = {
        "digit": {"image": torch.rand(3, 8, 12, generator=g), "label": torch.tensor([0, 2, 1])},
        "caption": {"image": torch.rand(2, 8, 12, generator=g), "label": torch.tensor([1, 2])},
        "parity": {"text": ["17", "Forty two!", ""], "label": torch.tensor([1, 0, 0])},
        "length": {"text": ["abc", "a rather long text that is cut"], "value": torch.tensor([0.3, 3.0])},
    }
    return {name: full[name] for name in names}


@pytest.fixture(autouse=True)
def one_thread():
    # These shapes are tiny: on a busy 2-core machine, torch's thread pool costs more than it gives.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scalar_loss(model: GeneralistModel, out: GeneralistOutput, batch) -> torch.Tensor:
    return sum(task_loss_sums(model.tasks, out, batch).values()) + out.aux_loss


# ------------------------------------------------------------------------------------------ tokenizers


def test_text_tokenizer_vocabulary_truncation_and_padding() -> None:
    tok = TextTokenizer(8, max_len=5)
    ids, mask = tok.encode(["AbC", "hello world", "", "a\u00e9"])
    assert ids.shape == (4, 5) and mask.dtype == torch.bool
    assert tok.decode(ids) == ["abc", "hello", "", "a?"]  # lowercased, truncated, unknown -> UNK
    assert ids[3, 1] == UNK_ID and ids[2].eq(PAD_ID).all()
    assert mask.tolist() == [[False] * 3 + [True] * 2, [False] * 5, [True] * 5, [False] * 2 + [True] * 3]
    assert len(set(tok.char_to_id.values())) == tok.vocab_size - 2
    assert TextTokenizer(8, 5).encode(["x1 y"])[0].equal(tok.encode(["x1 y"])[0])  # deterministic vocabulary
    empty_ids, empty_mask = tok.encode([])
    assert empty_ids.shape == (0, 0) and empty_mask.shape == (0, 0)
    tokens, _ = tok([])
    assert tokens.shape == (0, 0, 8)
    with pytest.raises(ValueError, match="expected a list of strings"):
        tok.encode("abc")
    with pytest.raises(ValueError, match="expected str"):
        tok.encode(["a", 3])
    with pytest.raises(ValueError, match="max_text_len = 0"):
        TextTokenizer(8, 0)


def test_image_tokenizer_patches_and_errors() -> None:
    tok = ImagePatchTokenizer((4, 6), 2, 5)
    images = torch.arange(2 * 4 * 6, dtype=torch.float32).view(2, 4, 6)
    patches = tok.patchify(images)
    assert patches.shape == (2, 6, 4)
    assert patches[0, 1].tolist() == [2.0, 3.0, 8.0, 9.0]  # second patch of the first row
    tokens, mask = tok(images)
    assert tokens.shape == (2, 6, 5) and mask is None
    assert tok.collate([]).shape == (0, 4, 6) and tok(tok.collate([]))[0].shape == (0, 6, 5)
    with pytest.raises(ValueError, match=r"images have shape \(2, 6, 4\): expected \(B, 4, 6\)"):
        tok(images.transpose(1, 2))
    with pytest.raises(ValueError, match="patch_size = 4"):
        ImagePatchTokenizer((4, 6), 4, 5)


# ------------------------------------------------------------------------------------------ padding in the blocks


def _split_unpadded(x_BSD: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    return [x_BSD[b : b + 1, :n] for b, n in enumerate(lengths)]


@pytest.mark.parametrize("moe_attention, capacity_factor", [(True, None), (True, 1.0), (False, None)])
def test_padded_block_equals_each_sequence_alone(moe_attention: bool, capacity_factor: float | None) -> None:
    """A padded batch through a block = every sequence alone, unpadded (capacity counted over real tokens)."""
    torch.manual_seed(0)
    D, H, E, K = 12, 3, 4, 2
    router = TopKRouter(D, E, K, capacity_factor=capacity_factor) if capacity_factor else TopKRouter(D, E, K)
    ffn = MoELayer(router, MoELayer.from_config(D, MoEConfig(num_experts=E, ffn_hidden=10)).experts)
    attn = MoEAttention(D, H, E, router) if moe_attention else SelfAttention(D, H, 0.0)
    block = TaskMoEBlock(D, H, attn=attn, ffn=ffn, share_routing=moe_attention).eval()
    lengths = [5, 2, 7, 1]
    x = torch.randn(len(lengths), 7, D)
    mask = torch.arange(7)[None] >= torch.tensor(lengths)[:, None]
    out = block(x, key_padding_mask_BS=mask)
    # One sequence at a time, its capacity is its own; with a capacity, route them all together unpadded instead.
    if capacity_factor is None:
        alone = [block(seq) for seq in _split_unpadded(x, lengths)]
        expected_routing = concat_routings([r.routings[0] for r in alone])
        for b, n in enumerate(lengths):
            torch.testing.assert_close(out.x[b, :n], alone[b].x[0], atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(out.routings[0].weights_TK, expected_routing.weights_TK)
        assert out.routings[0].experts_TK.equal(expected_routing.experts_TK)
    assert len(out.routings) == 1 and out.routings[0].experts_TK.shape[0] == sum(lengths)
    # Garbage in the padding changes nothing outside it.
    noisy = x.masked_fill(mask[..., None], 1e3)
    torch.testing.assert_close(block(noisy, key_padding_mask_BS=mask).x[~mask], out.x[~mask], atol=1e-6, rtol=1e-5)


def test_no_mask_is_unchanged_and_mask_errors() -> None:
    torch.manual_seed(1)
    attn = MoEAttention(8, 2, 4, TopKRouter(8, 4, 2))
    x = torch.randn(2, 3, 8)
    all_real = torch.zeros(2, 3, dtype=torch.bool)
    torch.testing.assert_close(attn(x, key_padding_mask_BS=all_real)[0], attn(x)[0], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match=r"key_padding_mask_BS has shape \(2, 2\).*expected \(2, 3\) bool"):
        attn(x, key_padding_mask_BS=torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected \\(2, 3\\) bool"):
        SelfAttention(8, 2, 0.0)(x, key_padding_mask_BS=torch.zeros(2, 3))


# ------------------------------------------------------------------------------------------ the model


def _routed_tokens(model: GeneralistModel, batch) -> dict[int, int]:
    """Task index -> tokens routed for it, counted by hand: [SPE] + prompt + patches or characters;
    the targets: [SPE] + characters (no prompt)."""
    counts = {}
    for i, task in enumerate(model.tasks):
        n = 0
        if task.name in batch:
            sub = batch[task.name]
            if task.modality == "image":
                n += len(sub["image"]) * (2 + 24)
            else:
                n += sum(2 + min(len(t), 24) for t in sub["text"])
        n += sum(1 + len(t) for t in task.targets)
        counts[i] = n
    return counts


def test_shapes_for_every_kind_and_both_modalities() -> None:
    model = build()
    batch = make_batch()
    out = model(batch)
    assert list(out.scores) == ["digit", "caption", "parity", "length"]
    assert out.scores["digit"].shape == (3, 3) and out.scores["caption"].shape == (2, 3)
    assert out.scores["parity"].shape == (3, 2) and out.scores["length"].shape == (2,)
    assert all(s.dtype == torch.float32 for s in out.scores.values())
    assert out.aux_loss.shape == () and out.aux_loss.dtype == torch.float32 and out.aux_loss > 0
    # One router per MoE block (the FFN shares the attention's); every routing covers all calls.
    assert len(model.routers) == 1 == len(out.routings) and len(model.moe_layers) == 1
    counts = _routed_tokens(model, batch)
    assert out.routing_task_ids_T.dtype == torch.int64
    assert torch.bincount(out.routing_task_ids_T, minlength=len(TASKS)).tolist() == [counts[i] for i in range(4)]
    assert out.routings[0].experts_TK.shape == (sum(counts.values()), 2)
    assert out.routings[0].scores_TE.shape == (sum(counts.values()), 4)
    scale = model.logit_scale.exp()
    assert math.isclose(scale.item(), 1 / 0.07, rel_tol=1e-6)
    assert out.scores["digit"].abs().max() <= scale + 1e-4  # cosine * scale


@pytest.mark.parametrize("names", [("digit", "caption"), ("parity", "length"), ("length",), ("caption",)])
def test_zero_row_calls_and_single_task_batches(names) -> None:
    model = build(router="softmax_topk", share_routing=False)
    batch = make_batch(names=names)
    out = model(batch)
    assert list(out.scores) == list(names)
    assert len(out.routings) == 2  # attention and FFN routers of the one MoE block
    counts = _routed_tokens(model, batch)
    assert out.routings[1].experts_TK.shape[0] == sum(counts.values()) == out.routing_task_ids_T.shape[0]
    loss = scalar_loss(model, out, batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_a_task_with_zero_rows_scores_and_still_reaches_its_parameters() -> None:
    # What a rank holding none of a task's rows runs (workloads keep such tasks; DeepSpeed needs it):
    # empty scores, a zero loss, and a zero gradient (not None) for the task's head and the logit scale.
    model = build(router="softmax_topk", share_routing=False)
    batch = make_batch(names=("digit", "length"))
    batch["length"] = {"text": [], "value": torch.zeros(0)}
    batch["digit"] = {"image": torch.zeros(0, 8, 12), "label": torch.zeros(0, dtype=torch.int64)}
    out = model(batch)
    assert out.scores["digit"].shape == (0, len(model.tasks[0].targets)) and out.scores["length"].shape == (0,)
    losses = task_loss_sums(model.tasks, out, batch)
    assert {name: loss.item() for name, loss in losses.items()} == {"digit": 0.0, "length": 0.0}
    (sum(losses.values()) + out.aux_loss).backward()
    for p in (model.logit_scale, model.regression_weight, model.regression_bias):
        assert p.grad is not None and not p.grad.any()


def test_a_scalar_logit_scale_from_an_older_file_loads() -> None:
    model = build()
    state = model.state_dict()
    assert state["logit_scale"].shape == (1,)  # DeepSpeed's engine cannot broadcast a 0-dim parameter
    state["logit_scale"] = torch.tensor(2.5)
    model.load_state_dict(state)
    assert model.logit_scale.shape == (1,) and model.logit_scale.item() == 2.5


class PaddingTextTokenizer(TextTokenizer):
    """The text tokenizer with `extra` more padding positions of garbage appended to every text."""

    extra = 5

    def forward(self, texts):
        tokens, mask = super().forward(texts)
        B, _, D = tokens.shape
        garbage = torch.full((B, self.extra, D), 50.0, dtype=tokens.dtype)
        return torch.cat([tokens, garbage], 1), torch.cat([mask, torch.ones(B, self.extra, dtype=torch.bool)], 1)


@pytest.mark.parametrize("capacity_factor", [None, 1.5])
def test_padding_does_not_change_features(capacity_factor: float | None) -> None:
    """Appending padding changes no score: through a longer batch mate, and through garbage
    padding positions (under a capacity limit too, since padding is not routed)."""
    model = build(capacity_factor=capacity_factor).eval()
    short = {"parity": {"text": ["12 ab"]}}
    padded = {"parity": {"text": ["12 ab", "a much longer text here"]}}
    alone = model(short).scores["parity"]
    if capacity_factor is None:
        torch.testing.assert_close(model(padded).scores["parity"][:1], alone, atol=1e-5, rtol=1e-5)
    garbage = build(capacity_factor=capacity_factor, tokenizers={"text": PaddingTextTokenizer(16, 24)})
    garbage.load_state_dict(model.state_dict())
    out = garbage.eval()(short)
    torch.testing.assert_close(out.scores["parity"], alone, atol=1e-5, rtol=1e-5)
    assert out.routings[0].experts_TK.shape[0] == model(short).routings[0].experts_TK.shape[0]


def test_gradients_reach_tokenizers_experts_and_routers() -> None:
    model = build(router="attribute")
    batch = make_batch()
    scalar_loss(model, model(batch), batch).backward()
    block = model.blocks[1]
    named = {
        "image tokenizer": model.tokenizers["image"].proj.weight,
        "text embedding": model.tokenizers["text"].embed.weight,
        "text positions": model.tokenizers["text"].pos_embed,
        "task prompts": model.task_prompt,
        "ffn experts": block.ffn.experts.w_in,
        "attention experts": block.attn.w_q,
        "router gate": block.attn.router.weight,
        "router attributes": block.attn.router.attribute_proj.weight,
        "logit scale": model.logit_scale,
        "regression head": model.regression_weight,
    }
    for name, p in named.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # PAD's embedding row stays untouched; the prompt of an absent task gets nothing.
    assert model.tokenizers["text"].embed.weight.grad[PAD_ID].abs().sum() == 0
    absent = build(router="attribute")
    one = make_batch(names=("digit",))
    scalar_loss(absent, absent(one), one).backward()
    assert absent.task_prompt.grad[1:].abs().sum() == 0 and absent.task_prompt.grad[0].abs().sum() > 0


def test_attribute_routing_sees_the_eight_bits() -> None:
    model = build(router="attribute")
    router = model.blocks[1].attn.router
    assert isinstance(router, AttributeRouter) and model.blocks[1].ffn.router is router and router.num_attributes == 8
    seen = []
    router.register_forward_pre_hook(lambda module, args: seen.append((args[1].attributes_TA, args[1].task_ids_T)))
    batch = make_batch(names=("caption", "length"))
    out = model(batch)
    assert len(seen) == 3  # image inputs, text inputs, targets
    # The router saw exactly the tokens whose tasks the output lists, in the same order.
    assert torch.cat([task_ids for _, task_ids in seen]).equal(out.routing_task_ids_T)
    bits = {name: i for i, name in enumerate(ATTRIBUTE_NAMES)}
    assert len(ATTRIBUTE_NAMES) == 8

    def row(*names: str) -> list[float]:
        return [1.0 if n in names else 0.0 for n in ATTRIBUTE_NAMES]

    image, image_tasks = seen[0]
    assert image.shape == (2 * 26, 8) and image_tasks.eq(1).all()
    assert image[0].tolist() == row("is_image", "is_input", "is_special", "kind_retrieval")  # [SPE]
    assert image[1].tolist() == row("is_image", "is_input", "is_special", "kind_retrieval")  # prompt
    assert image[2].tolist() == row("is_image", "is_input", "kind_retrieval")  # a patch
    text, text_tasks = seen[1]
    assert text.shape[0] == 2 + 3 + 2 + 24  # padding is not routed
    assert text[2].tolist() == row("is_text", "is_input", "kind_regression") and text_tasks.eq(3).all()
    targets, target_tasks = seen[2]
    assert targets[:, bits["is_target"]].eq(1).all() and targets[:, bits["is_input"]].eq(0).all()
    first_caption = len(DIGITS) + sum(len(t) for t in DIGITS)  # [SPE] + chars of each digit name before
    assert target_tasks[first_caption] == 1 and target_tasks[first_caption - 1] == 0
    assert targets[first_caption].tolist() == row("is_text", "is_target", "is_special", "kind_retrieval")
    assert targets[0].tolist() == row("is_text", "is_target", "is_special", "kind_classification")


def test_add_tasks_keeps_old_outputs_and_initialises_new_rows() -> None:
    model = build(router="attribute").eval()
    batch = make_batch()
    before = model(batch).scores
    prompts, heads = model.task_prompt.detach().clone(), model.regression_weight.detach().clone()
    with torch.no_grad():
        model.regression_bias[3] = 0.5
        heads[3] = torch.randn(16)
        model.regression_weight.copy_(heads)
    before["length"] = model(batch).scores["length"]
    model.add_tasks([NEW_TASK, NEW_REGRESSION])
    assert model.task_names == ("digit", "caption", "parity", "length", "sign", "area")
    torch.testing.assert_close(model.task_prompt[4], prompts.mean(0))
    torch.testing.assert_close(model.task_prompt[5], prompts.mean(0))
    torch.testing.assert_close(model.regression_weight[5], heads[3])  # the only regression head so far
    assert model.regression_bias[5] == 0.5 and model.task_prompt[:4].equal(prompts)
    after = model(batch).scores
    for name, scores in before.items():
        assert scores.equal(after[name]), name
    new = {
        "sign": {"text": ["+3", "-4"], "label": torch.tensor([0, 1])},
        "area": {"image": torch.rand(1, 8, 12), "value": torch.tensor([2.0])},
    }
    out = model.train()(new)
    assert out.scores["sign"].shape == (2, 2) and out.scores["area"].shape == (1,)
    scalar_loss(model, out, new).backward()
    assert model.task_prompt.grad[4:].abs().sum() > 0
    with pytest.raises(ValueError, match="task name 'sign' appears twice"):
        model.add_tasks([NEW_TASK])
    model.task_prompt.requires_grad_(False)
    model.add_tasks([GeneralistTask("other", "regression", "text", (), "mse", False, 1.0, "x")])
    assert not model.task_prompt.requires_grad and model.regression_weight.requires_grad  # freezing survives
    with pytest.raises(ValueError, match="moe.router.type = 'task_gate' keeps parameters per task id"):
        build(router="task_gate", moe_attention=False, share_routing=False).add_tasks([NEW_TASK])


@pytest.mark.parametrize("autocast", [False, True])
def test_fp32_and_bf16_autocast_forward(autocast: bool) -> None:
    model = build().eval()
    batch = make_batch()
    reference = model(batch).scores
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(batch)
        loss = scalar_loss(model, out, batch)
    for name, scores in out.scores.items():
        assert scores.dtype == torch.float32
        # bf16 keeps about 3 digits of logits up to 1/0.07 = 14.3 in size.
        tol = dict(atol=0.3, rtol=0.05) if autocast else dict(atol=0.0, rtol=0.0)
        torch.testing.assert_close(scores, reference[name], **tol)
    loss.backward()
    assert torch.isfinite(model.blocks[1].ffn.experts.w_in.grad).all()


def test_loss_and_metric_sums() -> None:
    tasks = TASKS[2:]
    scores = {"parity": torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), "length": torch.tensor([1.0, 2.0])}
    out = GeneralistOutput(scores, torch.zeros(()), (), torch.zeros(0, dtype=torch.int64))
    batch = {
        "parity": {"text": ["a", "b", "c"], "label": torch.tensor([0, 0, 1])},
        "length": {"text": ["x", "y"], "value": torch.tensor([0.5, 4.0])},
    }
    losses = task_loss_sums(tasks, out, batch)
    log_softmax = torch.log_softmax(scores["parity"], -1)
    torch.testing.assert_close(losses["parity"], -(log_softmax[0, 0] + log_softmax[1, 0] + log_softmax[2, 1]))
    torch.testing.assert_close(losses["length"], torch.tensor(0.25 + 4.0))
    metrics = task_metric_sums(tasks, out, batch)
    assert metrics["parity"][0].item() == 1.0 and metrics["parity"][1] == 3  # a tie goes to index 0: wrong
    assert metrics["length"][0].item() == 4.25 and metrics["length"][1] == 2
    with pytest.raises(ValueError, match=r"batch tasks \['digit'\]"):
        task_loss_sums(tasks, out, {"digit": {}})
    with pytest.raises(ValueError, match="needs 'label'"):
        task_loss_sums(tasks, out, {"parity": {"text": ["a"]}})


def test_model_errors() -> None:
    model = build()
    with pytest.raises(ValueError, match=r"batch tasks \['nope'\]: not tasks of this model"):
        model({"nope": {"image": torch.rand(1, 8, 12)}})
    with pytest.raises(ValueError, match="a text task needs 'text'"):
        model({"parity": {"image": torch.rand(1, 8, 12)}})
    with pytest.raises(ValueError, match="at least one task"):
        build(tasks=())
    with pytest.raises(ValueError, match="tokenizers\\['audio'\\] = Linear"):
        build(tokenizers={"audio": nn.Linear(2, 2)})
    with pytest.raises(ValueError, match="appears twice"):
        build(tasks=TASKS + TASKS[:1])
    bad_width = r"tokenizers\['image'\] gave tokens of shape \(3, 3, 17\): expected \(3, L, 16\)"
    with pytest.raises(ValueError, match=bad_width):
        build(tokenizers={"image": BadTokenizer(16)})(make_batch(names=("digit",)))
    text_only = build(tasks=TASKS[2:], tokenizers={"image": BadTokenizer(16)})
    del text_only.tokenizers["image"]
    with pytest.raises(ValueError, match="modality 'image' has no tokenizer; have \\['text'\\]"):
        text_only.add_tasks([NEW_REGRESSION])
    # Targets the text tokenizer cannot tell apart (case, truncation to max_text_len = 24) are refused.
    alike = GeneralistTask("case", "classification", "text", ("Even", "even", "odd"), "accuracy", True, 0.5, "x")
    with pytest.raises(ValueError, match=r"task 'case': targets that the text tokenizer encodes alike .*'Even' = 'even'"):
        build(tasks=TASKS + (alike,))
    long = tuple(f"{'a very long shared prefix '}{i}" for i in range(3))
    cut = GeneralistTask("cut", "retrieval", "text", long, "recall@1", True, 1 / 3, "x")
    with pytest.raises(ValueError, match=r"task 'cut': .*'a very long shared prefix 0' = 'a very long shared prefix 1'.*raise model.max_text_len"):
        model.add_tasks([cut])


class BadTokenizer(nn.Module):
    """Breaks the protocol: tokens without the model width."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def collate(self, parts):
        return torch.cat(parts) if parts else torch.zeros(0, 8, 12)

    def forward(self, images):
        return torch.zeros(len(images), 3, self.width + 1), None


def test_concat_routings_averages_losses_by_rows_and_sums_capacities() -> None:
    def routing(T: int, capacity: int | None, aux: float) -> Routing:
        return Routing(torch.rand(T, 2), torch.zeros(T, 2, dtype=torch.int64), torch.rand(T, 3), torch.tensor(aux),
                       {"balance_loss": torch.tensor(aux)}, capacity)

    both = concat_routings([routing(2, 4, 1.0), routing(0, 1, 0.5), routing(3, 2, 0.25)])
    assert both.experts_TK.shape == (5, 2) and both.capacity == 7
    # (2 * 1.0 + 0 * 0.5 + 3 * 0.25) / 5: the part with no rows has no weight
    assert both.aux_loss.item() == pytest.approx(0.55) and both.aux_terms["balance_loss"].item() == pytest.approx(0.55)
    assert concat_routings([routing(0, 1, 0.5), routing(0, 1, 0.25)]).aux_loss.item() == pytest.approx(0.375)
    assert concat_routings([routing(1, None, 0.0)]).capacity is None
    with pytest.raises(ValueError, match="mix dropless"):
        concat_routings([routing(1, None, 0.0), routing(1, 3, 0.0)])
    with pytest.raises(ValueError, match="concat_routings: got no routings"):
        concat_routings([])


def test_auxiliary_losses_average_over_encoder_calls() -> None:
    """Three encoder calls (image, text, targets): a regulariser of the parameters alone (DSelect-k's
    static gate) counts once, not once per call."""
    model = build(router="dselect_k", moe_attention=False, share_routing=False).train()
    out = model(make_batch())
    once = sum(r.gate.weights(torch.zeros(1, 16), torch.zeros(1, dtype=torch.int64)).reg_loss for r in model.routers)
    assert len(model.tokenizers) + 1 == 3 and once > 0
    torch.testing.assert_close(out.aux_loss, once)


def test_embedding_parameters_belong_to_the_model() -> None:
    model = build()
    ids = {id(p) for p in model.parameters()}
    embeddings = {id(p) for p in model.embedding_parameters()}
    assert embeddings <= ids
    for p in (model.tokenizers["image"].pos_embed, model.tokenizers["text"].embed.weight, model.spe, model.logit_scale):
        assert id(p) in embeddings
    assert id(model.tokenizers["image"].proj.weight) not in embeddings


def test_tiny_overfit() -> None:
    """30 Adam steps on a handful of examples of every task: the summed loss falls far below its
    start, and so does every task's. The images differ in how much ink they hold: at this size a
    fresh model's [SPE] pools patches almost uniformly, so where the ink sits is learned later."""
    model = build(dropout=0.0)
    batch = make_batch(1)
    g = torch.Generator().manual_seed(0)
    ink = torch.zeros(3, 8, 12)
    for c in range(3):
        ink[c, :, : 4 * c + 2] = 1.0
    batch["digit"]["image"] = ink + 0.05 * torch.rand(3, 8, 12, generator=g)
    batch["caption"]["image"] = ink[1:].flip(0) + 0.05 * torch.rand(2, 8, 12, generator=g)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = {}
    losses = []
    for _ in range(30):
        out = model(batch)
        per_task = task_loss_sums(model.tasks, out, batch)
        first = first or {name: value.item() for name, value in per_task.items()}
        loss = sum(per_task.values()) + out.aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses
    for name, value in task_loss_sums(model.tasks, model(batch), batch).items():
        assert value.item() < 0.5 * first[name], (name, value.item(), first[name])
    assert model.logit_scale.exp().item() <= MAX_LOGIT_SCALE


# ------------------------------------------------------------------------------------------ expert parallelism


def _rank_batches() -> list[dict]:
    # Rank 0 sees only image tasks, rank 1 only text tasks: each makes a zero-row call the other does not.
    return [make_batch(3, names=("digit", "caption")), make_batch(4, names=("parity", "length"))]


def _check_expert_parallel(rank: int, world_size: int) -> None:
    torch.set_num_threads(1)  # two ranks on two cores
    model_cfg, moe_cfg = configs(router="attribute", aux_loss_coef=0.01)
    groups = build_parallel_groups(world_size, moe_cfg.num_experts)
    torch.manual_seed(0)
    whole = GeneralistModel(model_cfg, moe_cfg, TASKS).double().eval()
    batches = _rank_batches()
    expected_scores = []
    for batch in batches:
        out = whole(batch)
        scalar_loss(whole, out, batch).backward()
        expected_scores.append(out.scores)

    model = GeneralistModel(
        model_cfg, moe_cfg, TASKS, make_dispatcher=lambda cfg: AllToAllDispatcher(cfg.num_experts, groups.ep_group)
    ).double().eval()
    load_canonical_state(model, None, whole.state_dict(), None, groups.ep_rank, groups.ep_size)
    out = model(batches[rank])
    scalar_loss(model, out, batches[rank]).backward()
    tol = dict(rtol=1e-6, atol=1e-9)
    for name, scores in out.scores.items():
        torch.testing.assert_close(scores, expected_scores[rank][name], **tol, msg=lambda m: f"scores {name}: {m}")
    experts = {id(p) for p in expert_parameters(model)}
    reference = dict(whole.named_parameters())
    local = slice(groups.ep_rank * 2, (groups.ep_rank + 1) * 2)
    for name, p in model.named_parameters():
        grad = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(grad, group=groups.edp_group if id(p) in experts else groups.dp_group)
        expected = reference[name].grad if reference[name].grad is not None else torch.zeros_like(reference[name])
        if id(p) in experts:
            expected = expected[local]
        torch.testing.assert_close(grad, expected, **tol, msg=lambda m: f"grad {name}: {m}")


def test_expert_parallel_matches_single_process() -> None:
    run_ranks(2, _check_expert_parallel)
