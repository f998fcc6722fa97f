"""Compile every Triton kernel for a GPU that is not here, and report what the compiler made of it.

The CPU test suite runs the kernels through Triton's interpreter, which accepts code the GPU
compiler rejects and says nothing about speed. This tool runs each custom op's real launcher on
CPU tensors while Triton's driver is replaced by one that only names a CUDA target (sm_90 =
H100/H200 by default): every launch becomes a warm-up launch of the JIT's own code path, which
specialises the arguments (16-byte divisibility, strides of 1), compiles and returns without
running, for every autotune config the pruner keeps. What compiles here is what a GPU compiles,
under the same cache key. For each (kernel, config, specialisation) it reports:

- registers per thread and spilled bytes (ptxas -v), dynamic shared memory against the target's limit;
- how each `tl.dot` lowered: `wgmma` (Hopper warpgroup MMA), `mma` (Ampere MMA), `fma` (none);
- whether the main loop's loads were software-pipelined (`cp.async` or `tma`) or stayed synchronous.

A config that spills, or a GEMM whose loop is not pipelined or not on tensor cores, is slow before
any timing is taken; fix those before spending GPU time on tuning.

    python -m moe_engine.kernels.compile_check [--arch 90] [--quick] [--strict] [--json out.json]
    python -m moe_engine.kernels.compile_check --shapes mixtral,olmoe --no-analyse --jobs 14

The second form warms a GPU host's Triton cache with what `moe-engine bench --shapes mixtral,olmoe`
will compile, on every core (scripts/gpu_checks.sh). Exit status 1 when a kernel fails to compile,
or with --strict, when a variant has a problem (`CompiledVariant.problems`). Works with triton 3.6
and 3.9. TRITON_INTERPRET must be unset (the interpreter replaces the kernels).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import torch

from moe_engine.bench.problem import Shape, find_shapes
from moe_engine.kernels._triton import KERNEL_MODULES

# A few spilled bytes (ptxas parking one value in L1-cached local memory) cost nothing measurable:
# small router and aux-loss configs spill 4-16 bytes. The GELU epilogue's 72-216 bytes at 128
# accumulator elements per thread are what this check exists to catch.
SPILL_TOLERANCE_BYTES = 16
# Per-block dynamic shared memory limit (bytes) by compute capability.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}


@dataclasses.dataclass
class CompiledVariant:
    """One compile: which kernel, under which config and constexprs, and what came out."""

    case: str
    kernel: str
    config: dict[str, int]
    constexprs: dict[str, object]
    seconds: float
    index: int = 0  # the launch's place in the enumeration (orders the shards' results)
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    dot: str = "-"
    loads: str = "-"
    error: str | None = None

    def problems(self, arch: int) -> list[str]:
        """What makes this variant wrong (error) or slow (spills, smem over the limit, an unpipelined or FMA dot)."""
        found = []
        if self.error:
            found.append(f"compile error: {self.error}")
            return found
        if self.spill_bytes and self.spill_bytes > SPILL_TOLERANCE_BYTES:
            found.append(f"spills {self.spill_bytes} bytes")
        limit = SHARED_MEMORY_LIMIT.get(arch)
        if limit and self.shared_bytes and self.shared_bytes > limit:
            found.append(f"shared memory {self.shared_bytes} > {limit}")
        if self.dot == "fma":
            found.append("tl.dot without tensor cores")
        if self.dot != "-" and self.loads == "sync":
            found.append("main loop not pipelined")
        return found


# ---------------------------------------------------------------------------------------------
# Compiling one launch
# ---------------------------------------------------------------------------------------------


def _ptxas_usage(ptx: str, arch: int) -> tuple[int | None, int | None]:
    """(registers per thread, spill-store bytes) from `ptxas -v` on the kernel's PTX, with the
    ptxas this triton compiles with (its PTX version needs it).

    A stack frame alone is not a spill (the router keeps a small indexed array there)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        run = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{'a' if arch >= 90 else ''}", path, "-o",
             os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True,
        )
    log = run.stdout + run.stderr
    if run.returncode:
        raise RuntimeError(f"ptxas failed: {log.strip()[-300:]}")
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return (int(regs.group(1)) if regs else None, int(spills.group(1)) if spills else None)


def _lowering(ttgir: str) -> tuple[str, str]:
    """(dot, loads) read off the TritonGPU IR: how tl.dot lowered and how the loop's loads are issued."""
    if "warp_group_dot" in ttgir:
        dot = "wgmma"
    elif "nvidia_mma" in ttgir and "tt.dot" in ttgir:
        dot = "mma"
    elif "tt.dot" in ttgir:
        dot = "fma"
    else:
        dot = "-"
    if "async_tma_copy" in ttgir or "tt.descriptor_load" in ttgir or "async_tma" in ttgir:
        loads = "tma"
    elif "async_copy_global_to_local" in ttgir:
        loads = "cp.async"
    else:
        loads = "sync"
    return dot, loads


class _TargetOnlyDriver:
    """Stands in for Triton's CUDA driver so that the JIT's own launch path compiles for `target`
    on a machine without a GPU (a warm-up launch compiles and returns, it never runs)."""

    def __init__(self, target) -> None:
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> str:
        return f"compile-check-sm{self.target.arch}"  # its own entry in the JIT's per-device caches

    def get_current_stream(self, device=None) -> int:
        return 0


@contextlib.contextmanager
def compile_only(
    arch: int, case: Callable[[], str], record: Callable[[CompiledVariant], None], all_configs: bool = True,
    shard: tuple[int, int] = (0, 1), analyse: bool = True,
) -> Iterator[None]:
    """Within the block, launching a Triton kernel compiles it for sm_<arch> (every autotune config
    the pruner keeps, or only the first) and records a CompiledVariant instead of running it.
    Outputs are left unwritten.

    The compile goes through JITFunction.run itself (a warm-up launch, with the driver replaced by
    one that only names the target), so the specialisation, options and cache key are the JIT's:
    a GPU host that runs this first finds these kernels in its Triton cache. shard = (i, n):
    compile only every n-th launch, starting at the i-th (n processes warm one cache together).
    analyse: read registers, spills and lowering (a second ptxas run per variant).
    """
    from triton.backends.compiler import GPUTarget
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.driver import driver as triton_driver
    from triton.runtime.jit import JITFunction

    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: expected 0 <= index < count")
    target = GPUTarget("cuda", arch, 32)
    jit_run, tuner_run = JITFunction.run, Autotuner.run
    launches = [0]
    launch_keys = ("num_warps", "num_stages", "num_ctas", "maxnreg")

    def run_jit(self, *args, grid, warmup, **kwargs):
        launches[0] += 1
        if (launches[0] - 1) % count != index:
            return None
        bound = {**dict(zip(self.arg_names, args)), **kwargs}
        constexprs = {p.name: bound[p.name] for p in self.params if p.is_constexpr and p.name in bound}
        config = {k: v for k, v in kwargs.items() if k in launch_keys}
        config.update({k: v for k, v in constexprs.items() if k.startswith(("BLOCK_", "GROUP_"))})
        variant = CompiledVariant(case(), self.__name__, config, {k: v for k, v in constexprs.items() if k not in config},
                                  0.0, index=launches[0] - 1)
        start = time.perf_counter()
        try:
            compiled = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
            if analyse:
                variant.shared_bytes = int(compiled.metadata.shared)
                variant.dot, variant.loads = _lowering(compiled.asm["ttgir"])
                variant.registers, variant.spill_bytes = _ptxas_usage(compiled.asm["ptx"], arch)
        except Exception as exc:  # a compile error is the finding, not a crash of the tool
            message = str(exc).strip()
            variant.error = f"{type(exc).__name__}: {message.splitlines()[-1] if message else ''}"[:300]
        variant.seconds = time.perf_counter() - start
        record(variant)
        return None

    def run_tuner(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        try:
            kept = self.prune_configs(kwargs)
            for config in kept if all_configs else kept[:1]:
                if config.pre_hook is not None:  # e.g. a descriptor's block shape, as Autotuner.run does
                    config.pre_hook({**self.nargs, **kwargs, **config.all_kwargs()})
                self.fn.run(*args, **kwargs, **config.all_kwargs())
        finally:
            self.nargs = None

    active = triton_driver._active
    triton_driver.set_active(_TargetOnlyDriver(target))
    JITFunction.run, Autotuner.run = run_jit, run_tuner
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = jit_run, tuner_run
        triton_driver._active = active


# ---------------------------------------------------------------------------------------------
# The launches to compile: every custom op at realistic widths (values do not matter, only
# shapes, dtypes and divisibility, which decide the specialisation)
# ---------------------------------------------------------------------------------------------


# The sizes a group of launches is compiled at are a benchmark `Shape`. Only dtypes and divisibility by
# 16 of each integer argument decide the specialisation, so a small T with a layer's own D, F, E and K
# compiles exactly the kernels that layer launches (with T a multiple of 16, as real batches are).
DEFAULT_WIDTHS = Shape("check", 256, 1024, 512, 8, 2)


def _routing(T: int, E: int, K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(experts_TK, choice_N, tokens_per_expert_E) of a valid dropless routing."""
    experts_TK = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    choice_N = torch.argsort(experts_TK.reshape(-1), stable=True)
    return experts_TK, choice_N, torch.bincount(experts_TK.reshape(-1), minlength=E)


# Float inputs are torch.empty: no kernel runs, so values never matter, and a layer's full-size
# weights cost address space only.

def _gemm_cases(dtype: torch.dtype, quick: bool, w: Shape) -> dict[str, Callable[[], None]]:
    ops = torch.ops.moe_engine
    T, D, F, E, K = w.T, w.D, w.F, w.E, w.K
    experts_TK, choice_N, tokens_E = _routing(T, E, K)
    gather_N = torch.div(choice_N, K, rounding_mode="floor")
    N = T * K
    x_TD = torch.empty(T, D, dtype=dtype)
    w_swiglu = torch.empty(E, 2 * F, D, dtype=dtype)
    w_out = torch.empty(E, D, F, dtype=dtype)
    grad_ND = torch.empty(N, D, dtype=dtype)
    h_NH = torch.empty(N, 2 * F, dtype=dtype)
    h_NF = torch.empty(N, F, dtype=dtype)
    weights_TK = torch.empty(T, K)
    score_N = torch.empty(N)
    # The local layer's path: the MLP fused with the combine, its scored backward, dW_out through the token index.
    cases = {
        "grouped_mlp_combine swiglu (save h)": lambda: ops.grouped_mlp_combine(
            x_TD, w_swiglu, w_out, tokens_E, choice_N, weights_TK, "swiglu", True),
        "grouped_mlp_scored_act_backward swiglu": lambda: ops.grouped_mlp_scored_act_backward(
            x_TD, gather_N, w_out, h_NH, tokens_E, score_N, "swiglu", True),
        "grouped_gemm_dx (gather)": lambda: ops.grouped_gemm_dx(h_NH, w_swiglu, tokens_E, gather_N, T),
        "grouped_gemm_dw (gather)": lambda: ops.grouped_gemm_dw(h_NH, x_TD, tokens_E, gather_N),
        "grouped_gemm_dw (dy gather)": lambda: ops.grouped_gemm_dw(x_TD, h_NF, tokens_E, None, gather_N),
        # moe.recompute_experts (the benchmark's ours_recompute): the forward stores no h, the backward
        # recomputes it with the up-projection alone, reading x through the token index.
        "grouped_mlp_combine swiglu (recompute h)": lambda: ops.grouped_mlp_combine(
            x_TD, w_swiglu, w_out, tokens_E, choice_N, weights_TK, "swiglu", False),
        "grouped_gemm (gather: h recomputed)": lambda: ops.grouped_gemm(x_TD, w_swiglu, tokens_E, gather_N),
    }
    if w is DEFAULT_WIDTHS:  # the paths the benchmark's SwiGLU layers do not take
        w_gelu = torch.empty(E, F, D, dtype=dtype)
        cases.update({
            # What expert parallelism runs on the rows it received: the scored MLP (weights sent with the
            # rows) and its backward, or the unfused MLP (the chunked overlap).
            "grouped_mlp_scored swiglu (save h)": lambda: ops.grouped_mlp_scored(
                grad_ND, w_swiglu, w_out, tokens_E, None, score_N, "swiglu", True),
            "grouped_mlp_scored_act_backward swiglu": lambda: ops.grouped_mlp_scored_act_backward(
                grad_ND, None, w_out, h_NH, tokens_E, score_N, "swiglu", True),
            "grouped_mlp swiglu (save h)": lambda: ops.grouped_mlp(grad_ND, w_swiglu, w_out, tokens_E, None, "swiglu", True),
            "grouped_mlp_act_backward swiglu": lambda: ops.grouped_mlp_act_backward(grad_ND, w_out, h_NH, tokens_E, "swiglu"),
            "grouped_gemm_dw": lambda: ops.grouped_gemm_dw(grad_ND, h_NF, tokens_E, None),
            "grouped_mlp_combine gelu (save h)": lambda: ops.grouped_mlp_combine(
                x_TD, w_gelu, w_out, tokens_E, choice_N, weights_TK, "gelu", True),
            "grouped_mlp_scored_act_backward gelu": lambda: ops.grouped_mlp_scored_act_backward(
                x_TD, gather_N, w_out, h_NF, tokens_E, score_N, "gelu", True),
            "grouped_mlp_act_backward gelu": lambda: ops.grouped_mlp_act_backward(grad_ND, w_out, h_NF, tokens_E, "gelu"),
            "grouped_gemm (no gather)": lambda: ops.grouped_gemm(grad_ND, w_out.transpose(1, 2), tokens_E, None),
        })
    return cases


def _router_cases(dtype: torch.dtype, quick: bool, w: Shape) -> dict[str, Callable[[], None]]:
    """The gating kernels take fp32 logits (the router's gate GEMM runs in fp32), whatever `dtype`."""
    ops = torch.ops.moe_engine
    if w is DEFAULT_WIDTHS:  # (E, K, groups, top groups): softmax/sigmoid, group-limited, small and large E
        shapes = [(64, 8, 1, 1), (64, 8, 8, 4)] + ([] if quick else [(8, 2, 1, 1), (128, 8, 1, 1)])
    else:
        shapes = [(w.E, w.K, 1, 1)]
    cases = {}
    for E, K, groups, topk_groups in shapes:
        logits = torch.empty(w.T, E)
        experts_TK, _, _ = _routing(w.T, E, K)
        grads = (torch.empty(w.T, K), torch.empty(w.T, E), torch.empty(E), torch.empty(w.T))
        for score in ("softmax", "sigmoid"):
            bias = torch.zeros(E) if score == "sigmoid" else None
            name = f"topk_gating E={E} K={K} {score}" + (f" groups={groups}/{topk_groups}" if groups > 1 else "")
            cases[name] = (lambda lg=logits, b=bias, k=K, s=score, g=groups, tg=topk_groups:
                           ops.topk_gating(lg, b, k, s, True, 1.0, g, tg))
            cases[name.replace("topk_gating", "topk_gating_backward")] = (
                lambda lg=logits, ex=experts_TK, gr=grads, s=score: ops.topk_gating_backward(lg, ex, *gr, s, True, 1.0))
    return cases


def _permute_cases(dtype: torch.dtype, quick: bool, w: Shape) -> dict[str, Callable[[], None]]:
    ops = torch.ops.moe_engine
    T, D, E, K = w.T, w.D, w.E, w.K
    experts_TK, choice_N, _ = _routing(T, E, K)
    x_TD = torch.empty(T, D, dtype=dtype)
    y_ND = torch.empty(T * K, D, dtype=dtype)
    weights_TK = torch.empty(T, K)
    return {
        "expert_order": lambda: ops.expert_order(experts_TK, E, T * K),
        "permute": lambda: ops.permute(x_TD, choice_N, K),
        "permute_backward": lambda: ops.permute_backward(y_ND, choice_N, T, K),
        "unpermute": lambda: ops.unpermute(y_ND, choice_N, weights_TK, T),
        "unpermute_backward": lambda: ops.unpermute_backward(x_TD, y_ND, choice_N, weights_TK, True, True),
    }


def _aux_loss_cases(dtype: torch.dtype, quick: bool, w: Shape) -> dict[str, Callable[[], None]]:
    """The losses read the router's fp32 probabilities and logits, whatever `dtype`."""
    ops = torch.ops.moe_engine
    T, E, K, S = w.T, w.E, w.K, 4
    probs = torch.empty(T, E)
    experts_TK, _, _ = _routing(T, E, K)
    seq_T = torch.arange(T) // (T // S)
    counts_SE = torch.zeros(S, E, dtype=torch.int32)
    return {
        "balance_loss": lambda: ops.balance_loss(probs, experts_TK, None, 1),
        "balance_loss (sequence)": lambda: ops.balance_loss(probs, experts_TK, seq_T, S),
        "balance_loss_backward (sequence)": lambda: ops.balance_loss_backward(torch.ones(()), seq_T, counts_SE, torch.ones(S), T, torch.float32),
        "router_z_loss": lambda: ops.router_z_loss(probs),
        "router_z_loss_backward": lambda: ops.router_z_loss_backward(torch.ones(()), probs, torch.empty(T)),
        "cv_squared": lambda: ops.cv_squared(torch.empty(E)),
        "cv_squared_backward": lambda: ops.cv_squared_backward(torch.empty(E), torch.ones(())),
        "importance_cv_squared": lambda: ops.importance_cv_squared(probs),
    }


CASE_GROUPS = {"grouped_gemm": _gemm_cases, "router": _router_cases, "permute": _permute_cases, "aux_losses": _aux_loss_cases}


def compile_all(
    arch: int = 90, groups: list[str] | None = None, dtype: torch.dtype = torch.bfloat16, quick: bool = False,
    progress: Callable[[CompiledVariant], None] | None = None, widths: list[Shape] | None = None,
    shard: tuple[int, int] = (0, 1), analyse: bool = True,
) -> list[CompiledVariant]:
    """Compile every launch of the named case groups (all by default) for sm_<arch>, at each of
    `widths` (default: DEFAULT_WIDTHS, which also covers GELU, the ungathered GEMM and the router's
    group-limited and small/large-E paths). quick: the first kept autotune config only, and the
    router at E=64 only. Returns one CompiledVariant per (kernel, config, specialisation)."""
    from moe_engine.kernels._triton import TRITON_AVAILABLE, interpreting

    if not TRITON_AVAILABLE:
        raise RuntimeError("compile_check needs triton installed")
    if interpreting():
        raise RuntimeError("compile_check compiles for a GPU: unset TRITON_INTERPRET (the interpreter replaces the kernels)")
    unknown = sorted(set(groups or []) - set(CASE_GROUPS))
    if unknown:
        raise ValueError(f"unknown case groups {unknown}; allowed: {', '.join(CASE_GROUPS)}")
    for module in KERNEL_MODULES:  # importing them registers their custom ops
        importlib.import_module(module)

    torch.manual_seed(0)
    variants: list[CompiledVariant] = []
    current = [""]

    def record(variant: CompiledVariant) -> None:
        variants.append(variant)
        if progress is not None:
            progress(variant)

    with compile_only(arch, lambda: current[0], record, all_configs=not quick, shard=shard, analyse=analyse):
        for w in widths or [DEFAULT_WIDTHS]:
            for group in groups or list(CASE_GROUPS):
                for name, launch in CASE_GROUPS[group](dtype, quick, w).items():
                    current[0] = name if w is DEFAULT_WIDTHS else f"{w.name}: {name}"
                    launch()
    return variants


def bench_widths(names: str) -> list[Shape]:
    """The `moe-engine bench` shapes named in a comma-separated list, at T = 256."""
    return [dataclasses.replace(s, T=256) for s in find_shapes(names, quick=False)]


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def format_variant(v: CompiledVariant, arch: int) -> str:
    cfg = ",".join(f"{k.removeprefix('BLOCK_')}={val}" for k, val in v.config.items()
                   if not (k == "num_ctas" and val == 1)).replace("num_warps", "warps").replace("num_stages", "stages")
    keys = ("EPILOGUE", "HAS_GATHER", "B_TMA", "SIGMOID", "N_GROUPS", "BACKWARD")
    flags = ("HAS_SCORE", "STORE_DSCORE", "HAS_DY_GATHER")  # shown only when set
    spec = ",".join([f"{k}={v.constexprs[k]}" for k in keys if k in v.constexprs]
                    + [k for k in flags if v.constexprs.get(k)])
    problems = "; ".join(v.problems(arch)) or "ok"
    if v.error:
        return f"{v.kernel:<30} {cfg:<48} {spec:<28} {problems}"
    if v.shared_bytes is None:  # compiled without analysis (--no-analyse)
        return f"{v.kernel:<30} {cfg:<48} {spec:<28} compiled in {v.seconds:.1f} s"
    return (f"{v.kernel:<30} {cfg:<48} {spec:<28} regs {v.registers!s:>3} spill {v.spill_bytes!s:>4} "
            f"smem {v.shared_bytes // 1024:>3}K {v.dot:>5} {v.loads:>8}  {problems}")


def _run_shards(argv: list[str], jobs: int) -> list[CompiledVariant]:
    """Run this tool in `jobs` processes (--shard i/jobs each) and merge their variants in launch order."""
    with tempfile.TemporaryDirectory() as tmp:
        children = []
        for i in range(jobs):
            out = os.path.join(tmp, f"shard{i}.json")
            cmd = [sys.executable, "-m", "moe_engine.kernels.compile_check", *argv, "--shard", f"{i}/{jobs}", "--json", out, "--quiet"]
            children.append((subprocess.Popen(cmd), out))
        variants = []
        for child, out in children:
            if child.wait() not in (0, 1) or not os.path.exists(out):
                raise RuntimeError(f"compile_check shard exited with status {child.returncode} and no report")
            with open(out) as f:
                variants += [CompiledVariant(**{k: v for k, v in d.items() if k != "problems"}) for d in json.load(f)["variants"]]
    return sorted(variants, key=lambda v: v.index)


def _strip_option(argv: list[str], name: str) -> list[str]:
    """argv without `name VALUE` / `name=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m moe_engine.kernels.compile_check", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200, 80: A100)")
    parser.add_argument("--groups", default=",".join(CASE_GROUPS), help=f"comma list of {', '.join(CASE_GROUPS)}")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--shapes", help="compile at these `moe-engine bench` shapes' D, F, E, K (e.g. mixtral,olmoe) "
                                         "instead of the default widths: what the benchmark will launch")
    parser.add_argument("--quick", action="store_true",
                        help="first autotune config only, router at E=64 only (every kernel and specialisation still compiles)")
    parser.add_argument("--no-analyse", dest="analyse", action="store_false",
                        help="compile only (to warm a GPU host's Triton cache): no ptxas -v, no IR reading")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    parser.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    parser.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strict", action="store_true", help="exit 1 on spills, unpipelined or non-tensor-core GEMMs too")
    parser.add_argument("--json", help="write every variant here")
    args = parser.parse_args(argv)
    if args.arch not in SHARED_MEMORY_LIMIT:
        parser.error(f"--arch {args.arch}: allowed: {', '.join(map(str, SHARED_MEMORY_LIMIT))}")
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: expected >= 1")
    shard = tuple(int(x) for x in args.shard.split("/"))
    widths = bench_widths(args.shapes) if args.shapes else None
    import triton

    say = (lambda *a, **k: None) if args.quiet else print
    say(f"compiling for sm_{args.arch} with triton {triton.__version__}, torch {torch.__version__}"
        + (f" in {args.jobs} processes" if args.jobs > 1 else ""), flush=True)
    case = [""]

    def progress(v: CompiledVariant) -> None:
        if v.case != case[0]:
            case[0] = v.case
            say(f"\n{v.case}", flush=True)
        say("  " + format_variant(v, args.arch), flush=True)

    start = time.perf_counter()
    if args.jobs > 1:
        variants = _run_shards(_strip_option(_strip_option(argv, "--jobs"), "--json"), args.jobs)
        for v in variants:
            progress(v)
    else:
        variants = compile_all(args.arch, args.groups.split(","), getattr(torch, args.dtype), args.quick, progress,
                               widths, shard, args.analyse)
    errors = [v for v in variants if v.error]
    slow = [v for v in variants if not v.error and v.problems(args.arch)]
    say(f"\n{len(variants)} compiles in {time.perf_counter() - start:.0f} s: {len(errors)} failed, "
        f"{len(slow)} with performance problems")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "triton": triton.__version__, "torch": torch.__version__,
                       "variants": [dataclasses.asdict(v) | {"problems": v.problems(args.arch)} for v in variants]},
                      f, indent=1, default=str)
    return 1 if errors or (args.strict and slow) else 0


if __name__ == "__main__":
    sys.exit(main())
