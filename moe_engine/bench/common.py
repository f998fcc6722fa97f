"""What every benchmark shares: timing, output agreement, device and version facts, JSON, plot, table.

Timing (`measure`): on CUDA, CUDA events around each run after one untimed call (compiles and
autotuning happen there) and a warm-up, with L2 flushed before every timed run, as
`triton.testing.do_bench` does, but with at least `min_reps` timed runs (do_bench takes as many as fit
its budget, one for a 75 ms layer); we keep the median with the 20th and 80th percentiles. On CPU a
`time.perf_counter` median over a few runs after at least one untimed warm-up call.
Agreement (`compare`): the largest absolute difference, and that difference relative to the
largest reference magnitude, over the tokens both sides must agree on.
"""

from __future__ import annotations

import datetime as _dt
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import time
import traceback
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

SCHEMA = "moe_engine.bench/1"
# What the CUDA timer writes over before every timed run so no input stays in L2 (H100: 50 MB of L2).
L2_FLUSH_BYTES = 256 * 2**20
# Relative tolerance of an output against the fp32 reference (max |out - ref| / max |ref|).
TOLERANCES = types.MappingProxyType({torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2})


@dataclass(frozen=True)
class TimingSettings:
    """CPU: `warmup` untimed calls (at least 1), then `reps` timed ones. CUDA: warm-up and timing budgets
    in ms; the timed runs are as many as fit rep_ms, but at least min_reps and at most max_reps."""

    warmup: int = 1
    reps: int = 5
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_reps: int = 10
    max_reps: int = 1000


@dataclass(frozen=True)
class BenchOptions:
    """What one `moe-engine bench` run measures, parsed from the command line."""

    device: torch.device
    shapes: tuple[Any, ...]
    routings: tuple[str, ...]
    peers: tuple[str, ...]
    timing: TimingSettings
    seed: int = 0


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int = 0


def _summary(times_ms: list[float]) -> Timing:
    times = sorted(times_ms)
    pick = lambda q: times[min(len(times) - 1, int(q * (len(times) - 1) + 0.5))]  # noqa: E731
    return Timing(statistics.median(times), pick(0.2), pick(0.8), len(times))


def _measure_cuda(fn: Callable[[], Any], device: torch.device, settings: TimingSettings) -> Timing:
    fn()  # untimed: compiles, autotunes, allocates
    torch.cuda.synchronize(device)
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    # One timed call to size the rest (a loop-like peer takes seconds a call at the big shapes: every
    # call counts), then warm-up calls for warmup_ms (none for a call that long already).
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    flush.zero_()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(device)
    estimate_ms = max(start.elapsed_time(end), 1e-3)
    for _ in range(min(settings.max_reps, int(settings.warmup_ms / estimate_ms))):
        fn()
    reps = min(settings.max_reps, max(settings.min_reps, int(settings.rep_ms / estimate_ms)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return _summary([s.elapsed_time(e) for s, e in zip(starts, ends)])


def measure(fn: Callable[[], Any], device: torch.device, settings: TimingSettings) -> Timing:
    """Time `fn` (never its first call) and return the median, the 20th/80th percentiles in ms and the
    number of timed runs."""
    if device.type == "cuda":
        return _measure_cuda(fn, device, settings)
    for _ in range(max(1, settings.warmup)):
        fn()
    times = []
    for _ in range(max(1, settings.reps)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return _summary(times)


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Bytes allocated at the peak of one call beyond what was allocated before it (CUDA only; None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - before)


def free_memory(device: torch.device, collect: bool = True) -> None:
    """On CUDA, drop what the last path left behind so the next one starts from the same memory.

    collect: run the garbage collector first, for paths whose modules hold reference cycles
    (DeepSpeed's, megatron-core's); a pass over the heap they bring costs ~0.3 s, so the micro
    benchmarks' plain tensors skip it. (Nothing on CPU, for the same cost.)
    """
    if device.type == "cuda":
        if collect:
            gc.collect()
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class Agreement:
    """max_abs: max |out - ref|; max_rel: max_abs / max |ref|, both over the compared rows (tokens).

    ok: both finite, shapes equal, and max_rel <= tol. excluded_rows: rows left out (near-tie tokens).
    """

    max_abs: float | None
    max_rel: float | None
    tol: float
    compared_rows: int
    excluded_rows: int
    ok: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def compare(out: torch.Tensor, ref: torch.Tensor, tol: float, keep_T: torch.Tensor | None = None) -> Agreement:
    """Agreement of `out` with `ref` (first dim: tokens), over the rows where keep_T is True.

    The error is taken relative to the largest reference magnitude, not element by element: an
    element-wise ratio explodes where the reference crosses zero and says nothing there.
    """
    if keep_T is None:
        keep_T = torch.ones(ref.shape[0], dtype=torch.bool, device=ref.device)
    excluded = int((~keep_T).sum())
    if out.shape != ref.shape:
        return Agreement(None, None, tol, 0, excluded, False)
    keep_T = keep_T.to(ref.device)
    diff = (out.detach().to(ref.device).double() - ref.double())[keep_T]
    scale = ref.double()[keep_T].abs()
    compared = int(keep_T.sum())
    if diff.numel() == 0:
        return Agreement(0.0, 0.0, tol, compared, excluded, True)
    finite = bool(torch.isfinite(diff).all())
    max_abs = float(diff.abs().max()) if finite else None
    max_rel = max_abs / max(float(scale.max()), 1e-30) if finite else None
    return Agreement(max_abs, max_rel, tol, compared, excluded, finite and max_rel <= tol)


def describe_error(err: BaseException) -> str:
    """'Type: message (at file:line in function)' of the innermost frame, for the JSON and the table."""
    message = "".join(traceback.format_exception_only(type(err), err)).strip()
    frames = traceback.extract_tb(err.__traceback__)
    if frames:
        last = frames[-1]
        message += f" (at {Path(last.filename).name}:{last.lineno} in {last.name})"
    return message[:2000]


def resolve_device(name: str) -> torch.device:
    """'auto', 'cpu', 'cuda' or 'cuda:N' -> a device; CUDA devices always carry their index."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r}: {err}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name!r}: CUDA is not available here")
        return torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
    if device.type != "cpu":
        raise ValueError(f"--device {name!r}: allowed: auto, cpu, cuda, cuda:N")
    return device


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(device),
            "capability": list(torch.cuda.get_device_capability(device)),
            "memory_bytes": int(props.total_memory),
            "multiprocessors": int(props.multi_processor_count),
        }
    return {
        "type": "cpu",
        "name": _cpu_name(),
        "processor": platform.processor(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Versions read from package metadata, so DeepSpeed and megatron-core are not imported for it."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "deepspeed": _version("deepspeed"),
        "megatron_core": _version("megatron-core"),
        "transformers": _version("transformers"),
        "moe_engine": _version("moe-engine"),
    }


def kernel_backend_info(device: torch.device) -> dict[str, Any]:
    """MOE_ENGINE_KERNELS as set, and what an op with a Triton kernel resolves to on this device."""
    from moe_engine.kernels import ENV_VAR, requested_backend, select_backend
    from moe_engine.kernels._triton import TRITON_AVAILABLE, interpreting

    info: dict[str, Any] = {"env_var": ENV_VAR, "env": os.environ.get(ENV_VAR), "triton_interpreter": interpreting()}
    try:
        info["requested"] = requested_backend()
        info["backend"] = select_backend("bench", device, has_triton=TRITON_AVAILABLE)
    except (ValueError, RuntimeError) as err:
        info["backend"] = None
        info["error"] = str(err)
    return info


def copy_bandwidth_gbps(device: torch.device, settings: TimingSettings, nbytes: int) -> float:
    """Device copy bandwidth, bytes read + written per second, the ceiling of data-movement kernels."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device, settings)
    return gbps(2 * src.numel() * 4, timing.median_ms)


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / ms / 1e6


def tflops(flops: int, ms: float | None) -> float | None:
    return None if ms is None or ms <= 0 else flops / ms / 1e9


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def default_out_path(device_name: str, device_type: str, when: _dt.datetime) -> Path:
    """benchmarks/results/<gpu name or 'cpu'>-<date>.json under the working directory; -2, -3... if taken."""
    stem = f"{_slug(device_name) if device_type == 'cuda' else 'cpu'}-{when.date().isoformat()}"
    folder = Path("benchmarks") / "results"
    path = folder / f"{stem}.json"
    n = 2
    while path.exists():
        path = folder / f"{stem}-{n}.json"
        n += 1
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json(report: dict[str, Any], path: Path) -> None:
    """`report` as JSON at `path`, replaced atomically (a run killed mid-write keeps the previous file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def plot_layer_tflops(records: list[dict[str, Any]], title: str, path: Path) -> None:
    """Grouped bars: fwd+bwd TFLOP/s of every path, one group per (shape, routing); skipped paths show none."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths = []
    for record in records:
        paths += [p for p, e in record["paths"].items() if p not in paths and e.get("fwd_bwd_tflops") is not None]
    groups = [f"{r['shape']}\n{r['dtype']} {r['routing']}" for r in records]
    width = 0.8 / max(1, len(paths))
    fig = Figure(figsize=(max(6.0, 1.6 * len(groups) + 2), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, name in enumerate(paths):
        xs, heights = [], []
        for g, record in enumerate(records):
            value = record["paths"].get(name, {}).get("fwd_bwd_tflops")
            if value is not None:
                xs.append(g + (i - (len(paths) - 1) / 2) * width)
                heights.append(value)
        drops = any(r["paths"].get(name, {}).get("notes", {}).get("drops_tokens") for r in records)
        ax.bar(xs, heights, width=width, label=f"{name} (cf=1, drops tokens)" if drops else name, color=f"C{i}")
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylabel("fwd+bwd useful TFLOP/s (18·T·K·D·F / time)")
    ax.set_title(title, fontsize=9)
    if paths:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside, then renamed: a run killed mid-write (a time limit) keeps the previous plot.
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=120, format="png")
    os.replace(tmp, path)


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """Plain columns: text left-aligned, numbers right-aligned, None as '-'."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e5 else f"{v:.2f}"
        return str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) for i in range(len(headers))]
    fmt = lambda cells: "  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cells, widths, numeric))  # noqa: E731
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths]), *(fmt(r) for r in text)])


def now() -> _dt.datetime:
    return _dt.datetime.now().astimezone()


def say(text: str) -> None:
    print(text, flush=True)
