"""`moe-engine profile`: the trace attribution on hand-made traces, and one real profile run on CPU."""

import argparse
import contextlib
import io
import json

import pytest
import torch

from moe_engine.config import MoEConfig
from moe_engine.layer import MoELayer
from moe_engine.profiling import _attention_modules, _StepObserver, add_arguments, check_counts, run_from_args
from moe_engine.profiling_report import STEP_RANGE, _Event, _shape_flops, analyze_trace, build_table

# The default job shrunk to seconds on CPU.
SMALL = [
    "model.num_layers=2", "model.d_model=32", "model.num_heads=2", "model.ffn_hidden=32", "moe.ffn_hidden=32",
    "data.pairs_per_task=200", "data.batch_size=16", "train.max_steps=10", "logging.tensorboard=false",
    "logging.progress_bar=false", "train.device=cpu",
]


def _args(*argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def _op(name, ts, dur, tid=1, cat="cpu_op", **args):
    return {"ph": "X", "cat": cat, "name": name, "pid": 7, "tid": tid, "ts": ts, "dur": dur, "args": args}


def _kernel(name, ts, dur, ext, stream):
    return {"ph": "X", "cat": "kernel", "name": name, "pid": 0, "tid": stream, "ts": ts, "dur": dur, "args": {"External id": ext}}


def _range(name, ts, dur, tid=1):
    return _op(name, ts, dur, tid, cat="user_annotation")


def test_host_attribution_partitions_the_step():
    bwd = "autograd::engine::evaluate_function: "
    events = [
        _range(STEP_RANGE, 0, 100),
        _range("moe::router", 0, 10),
        _op("aten::mm", 2, 6, **{"Sequence number": 1}),
        _op("moe_engine::balance_loss", 9.5, 0.5),  # an aux-loss op inside the router's range
        # Records seq 2 without creating node 2 (no grad): the experts' mm that creates it wins.
        _op("aten::argsort", 8.5, 1, **{"Sequence number": 2}),
        _range("moe::experts", 10, 30),
        _op("aten::mm", 12, 26, **{"Sequence number": 2}),
        _op("aten::add", 40, 5, **{"Sequence number": 3}),
        _op(bwd + "MmBackward0", 50, 20, **{"Sequence number": 2}),
        _op("aten::mm", 52, 16),
        _op(bwd + "MmBackward0", 70, 5, **{"Sequence number": 1}),
        _op(bwd + "AddBackward0", 75, 3, **{"Sequence number": 3}),
        _op("aten::mul", 80, 5),  # after the last backward node: gradient clipping
        _range("Optimizer.step#AdamW.step", 85, 13),
        _op("aten::_foreach_add_", 86, 11),
        _op("aten::mm", 150, 10),  # outside the step: not counted
    ]
    (step,) = analyze_trace(events)
    assert not step.on_device
    got = {k: v for k, v in step.category_us.items() if v}
    # router: 10 forward + 5 backward; gemm: 30 + 20; rest: add, its backward and the python gap
    # before the backward (45..50); optimizer: everything after the backward (78..100).
    assert got == pytest.approx({"router": 14.5, "aux_loss": 0.5, "gemm": 50, "rest": 13, "optimizer": 22})
    assert sum(got.values()) == pytest.approx(100)
    assert step.op_us[("gemm", "aten::mm")] == pytest.approx(26 + 16)
    assert step.op_us[("router", "moe::router (python)")] == pytest.approx(10 - 6 - 0.5 - 1)


def test_backward_node_of_sequence_number_zero_takes_its_forward_category():
    """Sequence numbers start at 0: the first autograd node of a step (the router's) is attributed like any other."""
    bwd = "autograd::engine::evaluate_function: "
    events = [
        _range(STEP_RANGE, 0, 100),
        _range("moe::router", 0, 10),
        _op("aten::mm", 2, 6, **{"Sequence number": 0}),
        _op(bwd + "MmBackward0", 20, 30, **{"Sequence number": 0}),
    ]
    (step,) = analyze_trace(events)
    assert step.category_us["router"] == pytest.approx(10 + 30)


def test_host_time_straddling_the_backward_end_is_split():
    """The autograd engine's thread runs the backward (tid 2) while the step's own thread waits: that
    thread's python time is `rest` up to the last backward node's end and `optimizer` after it."""
    bwd = "autograd::engine::evaluate_function: "
    events = [
        _range(STEP_RANGE, 0, 100),
        _op("aten::add", 0, 10, **{"Sequence number": 1}),
        _op(bwd + "AddBackward0", 20, 40, tid=2, **{"Sequence number": 1}),  # ends at 60
        _range("Optimizer.step#AdamW.step", 80, 10),
    ]
    (step,) = analyze_trace(events)
    got = {k: v for k, v in step.category_us.items() if v}
    # rest: the add (0..10) and python 10..60; optimizer: python 60..80 and 90..100, the step range 80..90.
    assert got == pytest.approx({"rest": 60, "optimizer": 40})
    assert step.op_us[("rest", "(python, outside ops)")] == pytest.approx(50)
    assert step.op_us[("optimizer", "(python, outside ops)")] == pytest.approx(30)


def test_device_attribution_splits_overlaps_and_counts_idle():
    events = [
        _range(STEP_RANGE, 0, 100),
        _range("moe::experts", 0, 10),
        _op("aten::mm", 1, 4, **{"External id": 11}),
        _range("moe::router", 10, 10),
        _op("aten::mm", 11, 4, **{"External id": 12}),
        _op("cudaLaunchKernel", 12, 1, cat="cuda_runtime", **{"External id": 12}),
        _kernel("gemm_kernel", 20, 40, ext=11, stream=7),
        _kernel("router_kernel", 40, 40, ext=12, stream=8),  # overlaps the gemm kernel on 40..60
        _kernel("unknown_kernel", 99, 5, ext=99, stream=7),  # no host op, and cut at the step's end
    ]
    (step,) = analyze_trace(events)
    assert step.on_device
    got = {k: v for k, v in step.category_us.items() if v}
    assert got == pytest.approx({"gemm": 30, "router": 30, "idle": 39, "rest": 1})


def test_no_step_range_is_an_error():
    with pytest.raises(ValueError, match=STEP_RANGE):
        analyze_trace([_op("aten::mm", 0, 1)])


@pytest.mark.parametrize(
    "name, dims, flops",
    [
        ("aten::mm", [[5, 3], [3, 7]], 2 * 5 * 3 * 7),
        ("aten::addmm", [[7], [5, 3], [3, 7], [], []], 2 * 5 * 3 * 7),
        ("aten::bmm", [[4, 5, 3], [4, 3, 7]], 2 * 4 * 5 * 3 * 7),
        ("aten::_grouped_mm", [[11, 3], [4, 3, 7], [4]], 2 * 11 * 3 * 7),  # rows split into 4 groups
        ("aten::_grouped_mm", [[3, 11], [11, 7], [4]], 2 * 3 * 11 * 7),  # weight gradient: K split
        ("aten::scaled_dot_product_attention", [[2, 4, 5, 8], [2, 4, 6, 8], [2, 4, 6, 8]], 4 * 2 * 4 * 5 * 6 * 8),
        ("aten::_scaled_dot_product_flash_attention_backward", [[2, 4, 5, 8], [2, 4, 5, 8], [2, 4, 6, 8]], 8 * 2 * 4 * 5 * 6 * 8),
        ("aten::mm", [[0, 3], [3, 7]], 0),  # zero rows
        ("aten::relu", [[5, 3]], 0),
    ],
)
def test_shape_flops(name, dims, flops):
    assert _shape_flops(_Event(_op(name, 0, 1, **{"Input Dims": dims}))) == flops


@pytest.mark.parametrize("between", [0, 1, 2], ids=["child", "grandchild", "great_grandchild"])
def test_nested_matmuls_count_once(between):
    """sdpa's inner bmm counts nowhere, directly under it or below ops without FLOPs of their own (as sdpa's math path
    nests aten::_scaled_dot_product_attention_math and aten::matmul around it)."""
    middle = [_op(f"aten::wrapper{i}", 1 + i, 20 - 2 * i) for i in range(between)]
    events = [
        _range(STEP_RANGE, 0, 100),
        _op("aten::scaled_dot_product_attention", 0, 50, **{"Input Dims": [[1, 1, 4, 8], [1, 1, 4, 8], [1, 1, 4, 8]]}),
        *middle,
        _op("aten::bmm", 5, 5, **{"Input Dims": [[1, 4, 8], [1, 8, 4]]}),
    ]
    (step,) = analyze_trace(events)
    assert step.shape_flops["attention"] == 4 * 4 * 4 * 8


def test_table_shares_and_throughput():
    (step,) = analyze_trace([_range(STEP_RANGE, 0, 1000), _range("moe::experts", 0, 500), _range("moe::combine", 500, 250)])
    table = build_table([step], wall_step_s=1000e-6, model_flops={"gemm": 1e9}, bytes_moved={"combine": 1e6})
    rows = {r["category"]: r for r in table["rows"]}
    assert rows["gemm"]["tflops"] == pytest.approx(1e9 / 500e-6 / 1e12)
    assert rows["combine"]["gbps"] == pytest.approx(1e6 / 250e-6 / 1e9)
    assert rows["rest"]["share"] == pytest.approx(0.25)
    assert sum(r["share"] for r in table["rows"]) == pytest.approx(1.0)
    assert table["gap_s"] == pytest.approx(0.0)


@pytest.mark.parametrize("argv, flag", [(["--steps", "0"], "--steps 0"), (["--steps", "-2"], "--steps -2"),
                                        (["--warmup", "-1"], "--warmup -1"), (["--top-ops", "-1"], "--top-ops -1")])
def test_bad_counts_are_refused(argv, flag, capsys, tmp_path):
    assert run_from_args(_args(*argv, "--out", str(tmp_path))) == 2
    err = capsys.readouterr().err
    assert flag in err and "must be an integer >=" in err
    assert not any(tmp_path.iterdir())  # refused before any work
    assert check_counts(1, 0) is None


def test_a_run_that_cannot_be_set_up_is_refused_by_name(capsys, tmp_path):
    bad = tmp_path / "notamodel.pt"
    bad.write_text("not a checkpoint")
    assert run_from_args(_args("--out", str(tmp_path / "out"), "--set", f"finetune.init_from={bad}", *(
        a for o in SMALL for a in ("--set", o)))) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-engine profile: error: ") and "notamodel.pt: not a moe_engine checkpoint" in err


def test_attention_modules_are_the_outermost():
    class InnerAttention(torch.nn.Module):
        pass

    class OuterAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = InnerAttention()

    model = torch.nn.Sequential(OuterAttention(), torch.nn.Linear(2, 2), InnerAttention())
    assert [type(m).__name__ for m in _attention_modules(model)] == ["OuterAttention", "InnerAttention"]
    assert _attention_modules(model)[1] is model[2]


class _TinyAttention(torch.nn.Module):
    def __init__(self, d_model):
        super().__init__()
        self.proj = torch.nn.Linear(d_model, d_model)

    def forward(self, x):
        return self.proj(x)


class _TinyMoEModel(torch.nn.Module):
    """Attention then one MoE layer, with the `routers` and `moe_layers` the observer reads."""

    def __init__(self, d_model, moe_cfg):
        super().__init__()
        self.attn = _TinyAttention(d_model)
        self.moe = MoELayer.from_config(d_model, moe_cfg)

    @property
    def routers(self):
        return [self.moe.router]

    @property
    def moe_layers(self):
        return [self.moe]

    def forward(self, x_TD):
        out = self.moe(self.attn(x_TD))
        return out.y.square().mean() + out.aux_loss


@pytest.mark.parametrize("num_tokens, activation", [(7, "swiglu"), (1, "gelu")])
def test_observer_ranges_counts_flops_and_bytes(num_tokens, activation, tmp_path):
    torch.manual_seed(0)
    D, F, E, K = 16, 8, 4, 2
    model = _TinyMoEModel(D, MoEConfig(num_experts=E, ffn_hidden=F, activation=activation))
    observer = _StepObserver(model)
    x_TD = torch.randn(num_tokens, D)
    with torch.profiler.profile(record_shapes=True) as prof:
        with torch.profiler.record_function(STEP_RANGE):
            model(x_TD).backward()
    observer.remove()
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    (step,) = analyze_trace(json.loads((tmp_path / "trace.json").read_text())["traceEvents"])
    for category in ("router", "permute", "gemm", "combine", "attention"):
        assert step.category_us[category] > 0, category
    counts_E = observer.tokens_per_expert()
    assert counts_E.shape == (1, E) and counts_E.sum() == num_tokens * K
    width_in = 2 * F if activation == "swiglu" else F
    assert observer.gemm_flops() == 6.0 * num_tokens * K * D * (width_in + F)
    # The backward GEMMs (autograd nodes, matched to their forward op by sequence number) land in gemm too.
    assert step.shape_flops["gemm"] == observer.gemm_flops()
    assert observer.bytes_moved() == {"permute": (3 * num_tokens * K + num_tokens) * D * 4,
                                      "combine": (3 * num_tokens * K + 2 * num_tokens) * D * 4}
    # Removed hooks open no more ranges.
    with torch.profiler.profile() as prof:
        model(x_TD)
    assert "moe::attention" not in {e.name for e in prof.events()}


def test_observer_counts_a_checkpointed_forward_once_and_recomputed_experts_flops():
    """Activation checkpointing runs the layer's forward again in the backward: its hooks fire
    twice, but the step routed and computed its tokens once. moe.recompute_experts runs the
    up-projection again: 2 * rows * D * H more FLOPs."""
    torch.manual_seed(1)
    D, F, E, K, T = 16, 8, 4, 2, 9
    for recompute in (False, True):
        model = _TinyMoEModel(D, MoEConfig(num_experts=E, ffn_hidden=F, recompute_experts=recompute))
        observer = _StepObserver(model)
        torch.utils.checkpoint.checkpoint(model, torch.randn(T, D), use_reentrant=False).backward()
        observer.remove()
        assert observer.tokens_per_expert().sum() == T * K and len(observer.layer_calls[0]) == 1
        assert observer.gemm_flops() == T * K * D * (6.0 * (2 * F + F) + (2.0 * 2 * F if recompute else 0.0))


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """One profile run shared by the tests below: (out folder, what it printed, its progress lines)."""
    out = tmp_path_factory.mktemp("profile")
    argv = ["--steps", "2", "--warmup", "1", "--out", str(out)]
    for override in SMALL:
        argv += ["--set", override]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        assert run_from_args(_args(*argv)) == 0
    return out, stdout.getvalue(), stderr.getvalue()


def test_profile_writes_a_valid_trace(profiled):
    out, _, _ = profiled
    trace = json.loads((out / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert STEP_RANGE in names and "moe::router" in names and "moe::experts" in names


def test_profile_table_adds_up_to_the_step(profiled):
    out, _, _ = profiled
    report = json.loads((out / "profile.json").read_text())
    table = report["table"]
    rows = {r["category"]: r for r in table["rows"]}
    for category in ("router", "permute", "gemm", "combine", "attention", "optimizer", "rest"):
        assert rows[category]["seconds_per_step"] > 0, category
    assert sum(r["share"] for r in table["rows"]) == pytest.approx(1.0, abs=0.05)
    assert abs(table["categories_sum_s"] - table["wall_step_s"]) <= 0.1 * table["wall_step_s"]
    assert table["wall_step_s"] == pytest.approx(sum(report["step_seconds"]) / 2)
    # The expert GEMMs' FLOPs from tokens_per_expert equal those read from the ops' shapes.
    assert rows["gemm"]["flops_per_step"] == pytest.approx(rows["gemm"]["shape_flops_per_step"])
    assert rows["gemm"]["tflops"] > 0 and rows["permute"]["gbps"] > 0 and rows["combine"]["gbps"] > 0


def test_profile_counts_every_routed_token(profiled):
    out, _, _ = profiled
    report = json.loads((out / "profile.json").read_text())
    (counts_E,) = report["tokens_per_expert"]  # num_layers=2, moe_every=2: one MoE layer
    tokens_per_step = 16 * 25  # batch 16, 24 patches + the task token
    assert len(counts_E) == 8 and sum(counts_E) == 2 * tokens_per_step * 2  # 2 steps, top-2
    assert report["imbalance"][0] == pytest.approx(max(counts_E) / (sum(counts_E) / 8))
    for name in ("expert_load.png", "imbalance.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_reports_the_bytes_permute_and_combine_move_per_step(profiled):
    """bytes_per_step is one step's share of what the observer counted over the profiled steps:
    (3N + T) * D and (3N + 2T) * D fp32 elements, N = T * K kept choices (dropless)."""
    out, _, _ = profiled
    report = json.loads((out / "profile.json").read_text())
    rows = {r["category"]: r for r in report["table"]["rows"]}
    T, K, D = 16 * 25, 2, 32  # batch 16 of 24 patches + the task token; top-2; model.d_model
    assert report["steps"] == 2
    assert rows["permute"]["bytes_per_step"] == (3 * T * K + T) * D * 4
    assert rows["combine"]["bytes_per_step"] == (3 * T * K + 2 * T) * D * 4


def test_unprofiled_step_time_leaves_out_the_first_warm_up_step(tmp_path, monkeypatch):
    """The first warm-up step pays for allocations and compilation: the step time without the
    profiler is the mean of the later warm-up steps (scripted here), and the profiled steps'
    times are reported as measured."""
    import moe_engine.profiling as profiling
    from moe_engine.config import load_config

    real_step = profiling._timed_step
    scripted = iter([9.0, 0.25, 0.75, 0.6])  # 3 warm-up steps, then the profiled one

    def timed_step(trainer, scope=None):
        return next(scripted), real_step(trainer, scope)[1]

    monkeypatch.setattr(profiling, "_timed_step", timed_step)
    cfg = load_config(None, [*SMALL, f"train.out_dir={tmp_path / 'run'}"])
    result = profiling.profile_training(cfg, steps=1, warmup=3, out_dir=tmp_path, log=lambda line: None)
    assert result.unprofiled_step_s == pytest.approx(0.5)
    assert result.step_seconds == [0.6] and result.table["wall_step_s"] == pytest.approx(0.6)
    assert json.loads((tmp_path / "profile.json").read_text())["unprofiled_step_s"] == pytest.approx(0.5)


def test_profile_prints_the_table_and_progress(profiled):
    _, printed, progress = profiled
    for label in ("router", "permute (dispatch)", "grouped GEMMs (expert MLPs)", "combine / unpermute", "attention",
                  "optimizer", "sum of categories", "measured step time (wall)", "gap (wall - sum)", "expert_load.png"):
        assert label in printed
    assert "warm-up step 1/1" in progress and "profiled step 2/2" in progress


@pytest.mark.gpu
def test_profile_on_cuda_attributes_device_time(tmp_path):
    argv = ["--steps", "3", "--warmup", "2", "--out", str(tmp_path)]
    for override in [o for o in SMALL if not o.startswith("train.device")] + ["train.device=cuda"]:
        argv += ["--set", override]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert run_from_args(_args(*argv)) == 0
    report = json.loads((tmp_path / "profile.json").read_text())
    table = report["table"]
    rows = {r["category"]: r for r in table["rows"]}
    assert report["timeline"].startswith("device time")
    for category in ("router", "permute", "gemm", "combine", "optimizer", "idle"):
        assert rows[category]["seconds_per_step"] > 0, category
    assert abs(table["categories_sum_s"] - table["wall_step_s"]) <= 0.1 * table["wall_step_s"]
    assert rows["gemm"]["tflops"] > 0
    print(stdout.getvalue())
