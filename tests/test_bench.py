"""Tests of `moe-engine bench`: the quick run through the CLI, and the checks that make its numbers mean something.

The quick run happens once, in this process (module fixture), as `moe_engine.cli.main` runs it;
the tests read its JSON. The agreement helper and the per-path error handling are unit-tested on
their own with outputs that are wrong on purpose.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
import torch

from moe_engine import cli
from moe_engine.bench.common import BenchOptions, TimingSettings, compare
from moe_engine.bench.layer import run_path
from moe_engine.bench.peers import PEERS, PeerEnv, PeerRun, PeerSkipped, build_torch_loop
from moe_engine.bench.problem import QUICK_SHAPES, Shape, compute_reference, make_problem

CPU = torch.device("cpu")
TINY = Shape("tiny", 96, 32, 32, 4, 2, "float32")


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, dict]:
    out = tmp_path_factory.mktemp("bench") / "r.json"
    threads = torch.get_num_threads()
    code = cli.main(["bench", "--quick", "--out", str(out)])
    # --quick benchmarks with one CPU thread and must give the caller's setting back.
    assert torch.get_num_threads() == threads
    return code, out, json.loads(out.read_text())


def test_quick_run_writes_json_and_png(quick) -> None:
    code, out, report = quick
    assert code == 0
    assert report["complete"] is True
    png = out.with_suffix(".png")
    assert report["plot"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_run_leaves_no_process_group(quick) -> None:
    # The run set up a 1-process gloo group for DeepSpeed and megatron-core; it must tear it down.
    assert not torch.distributed.is_initialized()


def test_report_names_device_versions_date_and_backend(quick) -> None:
    _, _, report = quick
    assert report["schema"] == "moe_engine.bench/1"
    assert report["device"]["type"] == "cpu" and report["device"]["name"]
    assert set(report["versions"]) >= {"torch", "triton", "deepspeed", "megatron_core", "python"}
    assert report["versions"]["torch"] == torch.__version__
    assert dt.datetime.fromisoformat(report["date"]).tzinfo is not None
    assert report["kernels"]["backend"] in ("torch", "triton")
    # Each Triton kernel's autotune pick (here, under the interpreter, its one candidate) and its pin.
    assert report["autotune"]["grouped_gemm"]["chosen"][0]["pin"].startswith("MOE_ENGINE_GROUPED_GEMM_CONFIG=BLOCK_M=")
    assert report["copy_bandwidth_gbps"] > 0
    assert report["settings"]["shapes"] == [s.name for s in QUICK_SHAPES]


def test_every_layer_path_is_timed_and_agrees_or_says_why(quick) -> None:
    _, _, report = quick
    assert [r["shape"] for r in report["layer"]] == [s.name for s in QUICK_SHAPES]
    for shape, record in zip(QUICK_SHAPES, report["layer"]):
        assert {"T", "D", "F", "E", "K", "dtype", "routing", "flops_fwd", "flops_fwd_bwd", "load"} <= set(record)
        assert [record[k] for k in ("T", "D", "F", "E", "K", "dtype")] == [shape.T, shape.D, shape.F, shape.E, shape.K,
                                                                             shape.dtype]
        assert record["flops_fwd_bwd"] == 18 * record["T"] * record["K"] * record["D"] * record["F"]
        ours = record["paths"]["ours"]
        assert list(record["paths"]) == list(PEERS)
        for name, entry in record["paths"].items():
            where = f"{record['shape']}/{name}: {entry}"
            assert entry["status"] in ("ok", "skipped"), where
            if entry["status"] == "skipped":
                assert entry["skip_reason"], where
                continue
            assert entry["fwd_ms"] > 0 and entry["fwd_bwd_ms"] > 0, where
            assert entry["fwd_tflops"] > 0 and entry["fwd_bwd_tflops"] > 0, where
            # TFLOP/s: each measurement's own FLOPs over its own median (ms) / 1e9.
            assert entry["fwd_tflops"] == pytest.approx(record["flops_fwd"] / entry["fwd_ms"] / 1e9), where
            assert entry["fwd_bwd_tflops"] == pytest.approx(record["flops_fwd_bwd"] / entry["fwd_bwd_ms"] / 1e9), where
            assert entry["peak_mem_bytes"] is None, where  # CPU: no peak memory counter
            agreement = entry["agreement"]
            assert agreement["ok"], where
            for output in ("y", "dx"):
                assert agreement[output]["max_rel"] <= agreement[output]["tol"] == record["tolerance"], where
            if name != "ours":
                # Peer time / ours: above 1 when ours is faster.
                for key in ("fwd", "fwd_bwd"):
                    assert record["ours_speedup"][name][key] == pytest.approx(entry[f"{key}_ms"] / ours[f"{key}_ms"]), where


def test_expected_paths_run_on_cpu(quick) -> None:
    _, _, report = quick
    by_shape = {r["shape"]: r["paths"] for r in report["layer"]}
    for paths in by_shape.values():
        for name in ("ours", "ours_recompute", "torch_loop", "deepspeed", "deepspeed_dropless"):
            assert paths[name]["status"] == "ok", paths[name]
        assert paths["megatron"]["skip_reason"].startswith("needs CUDA")
        assert paths["deepspeed"]["notes"]["drops_tokens"] is True
        assert 0 <= paths["deepspeed"]["notes"]["dropped_fraction"] < 1
    # F = 50 fp32 rows are 200 bytes: torch._grouped_mm cannot take them, and says so.
    assert "16 bytes" in by_shape["quick_e7"]["grouped_mm"]["skip_reason"]
    assert by_shape["quick_e8"]["grouped_mm"]["status"] == "ok"


def test_micro_benchmarks_report_bandwidth(quick) -> None:
    _, _, report = quick
    for kind, ops in (("router", {"router", "topk_gating"}), ("permute", {"expert_order", "permute", "unpermute"})):
        assert len(report[kind]) == len(QUICK_SHAPES)
        for record in report[kind]:
            assert set(record["ops"]) == ops
            if kind == "router":
                # Useful bytes: x and W read (in the dtype), fp32 weights and int64 experts written; the
                # gating alone reads fp32 logits instead.
                T, D, E, K = record["T"], record["D"], record["E"], record["K"]
                elt = torch.finfo(getattr(torch, record["dtype"])).bits // 8
                assert record["ops"]["router"]["bytes"] == (T * D + E * D) * elt + T * K * (4 + 8)
                assert record["ops"]["topk_gating"]["bytes"] == T * E * 4 + T * K * (4 + 8)
            for op, op_record in record["ops"].items():
                assert op_record["bytes"] > 0
                ours = op_record["paths"]["ours"]
                for name, entry in op_record["paths"].items():
                    where = f"{kind}/{record['shape']}/{op}/{name}: {entry}"
                    assert entry["status"] in ("ok", "skipped"), where
                    if entry["status"] == "ok":
                        assert entry["gbps"] > 0 and entry["agreement"]["ok"], where
                        assert entry["gbps"] == pytest.approx(op_record["bytes"] / entry["fwd_ms"] / 1e6), where
                        assert entry["copy_bw_fraction"] == pytest.approx(entry["gbps"] / report["copy_bandwidth_gbps"]), where
                        if name != "ours" and ours["fwd_ms"]:
                            assert op_record["ours_speedup"][name] == pytest.approx(entry["fwd_ms"] / ours["fwd_ms"]), where


# ------------------------------------------------------------------- the agreement helper


def test_compare_accepts_rounding_and_rejects_a_perturbed_element() -> None:
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(64, 16, generator=gen)
    close = compare(ref + 1e-7 * torch.randn(64, 16, generator=gen), ref, tol=1e-4)
    assert close.ok and close.max_rel < 1e-4 and close.compared_rows == 64

    wrong = ref.clone()
    wrong[3, 5] += 0.1 * ref.abs().max()
    result = compare(wrong, ref, tol=2e-2)
    assert not result.ok
    assert result.max_rel == pytest.approx(0.1, rel=1e-3)

    keep = torch.ones(64, dtype=torch.bool)
    keep[3] = False  # the row a near tie would exclude
    excluded = compare(wrong, ref, tol=2e-2, keep_T=keep)
    assert excluded.ok and excluded.excluded_rows == 1 and excluded.compared_rows == 63


def test_compare_rejects_nan_and_wrong_shape() -> None:
    ref = torch.ones(8, 4)
    bad = ref.clone()
    bad[0, 0] = float("nan")
    assert not compare(bad, ref, tol=1.0).ok
    assert compare(bad, ref, tol=1.0).max_abs is None
    assert not compare(ref[:, :3], ref, tol=1.0).ok


# ------------------------------------------------------------------- one path at a time


@pytest.fixture(scope="module")
def case():
    problem = make_problem(TINY, "balanced", CPU, seed=1)
    opts = BenchOptions(CPU, (TINY,), ("balanced",), ("torch_loop",), TimingSettings(warmup=1, reps=1))
    return problem, compute_reference(problem), PeerEnv(CPU), opts


def test_a_correct_peer_is_timed(case) -> None:
    entry = run_path(build_torch_loop, *case)
    assert entry["status"] == "ok" and entry["fwd_ms"] > 0 and entry["agreement"]["ok"]


def test_a_peer_that_disagrees_is_not_timed(case) -> None:
    def off_by_five_percent(problem, env) -> PeerRun:
        run = build_torch_loop(problem, env)
        return PeerRun(lambda: run.forward() * 1.05, run.params)

    entry = run_path(off_by_five_percent, *case)
    assert entry["status"] == "disagrees"
    assert entry["fwd_ms"] is None and entry["fwd_bwd_ms"] is None
    assert not entry["agreement"]["y"]["ok"] and entry["agreement"]["y"]["max_rel"] == pytest.approx(0.05, rel=0.05)


def test_a_failing_or_skipped_peer_is_recorded_not_raised(case) -> None:
    def broken(problem, env):
        raise RuntimeError("boom")

    def absent(problem, env):
        raise PeerSkipped("not installed")

    failed = run_path(broken, *case)
    assert failed["status"] == "error" and "RuntimeError: boom" in failed["error"]
    skipped = run_path(absent, *case)
    assert skipped["status"] == "skipped" and skipped["skip_reason"] == "not installed"


def test_skewed_routing_makes_expert_0_hot() -> None:
    shape = Shape("skew", 2048, 64, 16, 16, 2, "float32")
    balanced = compute_reference(make_problem(shape, "balanced", CPU)).tokens_per_expert_E
    skewed = compute_reference(make_problem(shape, "skewed", CPU)).tokens_per_expert_E
    assert balanced.max() / balanced.float().mean() < 2
    assert int(skewed.argmax()) == 0 and skewed.max() / skewed.float().mean() > 3


def test_bad_arguments_exit_2_naming_the_flag(tmp_path, capsys) -> None:
    assert cli.main(["bench", "--quick", "--shapes", "mixtral,nope", "--out", str(tmp_path / "r.json")]) == 2
    assert "--shapes" in capsys.readouterr().err
    assert cli.main(["bench", "--quick", "--routing", "zipf", "--out", str(tmp_path / "r.json")]) == 2
    assert "--routing" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_dispatch_overhead_script_times_both_dispatchers(tmp_path) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "dispatch.json"
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "dispatch_overhead.py"), str(out), "--device", "cpu",
         "--shapes", "tiny", "--reps", "1"],
        cwd=root, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert {r["dispatcher"] for r in report["results"]} == {"local", "all_to_all"}
    for record in report["results"]:
        assert record["layer_ms"] > 0 and record["dispatch_ms"] > 0
        assert record["dispatch_share"] == record["dispatch_ms"] / record["layer_ms"]
    assert report["device"] and report["versions"]["torch"] and report["date"] and report["complete"] is True


def test_saved_activations_of_ours_are_h_and_routing_metadata_only(tmp_path) -> None:
    # Traced under FakeTensorMode: any shape, no compute. Ours keeps the pre-activation h (N, 2F) and
    # the routing's small tensors; the grouped_mm peer keeps at least the permuted copy of x besides.
    from moe_engine.bench.saved import main, measure

    shape = Shape("saved_check", 1000, 96, 40, 6, 3, "bfloat16")
    N = shape.T * shape.K
    ours, peer = measure(shape, "ours"), measure(shape, "grouped_mm")
    h_bytes = N * 2 * shape.F * 2
    routing_bytes = shape.T * (shape.E * 4 + 4) + shape.T * shape.K * (8 + 4) + N * 8  # scores, lse, ids, weights, rows
    assert h_bytes <= ours["bytes"] <= h_bytes + routing_bytes + 1024
    assert peer["bytes"] >= ours["bytes"] + N * shape.D * 2
    # moe.recompute_experts: the routing's tensors only (the backward recomputes h).
    assert measure(shape, "ours_recompute")["bytes"] == ours["bytes"] - h_bytes
    out = tmp_path / "saved.json"
    assert main(["--shapes", "sonicmoe", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["shape"] == "sonicmoe" and row["ours_recompute_bytes"] < row["ours_bytes"] < row["grouped_mm_bytes"]
    assert row["ours_over_grouped_mm"] == pytest.approx(row["ours_bytes"] / row["grouped_mm_bytes"])
    with pytest.raises(ValueError, match="path = 'loop'"):
        measure(shape, "loop")


def test_a_failing_plot_keeps_the_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A GPU image without matplotlib, say: the JSON is written before the plot, and the error recorded.
    import moe_engine.bench.layer as layer_bench
    import moe_engine.bench.suite as suite

    def fake_run(opts, copy_bandwidth, records, save):
        records.append({"shape": "fake", "paths": {}})
        save()

    def no_matplotlib(*args, **kwargs):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(layer_bench, "run", fake_run)
    monkeypatch.setattr(suite, "plot_layer_tflops", no_matplotlib)
    out = tmp_path / "r.json"
    assert cli.main(["bench", "--quick", "--only", "layer", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["complete"] is True and report["layer"] == [{"shape": "fake", "paths": {}}]
    assert report["plot"] is None and report["plot_error"] == "ImportError: No module named 'matplotlib'"
    assert not list(tmp_path.glob("*.tmp"))


def test_a_peer_with_a_wrong_weight_gradient_is_not_timed(case) -> None:
    # y and dx right, but one checked expert's w_out gets no gradient: the timed fwd+bwd would skip
    # work, so it must be caught before it is timed.
    frozen = case[1].checked_experts[-1]

    def frozen_expert(problem, env) -> PeerRun:
        from moe_engine.bench.problem import loop_moe_forward

        w_out = problem.w_out_EDF
        weights = (problem.router_weight_ED, problem.w_in_EHD, w_out)

        def forward() -> torch.Tensor:
            w_out_list = [w.detach() if e == frozen else w for e, w in enumerate(w_out.unbind(0))]
            return loop_moe_forward(problem.x_TD, problem.router_weight_ED, problem.w_in_EHD, w_out_list, problem.shape.K)

        return PeerRun(forward, list(weights), problem_weights=weights)

    assert case[1].tokens_per_expert_E[frozen] > 0
    entry = run_path(frozen_expert, *case)
    agreement = entry["agreement"]
    assert agreement["y"]["ok"] and agreement["dx"]["ok"]
    assert agreement["weight_grads"]["router_weight_ED"]["ok"] and agreement["weight_grads"]["w_in_EHD"]["ok"]
    assert not agreement["weight_grads"]["w_out_EDF"]["ok"]
    assert entry["status"] == "disagrees" and entry["fwd_bwd_ms"] is None
    # The honest loop's weight gradients agree, the router's included.
    honest = run_path(build_torch_loop, *case)["agreement"]["weight_grads"]
    assert all(honest[name]["ok"] and honest[name]["max_rel"] < 1e-5 for name in ("router_weight_ED", "w_in_EHD", "w_out_EDF"))


def test_weight_gradients_are_checked_on_the_busiest_and_the_idlest_expert() -> None:
    from moe_engine.bench.problem import checked_experts

    assert checked_experts(torch.tensor([5, 9, 0, 3, 4])) == (1, 2)
    assert checked_experts(torch.tensor([1, 2, 3, 4, 5, 6])) == (0, 3, 5)
    problem = make_problem(TINY, "skewed", CPU, seed=1)
    reference = compute_reference(problem)
    counts = reference.tokens_per_expert_E
    assert int(counts.argmax()) in reference.checked_experts and int(counts.argmin()) in reference.checked_experts
    # The reference's expert gradients are those of the full fp32 loop on those experts.
    x = problem.x_TD.detach().float().requires_grad_(True)
    weights = [t.detach().float().requires_grad_(True) for t in (problem.router_weight_ED, problem.w_in_EHD, problem.w_out_EDF)]
    from moe_engine.bench.problem import loop_moe_forward

    y = loop_moe_forward(x, *weights, TINY.K)
    d_router, d_in, d_out = torch.autograd.grad(y, weights, problem.grad_y_TD.float())
    checked = list(reference.checked_experts)
    torch.testing.assert_close(reference.grads["router_weight_ED"], d_router)
    torch.testing.assert_close(reference.grads["w_in_EHD"], d_in[checked])
    torch.testing.assert_close(reference.grads["w_out_EDF"], d_out[checked])


def test_grouped_mm_peer_combines_without_an_fp32_copy_of_the_rows() -> None:
    # A lean torch layer combines in bf16 (fp32 accumulation inside the batched matmul); an fp32 copy of
    # the N expert-output rows would make the peer slower and its saved activations larger than it need be.
    from moe_engine.bench.peers import grouped_mm_moe_forward
    from moe_engine.bench.problem import weighted_combine
    from moe_engine.kernels.torch_grouped_mm import grouped_mm_unsupported_reason

    shape = Shape("lean", 64, 32, 16, 4, 2, "bfloat16")
    problem = make_problem(shape, "balanced", CPU, seed=2)
    N = shape.T * shape.K
    # The combine: the fp32 per-token weighted sum, in the rows' dtype.
    order = torch.randperm(N)
    rows = torch.randn(N, shape.D)
    weights = torch.rand(shape.T, shape.K)
    want = torch.zeros(shape.T, shape.D).index_add(0, order // shape.K, rows * weights.reshape(-1)[order, None])
    torch.testing.assert_close(weighted_combine(rows, order, weights), want, rtol=1e-5, atol=1e-5)
    if grouped_mm_unsupported_reason(CPU, torch.bfloat16, (shape.D, shape.F, 2 * shape.F)) is not None:
        pytest.skip("torch._grouped_mm does not take bf16 on this CPU build")
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        grouped_mm_moe_forward(problem.x_TD, problem.router_weight_ED, problem.w_in_EHD, problem.w_out_EDF, shape.K)
    big_fp32 = [tuple(t.shape) for t in saved if t.dtype == torch.float32 and t.dim() == 2 and t.shape[0] >= N]
    assert big_fp32 == []


def test_router_paths_time_the_gating_alone_and_compare_by_expert() -> None:
    # Sorting each token's choices by expert is for the comparison: inside run() it would be timed on
    # both sides and pull ours' ratio towards 1.
    from moe_engine.bench.micro import run_micro_path
    from moe_engine.bench.router import router_paths

    shape = Shape("gate", 64, 32, 16, 8, 3, "float32")
    problem = make_problem(shape, "balanced", CPU, seed=3, with_experts=False)
    for name, build in router_paths(problem).items():
        path = build()
        out = path.run()
        assert path.canonical is not None
        # Top-k order (largest weight first), not expert order: nothing after the gating ran.
        assert bool((out["weights_TK"][:, :-1] >= out["weights_TK"][:, 1:]).all()), name
        by_expert = path.canonical(out)["experts_TK"]
        assert bool((by_expert[:, :-1] < by_expert[:, 1:]).all()), name
    from moe_engine.bench.router import _by_expert
    from moe_engine.bench.problem import softmax_topk

    reference = _by_expert(*softmax_topk(problem.x_TD.detach(), problem.router_weight_ED.detach(), shape.K))
    entry = run_micro_path(router_paths(problem)["torch"], reference, None, 1, 0.0,
                           BenchOptions(CPU, (shape,), ("balanced",), (), TimingSettings(warmup=1, reps=2)))
    assert entry["status"] == "ok" and entry["agreement"]["ok"] and entry["timed_runs"] == {"fwd": 2, "fwd_bwd": 2}


def test_a_plot_cut_short_keeps_the_previous_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A time limit can kill the run while the PNG is written: the previous plot must survive whole.
    from matplotlib.figure import Figure

    from moe_engine.bench.common import plot_layer_tflops

    records = [{"shape": "s", "dtype": "bfloat16", "routing": "balanced",
                "paths": {"ours": {"fwd_bwd_tflops": 1.0, "notes": {}}}}]
    png = tmp_path / "bench.png"
    plot_layer_tflops(records, "first", png)
    first = png.read_bytes()
    assert first[:8] == b"\x89PNG\r\n\x1a\n"

    def killed(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", killed)
    with pytest.raises(KeyboardInterrupt):
        plot_layer_tflops(records, "second", png)
    assert png.read_bytes() == first
