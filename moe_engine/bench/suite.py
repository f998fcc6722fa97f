"""`moe-engine bench`: the layer, router and permute benchmarks in one process, one JSON, one plot.

    moe-engine bench --quick                                   # tiny CPU shapes, under a minute
    moe-engine bench --shapes mixtral,olmoe --routing balanced,skewed --out results.json
    moe-engine bench --only router,permute --shapes qwen3_30b_a3b

The JSON (default benchmarks/results/<gpu-or-cpu>-<date>.json) holds the device, versions, date,
the kernel backend, and one list of case records per benchmark; the PNG beside it plots the layer's
fwd+bwd TFLOP/s per shape and path. Each case prints a table as it finishes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from pathlib import Path
from typing import Any, Iterator

import torch

from moe_engine.bench.common import (
    SCHEMA,
    BenchOptions,
    TimingSettings,
    copy_bandwidth_gbps,
    default_out_path,
    device_info,
    kernel_backend_info,
    now,
    plot_layer_tflops,
    resolve_device,
    say,
    versions,
    write_json,
)
from moe_engine.bench.layer import LOOP_MIN_REPS, LOOP_PATHS
from moe_engine.bench.peers import PEERS
from moe_engine.bench.problem import DTYPES, ROUTINGS, find_shapes
from moe_engine.kernels._triton import autotune_choices

BENCHMARKS = ("layer", "router", "permute")


def add_arguments(parser: argparse.ArgumentParser, with_only: bool = True) -> None:
    """The benchmark options, shared by `moe-engine bench` and the scripts in benchmarks/."""
    parser.add_argument("--quick", action="store_true",
                        help="tiny CPU-friendly shapes (fp32, E=7 prime, one bf16), few repetitions")
    parser.add_argument("--shapes", metavar="NAME,...",
                        help="comma-separated: mixtral, olmoe, qwen3_30b_a3b, deepseek_v3_ep4, sonicmoe, "
                             "quick_e8, quick_e7, quick_bf16 (default: the five published layers, or the quick ones)")
    parser.add_argument("--routing", default="balanced", metavar="balanced|skewed",
                        help="balanced (random top-k), skewed (Zipf-like logit bias, expert 0 hot), or both: "
                             "balanced,skewed")
    if with_only:
        parser.add_argument("--only", metavar="NAME,...", help=f"run only some of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--peers", metavar="NAME,...",
                        help=f"layer paths to run (default all): {', '.join(PEERS)}")
    parser.add_argument("--dtype", choices=list(DTYPES), help="override every shape's dtype (default: bf16; quick: per shape)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:N]")
    parser.add_argument("--reps", type=int, help="CPU: timed repetitions per measurement (default 5, quick 3)")
    parser.add_argument("--rep-ms", type=float, default=100.0,
                        help="CUDA: time budget of the timed runs of one measurement, ms (default 100)")
    parser.add_argument("--min-reps", type=int, default=10,
                        help="CUDA: timed runs per measurement at least, whatever --rep-ms allows (default 10; "
                             f"the loop-like layer peers {', '.join(LOOP_PATHS)} take at most {LOOP_MIN_REPS})")
    parser.add_argument("--threads", type=int,
                        help="CPU: torch intra-op threads while benchmarking (default: 1 with --quick, which keeps "
                             "timings steady on busy cores; else torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", metavar="PATH", help="JSON path (default benchmarks/results/<gpu-or-cpu>-<date>.json)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG beside the JSON")


def _names(value: str | None, allowed: tuple[str, ...], flag: str) -> tuple[str, ...]:
    if not value:
        return allowed
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise ValueError(f"{flag} {value!r}: unknown {unknown}; allowed: {', '.join(allowed)}")
    return names


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    """Validate the arguments; raises ValueError naming the flag, the value and what is allowed."""
    if args.reps is not None and args.reps < 1:
        raise ValueError(f"--reps {args.reps}: must be >= 1")
    if args.rep_ms <= 0:
        raise ValueError(f"--rep-ms {args.rep_ms}: must be > 0")
    if args.min_reps < 1:
        raise ValueError(f"--min-reps {args.min_reps}: must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads {args.threads}: must be >= 1")
    timing = TimingSettings(warmup=1, reps=args.reps or (3 if args.quick else 5), rep_ms=args.rep_ms,
                            min_reps=args.min_reps)
    return BenchOptions(
        device=resolve_device(args.device),
        shapes=tuple(find_shapes(args.shapes, args.quick, args.dtype)),
        routings=_names(args.routing, ROUTINGS, "--routing"),
        peers=_names(args.peers, PEERS, "--peers"),
        timing=timing,
        seed=args.seed,
    )


@contextlib.contextmanager
def _cpu_threads(device: torch.device, threads: int | None) -> Iterator[int]:
    """Set torch's intra-op threads for the run (CPU only) and put the old number back after."""
    saved = torch.get_num_threads()
    if device.type == "cpu" and threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(saved)


def measure_all(
    args: argparse.Namespace, opts: BenchOptions, benchmarks: tuple[str, ...], out: Path, png: Path | None
) -> dict[str, Any]:
    """The report: facts about this machine, then one list of case records per benchmark.

    The JSON at `out` (and the plot at `png`, if any) is rewritten after every case ("complete":
    false until the end), so a run cut short by a time limit still leaves what it measured.
    """
    started = now()
    device = device_info(opts.device)
    copy_bytes = (64 if opts.device.type == "cpu" else 1024) * 2**20
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "complete": False,
        "date": started.isoformat(timespec="seconds"),
        "device": device,
        "versions": versions(),
        "kernels": kernel_backend_info(opts.device),
        "settings": {
            "benchmarks": list(benchmarks), "quick": args.quick, "shapes": [s.name for s in opts.shapes],
            "routings": list(opts.routings), "peers": list(opts.peers), "seed": opts.seed,
            "timer": (f"CUDA events: median, p20/p80 of at least {opts.timing.min_reps} runs ({', '.join(LOOP_PATHS)}: "
                      f"{min(opts.timing.min_reps, LOOP_MIN_REPS)}) within {opts.timing.rep_ms} ms, L2 flushed before each"
                      if opts.device.type == "cuda"
                      else f"time.perf_counter: median of {opts.timing.reps} runs after {opts.timing.warmup} warm-up"),
            "rep_ms": opts.timing.rep_ms if opts.device.type == "cuda" else None,
            "cpu_threads": torch.get_num_threads() if opts.device.type == "cpu" else None,
        },
        "copy_bandwidth_gbps": copy_bandwidth_gbps(opts.device, opts.timing, copy_bytes),
        "plot": None,
    }
    say(f"moe-engine bench on {device['name']} ({opts.device}), torch {torch.__version__}, "
        f"kernels: {report['kernels'].get('backend')}; shapes: {', '.join(s.name for s in opts.shapes)}")

    def save() -> None:
        report["wall_seconds"] = (now() - started).total_seconds()
        # The config each Triton kernel's autotuner picked per key, with the setting that pins it.
        report["autotune"] = autotune_choices()
        write_json(report, out)  # the figures first: a failing plot (no matplotlib, say) must not lose them
        if png is not None and report.get("layer"):
            title = f"MoE layer fwd+bwd on {device['name']}, torch {torch.__version__}, {report['date'][:10]}"
            try:
                plot_layer_tflops(report["layer"], title, png)
            except Exception as err:  # noqa: BLE001 - any plotting failure is reported, never fatal
                report["plot"], report["plot_error"] = None, f"{type(err).__name__}: {err}"
            else:
                report["plot"] = str(png)
                report.pop("plot_error", None)
            write_json(report, out)

    for name in benchmarks:
        module = importlib.import_module(f"moe_engine.bench.{name}")
        report[name] = []
        module.run(opts, report["copy_bandwidth_gbps"], report[name], save)
    # Read at the end: an import along the way (DeepSpeed, megatron-core) could have changed it.
    report["settings"]["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    report["complete"] = True
    save()
    return report


def run(args: argparse.Namespace, benchmarks: tuple[str, ...] | None = None) -> int:
    """Run the chosen benchmarks and write the JSON (and the PNG beside it); returns the exit status."""
    try:
        opts = options_from_args(args)
        benchmarks = benchmarks or _names(getattr(args, "only", None), BENCHMARKS, "--only")
    except ValueError as err:
        print(f"moe-engine bench: error: {err}", file=sys.stderr)
        return 2
    if args.out:
        out = Path(args.out)
    else:
        name = torch.cuda.get_device_name(opts.device) if opts.device.type == "cuda" else "cpu"
        out = default_out_path(name, opts.device.type, now())
    png = None if args.no_plot or "layer" not in benchmarks else out.with_suffix(".png")
    with _cpu_threads(opts.device, args.threads or (1 if args.quick else None)):
        report = measure_all(args, opts, benchmarks, out, png)
    say(f"\nwrote {out}" + (f" and {report['plot']}" if report["plot"] else "") + f" in {report['wall_seconds']:.1f} s")
    return 0


def main(argv: list[str] | None = None, benchmarks: tuple[str, ...] | None = None, prog: str = "moe-engine bench") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    add_arguments(parser, with_only=benchmarks is None)
    return run(parser.parse_args(argv), benchmarks)
