"""`moe-engine profile`: a few training steps under torch.profiler, and where their time went.

    moe-engine profile [--config PATH] [--set a.b.c=VALUE ...] [--steps N] [--warmup W] [--out DIR]

Builds the run `moe-engine train` would build (`Trainer(cfg, overwrite=True)`, its out_dir under
DIR/run), trains W warm-up steps, then N steps under torch.profiler (CPU, plus CUDA on a GPU, with
shapes), and writes to DIR:

- trace.json: the Chrome trace (open in https://ui.perfetto.dev or chrome://tracing);
  trace_rank{r}.json for ranks r > 0 under a launcher;
- profile.json: the table below, step times, tokens per expert and imbalance per MoE layer;
- expert_load.png: tokens per expert of every routing decision over the profiled steps;
- imbalance.png: max / mean tokens per expert of each.

It prints one line per category (router, permute, grouped GEMMs, all-to-all, combine, aux losses,
attention, optimizer, rest; device idle on a GPU) with its time per step, its share of the
measured wall step time and its achieved TFLOP/s or GB/s, its top ops, and the sum of the
categories against the measured step time. How time is attributed: moe_engine.profiling_report.

Throughput: the expert GEMMs do 6 * rows * D * (H + F) FLOPs a step per MoE layer (forward and
both backward GEMMs of the up (H = 2F for SwiGLU) and down projections, rows from the layer's
tokens_per_expert); other categories count the FLOPs of their matmuls from the recorded shapes.
Permute and combine move at least (3N + T) * D and (3N + 2T) * D elements a step (forward
gather and its scatter-add backward; the weighted sum, its backward and the weights' gradient
read), N kept choices and T tokens of the layer; all-to-all moves what the dispatcher's
traffic meter counted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from moe_engine.config import Config, ConfigError, load_config
from moe_engine.kernels.permute import GatheredRows
from moe_engine.profiling_report import (
    STEP_RANGE,
    analyze_trace,
    build_table,
    format_table,
    imbalance,
    plot_expert_load,
    plot_imbalance,
)

DEFAULT_OUT = Path("runs/profile")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`moe-engine profile`'s options."""
    parser.add_argument("--config", metavar="PATH", help="YAML run config (default: the embedded default job)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config field, e.g. --set moe.num_experts=16 (repeatable)",
    )
    parser.add_argument("--steps", type=int, default=5, help="steps to profile (>= 1; default 5)")
    parser.add_argument("--warmup", type=int, default=3, help="steps to run before the profiler starts (>= 0; default 3)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder for the trace, table and plots (default {DEFAULT_OUT})")
    parser.add_argument("--top-ops", type=int, default=3, help="ops listed under each category (>= 0; default 3)")


def check_counts(steps: int, warmup: int, top_ops: int = 0) -> str | None:
    """The message for a bad --steps / --warmup / --top-ops value, or None."""
    for flag, value, minimum in (("--steps", steps, 1), ("--warmup", warmup, 0), ("--top-ops", top_ops, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            return f"{flag} {value!r}: must be an integer >= {minimum}"
    return None


@dataclass(frozen=True)
class ProfileResult:
    """What one profile run measured; `table` is profiling_report.build_table's dict."""

    table: dict[str, Any]
    timeline: str
    step_seconds: list[float]
    unprofiled_step_s: float | None
    tokens_per_expert_LE: list[list[float]]
    imbalance_L: list[float]
    files: dict[str, Path]


class _LayerCall(NamedTuple):
    """One forward of an MoE layer, as the observer saw it (tensors kept, nothing computed yet)."""

    tokens_per_expert_E: torch.Tensor  # rows each local expert computed
    experts_TK: torch.Tensor  # the routing's choices, -1 where dropped
    d_model: int
    x_bytes: int  # bytes per element of the layer's input (the rows permute copies)
    y_bytes: int  # bytes per element of the experts' output (the rows combine reads)
    gather_fused: bool  # the experts read the rows through the index: permute copied nothing


class ProfileSetupError(ValueError):
    """The run could not be set up (a checkpoint, run folder, DeepSpeed config or value the user can fix)."""


def _in_backward() -> bool:
    """True while autograd runs a backward on this thread (where activation checkpointing runs
    forwards again)."""
    return torch._C._current_graph_task_id() != -1


class _StepObserver:
    """Forward hooks installed for the profiled steps only (`remove` takes them off).

    Opens `moe::router` and `moe::attention` record_function ranges around every router (the
    attention's too) and every attention module, and keeps references to what the MoE layers
    routed and computed; nothing is computed inside the steps, the counting happens afterwards.
    """

    def __init__(self, model: nn.Module) -> None:
        self.routers = list(getattr(model, "routers", []))
        self.moe_layers = list(getattr(model, "moe_layers", []))
        self.experts_TK: list[list[torch.Tensor]] = [[] for _ in self.routers]
        self.layer_calls: list[list[_LayerCall]] = [[] for _ in self.moe_layers]
        self._experts_out: dict[int, tuple[int, bool]] = {}
        self._open: dict[int, list[record_function]] = {}
        self._handles = []
        for i, router in enumerate(self.routers):
            self._add_range(router, "moe::router", on_output=lambda out, i=i: self._routed(i, out))
        for module in _attention_modules(model):
            self._add_range(module, "moe::attention")
        for j, layer in enumerate(self.moe_layers):
            self._handles.append(layer.register_forward_hook(lambda m, args, out, j=j: self._layer_done(j, args, out)))
            self._handles.append(layer.experts.register_forward_hook(lambda m, args, out, j=j: self._experts_done(j, m, args, out)))

    def _add_range(self, module: nn.Module, name: str, on_output: Callable[[Any], None] | None = None) -> None:
        def enter(mod, args):
            scope = record_function(name)
            scope.__enter__()
            self._open.setdefault(id(mod), []).append(scope)

        def leave(mod, args, output):
            self._open[id(mod)].pop().__exit__(None, None, None)
            if on_output is not None and output is not None:
                on_output(output)

        self._handles.append(module.register_forward_pre_hook(enter))
        self._handles.append(module.register_forward_hook(leave, always_call=True))

    def _routed(self, i: int, routing: Any) -> None:
        if _in_backward():  # a checkpointed block's forward again: its tokens were counted once already
            return
        experts_TK = getattr(routing, "experts_TK", None)
        if experts_TK is not None:
            self.experts_TK[i].append(experts_TK.detach())

    def _experts_done(self, j: int, experts: nn.Module, args: tuple, y_ND: torch.Tensor) -> None:
        self._experts_out[j] = (y_ND.element_size(), _gather_fused(experts, args[0]))

    def _layer_done(self, j: int, args: tuple, out: Any) -> None:
        if _in_backward():  # recomputed under activation checkpointing: the step's work was counted in its forward
            return
        # The layer returns y in its input's dtype.
        y_bytes, fused = self._experts_out.get(j, (out.y.element_size(), False))
        self.layer_calls[j].append(_LayerCall(
            out.tokens_per_expert_E, out.routing.experts_TK.detach(), out.y.shape[-1], out.y.element_size(), y_bytes, fused
        ))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def tokens_per_expert(self) -> torch.Tensor:
        """(routers, E) float64 kept choices per expert over the recorded steps (this rank's tokens)."""
        rows = []
        for router, calls in zip(self.routers, self.experts_TK):
            num_experts = getattr(router, "num_experts", None) or (1 + max(int(c.max()) for c in calls) if calls else 1)
            counts_E = torch.zeros(num_experts, dtype=torch.float64)
            for experts_TK in calls:
                kept = experts_TK[experts_TK >= 0].cpu()
                counts_E += torch.bincount(kept, minlength=num_experts).double()
            rows.append(counts_E)
        return torch.stack(rows) if rows else torch.zeros(0, 0, dtype=torch.float64)

    def gemm_flops(self) -> float:
        """FLOPs of the expert GEMMs over the recorded steps: 6 * rows * D * (H + F) per layer call, plus
        2 * rows * D * H for the up-projection the experts run again in the backward with moe.recompute_experts."""
        total = 0.0
        for layer, calls in zip(self.moe_layers, self.layer_calls):
            w_in, w_out = getattr(layer.experts, "w_in", None), getattr(layer.experts, "w_out", None)
            if w_in is None or w_out is None:
                continue
            _, width_in, d_model = w_in.shape
            again = 2.0 * width_in if getattr(layer.experts, "recompute", False) else 0.0
            for call in calls:
                total += float(call.tokens_per_expert_E.sum()) * d_model * (6.0 * (width_in + w_out.shape[2]) + again)
        return total

    def bytes_moved(self) -> dict[str, float]:
        """Least bytes permute and combine move over the recorded steps (see the module docstring);
        no permute entry when every gather was fused into the expert GEMM."""
        permute = combine = 0.0
        copied = False
        for calls in self.layer_calls:
            for call in calls:
                kept, tokens = float((call.experts_TK >= 0).sum()), call.experts_TK.shape[0]
                if not call.gather_fused:
                    permute += (3 * kept + tokens) * call.d_model * call.x_bytes
                    copied = True
                combine += (3 * kept + 2 * tokens) * call.d_model * call.y_bytes
        moved = {"combine": combine} if combine else {}
        if copied:
            moved["permute"] = permute
        return moved


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """The outermost modules whose class name ends in 'Attention' (self-attention, MoE attention)."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if type(module).__name__.endswith("Attention"):
            found.append(module)
            inside.update(id(m) for m in module.modules())
    return found


def _gather_fused(experts: nn.Module, x: Any) -> bool:
    """Whether the experts read GatheredRows through their index (the Triton path) instead of a copy."""
    if not isinstance(x, GatheredRows) or not hasattr(experts, "resolve_impl"):
        return False
    device = x.x_TD.device
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else x.x_TD.dtype
    return experts.resolve_impl(device, dtype) == "triton"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _timed_step(trainer: Any, scope: str | None = None) -> tuple[float, dict[str, Any]]:
    """(wall seconds, metrics) of one training step; `scope` names a record_function range
    around it, which the step's device work finishes inside."""
    batch = next(trainer.batches)
    _sync(trainer.device)
    start = time.perf_counter()
    with record_function(scope) if scope else contextlib.nullcontext():
        metrics = trainer.train_step(batch)
        _sync(trainer.device)
    return time.perf_counter() - start, metrics


def profile_training(
    cfg: Config, *, steps: int, warmup: int, out_dir: Path, top_ops: int = 3,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> ProfileResult | None:
    """Profile `steps` training steps of the run `cfg` describes (after `warmup` steps) and write
    the trace, table and plots to out_dir. Returns the result on the main rank, None elsewhere."""
    from moe_engine.parallel.runtime import all_reduce_sum, shutdown_distributed
    from moe_engine.train import TRAINER_SETUP_ERRORS, Trainer

    message = check_counts(steps, warmup, top_ops)
    if message is not None:
        raise ValueError(message)
    try:
        trainer = Trainer(cfg, overwrite=True)
    except TRAINER_SETUP_ERRORS as err:  # as `moe-engine train` reports them
        raise ProfileSetupError(str(err)) from err
    run, device = trainer.run_info, trainer.device
    say = log if run.is_main else (lambda line: None)
    try:
        say(f"profile: {type(trainer.model).__name__} on {device}, {len(trainer.model.moe_layers)} MoE layers; "
            f"{warmup} warm-up + {steps} profiled steps")
        warm_seconds = []
        for i in range(warmup):
            warm_seconds.append(_timed_step(trainer)[0])
            say(f"  warm-up step {i + 1}/{warmup}: {warm_seconds[-1]:.3f} s")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        observer = _StepObserver(trainer.model)
        step_seconds, traffic_bytes = [], 0.0
        try:
            with profile(activities=activities, record_shapes=True) as prof:
                with record_function("moe_engine::profiler_warmup"):
                    pass  # the profiler's first range pays for its set-up (ms under a launcher): not in a step
                for i in range(steps):
                    seconds, metrics = _timed_step(trainer, STEP_RANGE)
                    step_seconds.append(seconds)
                    traffic_bytes += 1e6 * metrics.get("all_to_all_mb", 0.0)
                    say(f"  profiled step {i + 1}/{steps}: {seconds:.3f} s, loss {metrics['loss']:.4f}")
        finally:
            observer.remove()
        counts_LE = observer.tokens_per_expert()
        if run.world_size > 1:  # every rank routed its own tokens: the plots show them all
            counts_LE = all_reduce_sum(counts_LE.to(device), run).cpu()
        out_dir.mkdir(parents=True, exist_ok=True)
        trace_path = out_dir / ("trace.json" if run.rank == 0 else f"trace_rank{run.rank}.json")
        say(f"  writing the trace to {trace_path}")
        prof.export_chrome_trace(str(trace_path))
        if not run.is_main:
            return None
        raw_events = json.loads(trace_path.read_text())["traceEvents"]
        say(f"  attributing {len(raw_events)} trace events")
        breakdowns = analyze_trace(raw_events)
        moved = {k: v / steps for k, v in observer.bytes_moved().items()}
        if traffic_bytes:
            moved["all_to_all"] = traffic_bytes / steps
        gemm_flops = observer.gemm_flops() / steps
        table = build_table(breakdowns, sum(step_seconds) / steps, {"gemm": gemm_flops} if gemm_flops else {}, moved, top_ops)
        timeline = f"{'device' if breakdowns[0].on_device else 'host'} time on {device}"
        # The first warm-up step pays for allocations and kernel compilation: the rest tell the plain step time.
        unprofiled = sum(warm_seconds[1:]) / (len(warm_seconds) - 1) if len(warm_seconds) > 1 else None
        counts = counts_LE.tolist()
        result = ProfileResult(table, timeline, step_seconds, unprofiled, counts, [imbalance(c) for c in counts],
                               {"trace": trace_path})
        _write_outputs(result, out_dir, str(device), warmup, run.world_size)
        return result
    finally:
        logger = getattr(trainer, "logger", None)  # the run's metric files: nothing is logged, close them
        if logger is not None:
            logger.close()
        shutdown_distributed(run)


def _write_outputs(result: ProfileResult, out_dir: Path, device: str, warmup: int, world_size: int) -> None:
    """profile.json and the two plots, named in result.files."""
    result.files.update(table=out_dir / "profile.json", expert_load=out_dir / "expert_load.png",
                        imbalance=out_dir / "imbalance.png")
    steps = len(result.step_seconds)
    plot_expert_load(result.tokens_per_expert_LE, result.files["expert_load"], f"tokens per expert over {steps} profiled steps")
    plot_imbalance(result.imbalance_L, result.files["imbalance"], f"expert imbalance over {steps} profiled steps")
    report = {
        "device": device, "timeline": result.timeline, "steps": steps, "warmup": warmup, "world_size": world_size,
        "step_seconds": result.step_seconds, "unprofiled_step_s": result.unprofiled_step_s, "table": result.table,
        "tokens_per_expert": result.tokens_per_expert_LE, "imbalance": result.imbalance_L,
        "files": {k: p.name for k, p in result.files.items()},
    }
    result.files["table"].write_text(json.dumps(_jsonable(report), indent=2) + "\n")


def format_result(result: ProfileResult) -> str:
    lines = [format_table(result.table, result.timeline)]
    if result.unprofiled_step_s is not None:
        overhead = result.table["wall_step_s"] / result.unprofiled_step_s - 1
        lines.append(f"{'step time without profiler':<30} {1e3 * result.unprofiled_step_s:>9.3f}  (profiler overhead {overhead:+.0%})")
    if result.imbalance_L:
        cells = "  ".join(f"{i}:{x:.2f}" for i, x in enumerate(result.imbalance_L))
        lines.append(f"\nexpert imbalance (max/mean tokens per expert) by MoE layer: {cells}")
    lines.append("\nwrote " + ", ".join(str(p) for p in result.files.values()))
    return "\n".join(lines)


def run_from_args(args: argparse.Namespace) -> int:
    """`moe-engine profile`: 0 on success, 2 on a value the user can fix."""
    message = check_counts(args.steps, args.warmup, args.top_ops)
    if message is not None:
        print(f"moe-engine profile: error: {message}", file=sys.stderr)
        return 2
    from moe_engine.train import NonFiniteLossError

    out_dir = Path(args.out)
    try:
        cfg = load_config(args.config, args.overrides, {"train.out_dir": str(out_dir / "run")})  # the path literally
        result = profile_training(cfg, steps=args.steps, warmup=args.warmup, out_dir=out_dir, top_ops=args.top_ops)
    except (ConfigError, FileNotFoundError, ProfileSetupError) as err:
        print(f"moe-engine profile: error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"moe-engine profile: error: {err}", file=sys.stderr)
        return 1
    if result is not None:
        print(format_result(result))
    return 0
