"""Every Triton kernel compiles for sm_90 (H100/H200) on this CPU machine, and the grouped GEMMs
lower to pipelined warpgroup MMAs without spills (moe_engine.kernels.compile_check).

The suite's other kernel tests run Triton's interpreter, which neither rejects code the GPU compiler
rejects nor says how a kernel lowers; this runs the real compiler (ptxas included, shipped with
triton) in a subprocess without TRITON_INTERPRET.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

from moe_engine.bench.problem import Shape
from moe_engine.kernels import compile_check
from moe_engine.kernels.compile_check import CompiledVariant

GEMM_KERNELS = {"_grouped_gemm_kernel", "_grouped_gemm_dw_kernel"}


def _run_check(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # a cold compile, like a fresh machine's
    out = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, "-m", "moe_engine.kernels.compile_check", *args, "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return run, json.loads(out.read_text())


def _triton_kernel_names() -> set[str]:
    """Every @triton.jit kernel (not helper) defined by the kernel modules."""
    names = set()
    for module in map(importlib.import_module, compile_check.KERNEL_MODULES):
        names |= {name for name in vars(module) if name.startswith("_") and name.endswith("_kernel")}
    return names


def test_every_kernel_compiles_for_sm90_and_gemms_are_pipelined_tensor_core_loops(tmp_path):
    run, report = _run_check(tmp_path, "--quick", "--strict", "--jobs", "2")
    variants = report["variants"]
    assert [v["index"] for v in variants] == list(range(len(variants)))  # both shards, merged in launch order
    assert report["arch"] == 90
    assert not [v for v in variants if v["error"]], run.stdout[-4000:]
    # Every kernel of every module was compiled at least once: a new kernel needs a case here.
    assert {v["kernel"] for v in variants} == _triton_kernel_names()
    gemms = [v for v in variants if v["kernel"] in GEMM_KERNELS]
    epilogues = {v["constexprs"].get("EPILOGUE") for v in gemms}
    assert epilogues >= {"none", "swiglu", "gelu", "swiglu_bwd", "gelu_bwd"}
    for v in gemms:
        assert (v["dot"], v["loads"], v["spill_bytes"]) == ("wgmma", "cp.async", 0), v
        assert 0 < v["shared_bytes"] <= compile_check.SHARED_MEMORY_LIMIT[90]
    assert "0 failed, 0 with performance problems" in run.stdout
    # What scripts/gpu_checks.sh relies on before the benchmark (there with --shapes): launching the
    # same kernels again, compile-only in one process, finds every one in the cache the first run filled.
    cache = tmp_path / "triton-cache"
    entries = sorted(p.name for p in cache.iterdir())
    rerun, _ = _run_check(tmp_path, "--quick", "--groups", "permute,router", "--no-analyse")
    assert "compiled in" in rerun.stdout and sorted(p.name for p in cache.iterdir()) == entries


def test_bench_widths_keep_the_layer_widths_at_a_small_batch():
    assert compile_check.bench_widths("olmoe,mixtral") == [
        Shape("olmoe", 256, 2048, 1024, 64, 8), Shape("mixtral", 256, 4096, 14336, 8, 2)]
    with pytest.raises(ValueError, match="unknown \\['olmo'\\]"):
        compile_check.bench_widths("olmo")


@pytest.mark.slow
def test_every_autotune_config_compiles_without_spills_or_unpipelined_gemms(tmp_path):
    run, report = _run_check(tmp_path, "--strict")
    assert len(report["variants"]) > 100
    assert "0 failed, 0 with performance problems" in run.stdout


def test_refuses_to_run_under_the_interpreter():
    # conftest sets TRITON_INTERPRET=1 on a machine without CUDA, which replaces the kernels.
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("this process does not run the interpreter")
    with pytest.raises(RuntimeError, match="unset TRITON_INTERPRET"):
        compile_check.compile_all(groups=["router"])


def test_refuses_unknown_groups_and_arches(tmp_path, capsys):
    env_interp = os.environ.pop("TRITON_INTERPRET", None)
    try:
        with pytest.raises(ValueError, match="unknown case groups \\['routers'\\]; allowed: grouped_gemm, router"):
            compile_check.compile_all(groups=["routers"])
    finally:
        if env_interp is not None:
            os.environ["TRITON_INTERPRET"] = env_interp
    with pytest.raises(SystemExit):
        compile_check.main(["--arch", "75"])
    assert "--arch 75: allowed: 80, 86, 89, 90, 100" in capsys.readouterr().err


@pytest.mark.parametrize(
    "ttgir, expected",
    [
        ("%a = ttng.warp_group_dot %x ... ttg.async_copy_global_to_local", ("wgmma", "cp.async")),
        ("#mma = #ttg.nvidia_mma<{versionMajor = 2}> %d = tt.dot %a, %b", ("mma", "sync")),
        ("%d = tt.dot %a, %b : tensor<16x16xf32, #blocked>", ("fma", "sync")),
        ("%v = tt.load %p", ("-", "sync")),
        ("ttng.warp_group_dot ttng.async_tma_copy_global_to_local", ("wgmma", "tma")),
    ],
)
def test_lowering_is_read_off_the_ir(ttgir, expected):
    assert compile_check._lowering(ttgir) == expected


def test_problems_name_what_is_wrong():
    ok = CompiledVariant("c", "k", {}, {}, 0.0, registers=128, spill_bytes=0, shared_bytes=1024, dot="wgmma", loads="cp.async")
    assert ok.problems(90) == []
    ok.spill_bytes = compile_check.SPILL_TOLERANCE_BYTES  # a few bytes are tolerated, more are not
    assert ok.problems(90) == []
    ok.spill_bytes += 1
    assert ok.problems(90) == [f"spills {compile_check.SPILL_TOLERANCE_BYTES + 1} bytes"]
    slow = CompiledVariant("c", "k", {}, {}, 0.0, registers=255, spill_bytes=64, shared_bytes=300_000, dot="wgmma", loads="sync")
    assert slow.problems(90) == ["spills 64 bytes", "shared memory 300000 > 232448", "main loop not pipelined"]
    assert CompiledVariant("c", "k", {}, {}, 0.0, dot="fma", loads="sync").problems(90)[0] == "tl.dot without tensor cores"
    failed = CompiledVariant("c", "k", {}, {}, 0.0, error="CompilationError: x")
    assert failed.problems(90) == ["compile error: CompilationError: x"]
