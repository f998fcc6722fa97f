"""Unit tests of the numbers `moe-engine bench` reports and of the checks that guard them.

Each test feeds a benchmark helper inputs whose right answer is known by hand (a FLOP count, a ratio,
a near tie, an output wrong in one element, a timer whose first call or L2 flush is slow) so a
wrong count, an inverted ratio or a check that lets a wrong output through fails here, on CPU, in
well under a second, without the quick run of tests/test_bench.py.
"""

from __future__ import annotations

import time

import pytest
import torch

import moe_engine.bench.common as common
import moe_engine.bench.layer as layer_bench
import moe_engine.bench.micro as micro
from moe_engine.bench.common import BenchOptions, Timing, TimingSettings, compare
from moe_engine.bench.layer import run_path, speedups, time_path, weight_grad_agreement
from moe_engine.bench.peers import PeerEnv, PeerRun, build_torch_loop
from moe_engine.bench.problem import (
    Reference,
    Shape,
    compute_reference,
    expected_drop_fraction,
    find_shapes,
    loop_moe_forward,
    make_problem,
    near_tie_keep_mask,
)

CPU = torch.device("cpu")
TINY = Shape("tiny", 96, 32, 32, 4, 2, "float32")


def _opts(shape: Shape = TINY, **timing) -> BenchOptions:
    return BenchOptions(CPU, (shape,), ("balanced",), ("torch_loop",), TimingSettings(**{"warmup": 1, "reps": 1, **timing}))


# ------------------------------------------------------------------- counts and units


def test_flops_and_units_of_a_T6_D5_F3_K2_layer() -> None:
    """6*T*K*D*F forward (gate, up and down projections), 3x that fwd+bwd; TFLOP/s and GB/s in SI units."""
    shape = Shape("s", 6, 5, 3, 4, 2)
    assert shape.flops_fwd == 6 * 6 * 2 * 5 * 3
    assert shape.flops_fwd_bwd == 18 * 6 * 2 * 5 * 3
    assert common.tflops(10**12, 1000.0) == pytest.approx(1.0)  # 1e12 FLOP in one second
    assert common.tflops(10**12, None) is None and common.tflops(10**12, 0.0) is None
    assert common.gbps(10**9, 1000.0) == pytest.approx(1.0)  # 1e9 bytes in one second


def test_copy_bandwidth_counts_bytes_read_and_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy of n bytes moves 2n (read + written): 4 MB copied in 1 ms is 8 GB/s."""
    monkeypatch.setattr(common, "measure", lambda fn, device, settings: Timing(1.0, 1.0, 1.0, 1))
    assert common.copy_bandwidth_gbps(CPU, TimingSettings(), 4 * 10**6) == pytest.approx(8.0)


@pytest.mark.parametrize("name, min_reps", [("ours", 10), ("torch_loop", 3), ("deepspeed", 3)])
def test_time_path_times_fwd_and_fwd_bwd_through_every_weight(monkeypatch: pytest.MonkeyPatch, name: str,
                                                             min_reps: int) -> None:
    """fwd_ms is the forward's time and fwd_bwd_ms the forward+backward's, each divided into its own FLOPs;
    the backward differentiates x and every parameter (a weight left out would time less work); the
    loop-like peers take at most LOOP_MIN_REPS timed runs, the others --min-reps."""
    problem = make_problem(TINY, "balanced", CPU, seed=1)
    run = build_torch_loop(problem, PeerEnv(CPU))
    reached: set[int] = set()
    for i, t in enumerate([problem.x_TD, *run.params]):
        t.register_hook(lambda g, i=i: reached.add(i))
    seen_settings = []

    def fake_measure(fn, device, settings):
        seen_settings.append(settings)
        reached.clear()
        fn()
        # 2 ms when nothing was differentiated, 6 ms when x and all weights were.
        if not reached:
            return Timing(2.0, 1.5, 2.5, 7)
        assert reached == set(range(1 + len(run.params)))
        return Timing(6.0, 5.0, 7.0, 9)

    monkeypatch.setattr(layer_bench, "measure", fake_measure)
    entry = layer_bench.empty_entry()
    time_path(run, problem, _opts(min_reps=10), entry, name)
    assert entry["fwd_ms"] == 2.0 and entry["fwd_bwd_ms"] == 6.0
    assert entry["fwd_ms_p20_p80"] == [1.5, 2.5] and entry["fwd_bwd_ms_p20_p80"] == [5.0, 7.0]
    assert entry["timed_runs"] == {"fwd": 7, "fwd_bwd": 9}
    assert entry["fwd_tflops"] == pytest.approx(TINY.flops_fwd / 2.0 / 1e9)
    assert entry["fwd_bwd_tflops"] == pytest.approx(TINY.flops_fwd_bwd / 6.0 / 1e9)
    assert [s.min_reps for s in seen_settings] == [min_reps, min_reps]


def test_speedups_are_peer_time_over_ours() -> None:
    """Above 1 means ours is faster; a peer or ours without a time gets None."""
    paths = {
        "ours": {"fwd_ms": 1.0, "fwd_bwd_ms": 2.0},
        "slow_peer": {"fwd_ms": 3.0, "fwd_bwd_ms": 8.0},
        "skipped": {"fwd_ms": None, "fwd_bwd_ms": None},
    }
    assert speedups(paths) == {"slow_peer": {"fwd": 3.0, "fwd_bwd": 4.0}, "skipped": {"fwd": None, "fwd_bwd": None}}
    assert speedups({"ours": {"fwd_ms": None, "fwd_bwd_ms": None}, "p": {"fwd_ms": 1.0, "fwd_bwd_ms": 1.0}}) == {
        "p": {"fwd": None, "fwd_bwd": None}}


def test_micro_gbps_copy_fraction_and_ratio(monkeypatch: pytest.MonkeyPatch) -> None:
    """GB/s = useful bytes / fwd median; of copy bw = that / the device's copy GB/s; ours x = peer / ours."""
    monkeypatch.setattr(micro, "measure", lambda fn, device, settings: Timing(2.0, 2.0, 2.0, 1))
    x = torch.arange(6.0)
    path = lambda: micro.MicroPath(lambda: {"x": x.clone()})  # noqa: E731
    entry = micro.run_micro_path(path, {"x": x}, None, 4 * 10**6, 8.0, _opts())
    assert entry["status"] == "ok" and entry["fwd_ms"] == 2.0
    assert entry["gbps"] == pytest.approx(2.0) and entry["copy_bw_fraction"] == pytest.approx(0.25)

    fwd_ms = {"ours": 2.0, "torch": 5.0, "other": None}
    monkeypatch.setattr(micro, "run_micro_path", lambda build, *args: {"fwd_ms": fwd_ms[build]})
    record = micro.run_op({n: n for n in fwd_ms}, {}, None, 1, 1.0, _opts(), "bytes")
    assert record["ours_speedup"] == {"torch": 2.5, "other": None}


def test_expected_drop_fraction_of_E4_K2_counts() -> None:
    """capacity = ceil(cf * T * K / E): T=4, K=2, E=4 gives 2 a expert; [6, 2, 0, 0] drops 4 of 8 choices."""
    counts = torch.tensor([6, 2, 0, 0])
    assert expected_drop_fraction(counts, 4, 2, 1.0) == pytest.approx(0.5)
    assert expected_drop_fraction(counts, 4, 2, 2.0) == pytest.approx(2 / 8)  # capacity 4
    assert expected_drop_fraction(torch.tensor([2, 2, 2, 2]), 4, 2, 1.0) == 0.0


def test_find_shapes_dtype_override_keeps_names_and_sizes() -> None:
    """--dtype replaces every shape's dtype (and nothing else); an unknown one names the flag."""
    shapes = find_shapes("quick_e7,mixtral", quick=True, dtype="float16")
    assert [(s.name, s.T, s.D, s.F, s.E, s.K, s.dtype) for s in shapes] == [
        ("quick_e7", 250, 64, 50, 7, 2, "float16"), ("mixtral", 8192, 4096, 14336, 8, 2, "float16")]
    assert shapes[0].torch_dtype == torch.float16
    with pytest.raises(ValueError, match="--dtype"):
        find_shapes(None, quick=True, dtype="int8")


# ------------------------------------------------------------------- timing


def test_summary_is_median_and_20th_80th_percentiles() -> None:
    timing = common._summary([5.0, 1.0, 3.0, 2.0, 4.0])
    assert timing == Timing(3.0, 2.0, 4.0, 5)


def test_cpu_timer_never_times_the_warm_up_call() -> None:
    """The first call (compiles, allocates) is slow; none of the timed ones may include it."""
    calls = []

    def fn() -> None:
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.1)

    timing = common.measure(fn, CPU, TimingSettings(warmup=1, reps=3))
    assert len(calls) == 4 and timing.reps == 3
    assert timing.p80_ms < 50


class ClockEvent:
    """torch.cuda.Event played by the CPU clock (the CUDA timer's logic, tested without a GPU)."""

    def __init__(self, enable_timing: bool = False) -> None:
        self.t = None

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: "ClockEvent") -> float:
        return (end.t - self.t) * 1e3


@pytest.fixture
def cuda_events_on_the_cpu_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "Event", ClockEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)


def test_cuda_timer_flushes_l2_before_each_timed_run_outside_the_timing(monkeypatch: pytest.MonkeyPatch,
                                                                         cuda_events_on_the_cpu_clock: None) -> None:
    """CUDA events played by the CPU clock, an L2 flush that takes 30 ms: every timed run (and the sizing
    one) starts with a flush, and no timed run includes it."""
    flushes = []

    class SlowFlush:
        def zero_(self) -> None:
            flushes.append(1)
            time.sleep(0.03)

    monkeypatch.setattr(common.torch, "empty", lambda *args, **kwargs: SlowFlush())
    timing = common._measure_cuda(lambda: None, CPU, TimingSettings(warmup_ms=0.0, rep_ms=1.0, min_reps=3, max_reps=3))
    assert timing.reps == 3 and len(flushes) == 1 + 3
    assert timing.p80_ms < 15


def test_cuda_timer_takes_at_least_min_reps_runs_and_never_the_first(monkeypatch: pytest.MonkeyPatch,
                                                                      cuda_events_on_the_cpu_clock: None) -> None:
    """A 20 ms call within a 30 ms budget still gets min_reps timed runs (do_bench would time one), and
    the first (compiling) call is not among them."""
    monkeypatch.setattr(common, "L2_FLUSH_BYTES", 1024)
    calls = []

    def fn() -> None:
        calls.append(1)
        time.sleep(0.2 if len(calls) == 1 else 0.02)

    timing = common._measure_cuda(fn, CPU, TimingSettings(warmup_ms=0.0, rep_ms=30.0, min_reps=4))
    assert timing.reps == 4
    assert 15 < timing.median_ms < 150 and timing.p80_ms < 150  # the 200 ms first call is not timed
    assert len(calls) == 1 + 1 + 4  # untimed first, 1 to size the rest, no warm-up budget, 4 timed
    # A fast call fills the budget instead, up to max_reps.
    calls.clear()
    fast = common._measure_cuda(lambda: calls.append(1), CPU, TimingSettings(warmup_ms=0.0, rep_ms=30.0, min_reps=4,
                                                                               max_reps=50))
    assert fast.reps == 50


# ------------------------------------------------------------------- agreement checks


def test_compare_is_relative_to_the_reference_scale() -> None:
    """A 50% error on a reference of magnitude 1e-3 fails though its absolute error is below tol; a 1e-7
    relative error on magnitude 1e3 passes though its absolute error is above tol."""
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(32, 8, generator=gen)
    small = compare(1.5 * 1e-3 * ref, 1e-3 * ref, tol=1e-2)
    assert not small.ok and small.max_abs < 1e-2 and small.max_rel == pytest.approx(0.5, rel=1e-6)
    big = compare(1e3 * ref * (1 + 1e-7), 1e3 * ref, tol=1e-4)
    assert big.ok and big.max_abs > 1e-4


def test_near_tie_mask_looks_at_the_Kth_and_K_plus_1th_logits() -> None:
    """Router = identity, so logits = x. K = 2: a tie between choices 2 and 3 excludes the token, a tie
    between choices 1 and 2 (both routed anyway) does not; K = E has no (K+1)-th choice: all kept."""
    x = torch.tensor([
        [3.0, 2.0, 2.0 + 5e-5, 0.0],  # 2nd and 3rd logits 5e-5 apart: excluded
        [3.0, 3.0 + 1e-5, 1.0, 0.0],  # 1st and 2nd apart by 1e-5, 2nd and 3rd by 2: kept
        [4.0, 1.0, 2.0, 3.0],  # well separated: kept
    ])
    w = torch.eye(4)
    assert near_tie_keep_mask(x, w, 2).tolist() == [False, True, True]
    assert near_tie_keep_mask(x, w, 4).tolist() == [True, True, True]


def test_weight_grads_compared_on_the_checked_experts_by_id() -> None:
    """The reference keeps the gradients of experts (1, 3) of E = 4: a path's gradients of those experts
    decide; garbage in the unchecked experts 0 and 2 does not, an error in expert 3 does."""
    gen = torch.Generator().manual_seed(0)
    d_in, d_out, d_router = torch.randn(4, 6, 5, generator=gen), torch.randn(4, 5, 3, generator=gen), torch.randn(4, 5)
    checked = [1, 3]
    reference = Reference(torch.zeros(1), torch.zeros(1), torch.ones(1, dtype=torch.bool), torch.ones(4), tuple(checked),
                          {"router_weight_ED": d_router, "w_in_EHD": d_in[checked], "w_out_EDF": d_out[checked]})
    garbage_in, garbage_out = d_in.clone(), d_out.clone()
    garbage_in[[0, 2]] = 1e3
    garbage_out[[0, 2]] = -1e3
    result = weight_grad_agreement((d_router, garbage_in, garbage_out), reference, 1e-4)
    assert all(result[name]["ok"] for name in ("router_weight_ED", "w_in_EHD", "w_out_EDF"))
    assert result["checked_experts"] == checked
    wrong = d_out.clone()
    wrong[3] *= 1.1
    assert not weight_grad_agreement((d_router, d_in, wrong), reference, 1e-4)["w_out_EDF"]["ok"]
    assert weight_grad_agreement((d_router, None, d_out), reference, 1e-4)["w_in_EHD"] == {"ok": False,
                                                                                           "error": "no gradient"}


def test_weight_grads_of_an_idle_expert_are_judged_at_its_own_scale() -> None:
    """Expert 0 busy (gradients ~1e3), expert 2 idle (~1e-2): a 10% error in the idle expert's gradient is
    1e-6 of the busy one's scale, and must still disagree; the entry names the expert that decided."""
    gen = torch.Generator().manual_seed(1)
    d_in = torch.randn(3, 6, 5, generator=gen) * torch.tensor([1e3, 1.0, 1e-2])[:, None, None]
    d_out = torch.randn(3, 5, 3, generator=gen) * torch.tensor([1e3, 1.0, 1e-2])[:, None, None]
    d_router = torch.randn(3, 5, generator=gen)
    checked = [0, 1, 2]
    reference = Reference(torch.zeros(1), torch.zeros(1), torch.ones(1, dtype=torch.bool), torch.ones(3), tuple(checked),
                          {"router_weight_ED": d_router, "w_in_EHD": d_in, "w_out_EDF": d_out})
    exact = weight_grad_agreement((d_router, d_in, d_out), reference, 2e-2)
    assert all(exact[name]["ok"] for name in ("router_weight_ED", "w_in_EHD", "w_out_EDF"))
    wrong = d_in.clone()
    wrong[2] *= 1.1
    result = weight_grad_agreement((d_router, wrong, d_out), reference, 2e-2)["w_in_EHD"]
    assert not result["ok"] and result["worst_expert"] == 2
    assert result["max_rel"] == pytest.approx(0.1)  # relative to expert 2's own largest gradient
    assert compare(wrong[checked], d_in, 2e-2).ok  # at the stacked scale the error would pass
    misshaped = weight_grad_agreement((d_router, d_in[:2], d_out), reference, 2e-2)["w_in_EHD"]
    assert not misshaped["ok"] and misshaped["error"] == "shape (2, 6, 5)"


@pytest.fixture(scope="module")
def case():
    problem = make_problem(TINY, "balanced", CPU, seed=1)
    return problem, compute_reference(problem), PeerEnv(CPU), _opts()


def test_a_peer_with_the_right_y_but_a_wrong_dx_is_not_timed(case) -> None:
    """y and the weight gradients right, dx 5% too large (x enters with value x, gradient 1.05): caught."""

    def wrong_dx(problem, env) -> PeerRun:
        weights = (problem.router_weight_ED, problem.w_in_EHD, problem.w_out_EDF)

        def forward() -> torch.Tensor:
            x = problem.x_TD + 0.05 * (problem.x_TD - problem.x_TD.detach())
            return loop_moe_forward(x, *weights, problem.shape.K)

        return PeerRun(forward, list(weights), problem_weights=weights)

    entry = run_path(wrong_dx, *case)
    agreement = entry["agreement"]
    assert agreement["y"]["ok"] and not agreement["dx"]["ok"]
    assert agreement["dx"]["max_rel"] == pytest.approx(0.05, rel=0.05)
    assert entry["status"] == "disagrees" and entry["fwd_ms"] is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_peer_five_percent_off_disagrees_in_every_dtype(dtype: str) -> None:
    """The honest loop agrees at the dtype's tolerance; 5% off is beyond it, bf16 included."""
    shape = Shape("tiny", 64, 32, 32, 4, 2, dtype)
    problem = make_problem(shape, "balanced", CPU, seed=2)
    case = (problem, compute_reference(problem), PeerEnv(CPU), _opts(shape))

    def off_by_five_percent(problem, env) -> PeerRun:
        run = build_torch_loop(problem, env)
        return PeerRun(lambda: run.forward() * 1.05, run.params)

    assert run_path(build_torch_loop, *case)["agreement"]["ok"]
    entry = run_path(off_by_five_percent, *case)
    assert entry["status"] == "disagrees" and not entry["agreement"]["y"]["ok"]


def test_micro_check_catches_one_wrong_expert_in_a_row() -> None:
    """Integer outputs must match in every element of every kept row: one of a token's K = 2 experts wrong
    fails the check (even with its weights right); a near-tie row left out does not."""
    experts = torch.tensor([[0, 3], [1, 2], [2, 3]])
    weights = torch.tensor([[0.6, 0.4], [0.5, 0.5], [0.9, 0.1]])
    reference = {"experts_TK": experts, "weights_TK": weights}
    wrong = experts.clone()
    wrong[1, 1] = 0
    result = micro.check_outputs({"experts_TK": wrong, "weights_TK": weights.clone()}, reference, None)
    assert not result["ok"] and result["experts_TK"] == {"mismatched_rows": 1, "ok": False}
    assert result["weights_TK"]["ok"]
    keep = torch.tensor([True, False, True])
    assert micro.check_outputs({"experts_TK": wrong, "weights_TK": weights.clone()}, reference, keep)["ok"]
    assert not micro.check_outputs({"experts_TK": experts, "weights_TK": weights[:2]}, reference, None)["ok"]


def test_router_comparison_keeps_each_weight_with_its_expert() -> None:
    """Choices sorted by expert id carry their weights along."""
    from moe_engine.bench.router import _by_expert

    out = _by_expert(torch.tensor([[0.7, 0.3], [0.6, 0.4]]), torch.tensor([[5, 2], [1, 4]]))
    assert out["experts_TK"].tolist() == [[2, 5], [1, 4]]
    torch.testing.assert_close(out["weights_TK"], torch.tensor([[0.3, 0.7], [0.6, 0.4]]))
