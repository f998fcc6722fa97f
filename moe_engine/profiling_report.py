"""Turn a torch.profiler Chrome trace into `moe-engine profile`'s per-category step-time table.

Every microsecond of a profiled step goes to exactly one category, so the categories add up to
the step:

- On CPU the step is the host thread's time. Each op's *self* time (its span minus its children's)
  goes to the op's category; the Python time between ops inside a range goes to that range's.
- On CUDA the step is the device's time over the step's span. Each kernel or copy goes to the
  category of the host op that launched it; where kernels of several streams overlap, the time
  is split evenly among them, and time no kernel runs is `idle` (the device waiting for the host).

An op's category is, in this order: a range it opens itself (the `moe::*` record_function ranges
in moe_engine.layer, moe_engine.experts, moe_engine.parallel.all_to_all, and the ones
moe_engine.profiling adds around routers and attention modules), a rule on its name (the
optimizer's own ranges, the aux-loss ops, attention kernels), for a backward node the category of
the forward op that recorded the same autograd sequence number, else its parent's. What is left
is `rest`, except after the step's last backward node, where it is `optimizer` (gradient
clipping, optimizer and scheduler step).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

STEP_RANGE = "moe_engine::profile_step"
CATEGORIES = ("router", "permute", "gemm", "all_to_all", "combine", "aux_loss", "attention", "optimizer", "rest", "idle")
LABELS = {
    "router": "router",
    "permute": "permute (dispatch)",
    "gemm": "grouped GEMMs (expert MLPs)",
    "all_to_all": "all-to-all",
    "combine": "combine / unpermute",
    "aux_loss": "aux losses",
    "attention": "attention",
    "optimizer": "optimizer",
    "rest": "rest",
    "idle": "device idle",
}
RANGE_CATEGORIES = {
    "moe::router": "router",
    "moe::permute": "permute",
    "moe::experts": "gemm",
    "moe::all_to_all": "all_to_all",
    "moe::combine": "combine",
    "moe::aux_loss": "aux_loss",
    "moe::attention": "attention",
}
BACKWARD_PREFIX = "autograd::engine::evaluate_function"
DEVICE_CATS = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
_NOT_HOST_CATS = DEVICE_CATS | {"gpu_user_annotation", "Trace", "ac2g", "fwdbwd"}
_AUX_LOSS_OPS = ("balance_loss", "z_loss", "cv_squared")
_ATTENTION_OPS = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention")
_ALL_TO_ALL_OPS = ("all_to_all", "alltoall")
_ALL_REDUCE_OPS = ("all_reduce", "allreduce")
# Matmul-like ops whose FLOPs follow from their recorded input shapes (counted once: never inside another).
_SDPA_FORWARD = "aten::scaled_dot_product_attention"
_MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm", _SDPA_FORWARD})


class _Event:
    """One host event of the trace, placed in its thread's call tree."""

    __slots__ = ("name", "annotation", "tid", "start", "end", "seq", "ext", "dims", "parent", "children", "depth",
                 "category", "backward")

    def __init__(self, raw: dict[str, Any]) -> None:
        args = raw.get("args") or {}
        self.name: str = raw["name"]
        self.annotation = raw.get("cat") == "user_annotation"  # a record_function range, not an op
        self.tid = (raw.get("pid"), raw.get("tid"))
        self.start = float(raw["ts"])
        self.end = self.start + float(raw.get("dur", 0.0))
        self.seq = args.get("Sequence number")
        self.ext = args.get("External id") if raw.get("cat") != "cuda_runtime" else None
        self.dims = args.get("Input Dims")
        self.parent: _Event | None = None
        self.children: list[_Event] = []
        self.depth = 0
        self.category: str | None = None
        self.backward = False

    def self_intervals(self) -> Iterable[tuple[float, float]]:
        """The parts of this event's span that none of its children covers."""
        cursor = self.start
        for child in self.children:
            if child.start > cursor:
                yield cursor, child.start
            cursor = max(cursor, child.end)
        if self.end > cursor:
            yield cursor, self.end


@dataclass
class StepBreakdown:
    """One profiled step: microseconds per category and per (category, op), FLOPs from op shapes."""

    span_us: float
    on_device: bool
    category_us: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    op_us: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    op_calls: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    shape_flops: dict[str, float] = field(default_factory=lambda: defaultdict(float))


def _name_category(name: str) -> str | None:
    if name in RANGE_CATEGORIES:
        return RANGE_CATEGORIES[name]
    if name.startswith("Optimizer."):  # torch.optim's own ranges: Optimizer.step#AdamW.step, Optimizer.zero_grad#...
        return "optimizer"
    low = name.lower()
    if name.startswith("moe_engine::") and any(k in low for k in _AUX_LOSS_OPS):
        return "aux_loss"
    if any(k in low for k in _ATTENTION_OPS):
        return "attention"
    if any(k in low for k in _ALL_TO_ALL_OPS):
        return "all_to_all"
    if any(k in low for k in _ALL_REDUCE_OPS):
        return "rest"  # gradient and metric all-reduces: not the optimizer, even after the backward
    return None


def _build_trees(raw_events: list[dict[str, Any]], host_pids: set[Any]) -> list[_Event]:
    """Host events (of the processes in host_pids), each with parent and children on its own
    thread, in start order."""
    events = [
        _Event(e) for e in raw_events
        if e.get("ph") == "X" and e.get("pid") in host_pids and e.get("cat") not in _NOT_HOST_CATS
    ]
    events.sort(key=lambda e: (e.tid, e.start, -e.end))
    stack: list[_Event] = []
    for event in events:
        while stack and (stack[-1].tid != event.tid or stack[-1].end <= event.start):
            stack.pop()
        if stack:
            parent = stack[-1]
            event.end = min(event.end, parent.end)  # a child never outlives its parent (clock rounding)
            event.parent, event.depth = parent, parent.depth + 1
            parent.children.append(event)
        stack.append(event)
    events.sort(key=lambda e: (e.start, e.depth))  # parents before their children, even at the same start
    return events


def _categorize(events: list[_Event]) -> None:
    """Set every event's category (None: rest) and backward flag; events are in start order, so
    parents come before children and forward ops before the backward nodes they created."""
    forward_category: dict[int, str | None] = {}
    for event in events:
        parent = event.parent
        event.backward = event.name.startswith(BACKWARD_PREFIX) or (parent is not None and parent.backward)
        own = _name_category(event.name)
        if own is None and event.name.startswith(BACKWARD_PREFIX) and event.seq in forward_category:
            own = forward_category[event.seq]
        event.category = own if own is not None else (parent.category if parent is not None else None)
        if not event.backward and event.seq is not None and event.seq >= 0:
            # The last forward op recording a sequence number is the one that created that autograd node.
            forward_category[event.seq] = event.category


def _shape_flops(event: _Event) -> float:
    """FLOPs of a matmul-like op from its input shapes (0 when the shapes do not say)."""
    dims = event.dims or []
    if event.name == _SDPA_FORWARD and len(dims) >= 2 and len(dims[0]) == 4 and len(dims[1]) == 4:
        B, H, Sq, d = dims[0]
        return 4.0 * B * H * Sq * dims[1][2] * d  # Q K^T and P V
    if "_scaled_dot_product" in event.name and event.name.endswith("_backward") and len(dims) >= 3:
        q, k = dims[1], dims[2]
        if len(q) == 4 and len(k) == 4:
            return 8.0 * q[0] * q[1] * q[2] * k[2] * q[3]  # dQ, dK, dV, dP
        return 0.0
    if event.name not in _MATMUL_OPS:
        return 0.0
    a, b = (dims[1], dims[2]) if event.name in ("aten::addmm", "aten::baddbmm") and len(dims) >= 3 else (dims + [[], []])[:2]
    if len(a) == 2 and len(b) in (2, 3):  # (M, K) x (K, N) or (M, K) x (E, K, N): rows or K split into groups
        return 2.0 * a[0] * a[1] * b[-1]
    if len(a) == 3 and len(b) == 3:  # batched (E, M, K) x (E, K, N)
        return 2.0 * a[0] * a[1] * a[2] * b[2]
    return 0.0


def _counted_flops(event: _Event) -> float:
    """Shape FLOPs of an op unless an enclosing op already counts them (sdpa's inner bmm)."""
    flops = _shape_flops(event)
    if flops:
        parent = event.parent
        while parent is not None:
            if _shape_flops(parent):
                return 0.0
            parent = parent.parent
    return flops


def _step_category(event: _Event, start: float, backward_end: float | None) -> str:
    if event.category is not None:
        return event.category
    return "optimizer" if backward_end is not None and start >= backward_end else "rest"


def _subtree(root: _Event) -> Iterable[_Event]:
    stack = [root]
    while stack:
        event = stack.pop()
        yield event
        stack.extend(event.children)


def _host_breakdown(step: _Event, backward_end: float | None) -> StepBreakdown:
    """Self time of every event under the step range, by category and op."""
    result = StepBreakdown(span_us=step.end - step.start, on_device=False)
    for event in _subtree(step):
        name = "(python, outside ops)" if event is step else f"{event.name} (python)" if event.annotation else event.name
        touched = set()
        for lo, hi in event.self_intervals():
            if backward_end is not None and event.category is None and lo < backward_end < hi:
                pieces = ((lo, backward_end), (backward_end, hi))
            else:
                pieces = ((lo, hi),)
            for a, b in pieces:
                category = _step_category(event, a, backward_end)
                result.category_us[category] += b - a
                result.op_us[(category, name)] += b - a
                touched.add(category)
        for category in touched:
            result.op_calls[(category, name)] += 1
    return result


def _device_breakdown(
    step: _Event, device_events: list[dict[str, Any]], launcher: dict[int, _Event], backward_end: float | None
) -> StepBreakdown:
    """Device time over the step's span: kernels by the category of the op that launched them,
    overlapping kernels sharing their common time evenly, the uncovered time idle."""
    result = StepBreakdown(span_us=step.end - step.start, on_device=True)
    spans = []
    for raw in device_events:
        lo, hi = max(float(raw["ts"]), step.start), min(float(raw["ts"]) + float(raw.get("dur", 0.0)), step.end)
        if hi <= lo:
            continue
        host = launcher.get((raw.get("args") or {}).get("External id"))
        category = _step_category(host, host.start, backward_end) if host is not None else "rest"
        name = raw["name"] if len(raw["name"]) <= 80 else raw["name"][:77] + "..."
        spans.append((lo, hi, category, name))
        result.op_calls[(category, name)] += 1
    boundaries = sorted({step.start, step.end, *(s[0] for s in spans), *(s[1] for s in spans)})
    spans.sort()
    active: list[tuple[float, float, str, str]] = []
    next_span = 0
    for lo, hi in zip(boundaries, boundaries[1:]):
        while next_span < len(spans) and spans[next_span][0] <= lo:
            active.append(spans[next_span])
            next_span += 1
        active = [s for s in active if s[1] > lo]
        if not active:
            result.category_us["idle"] += hi - lo
            result.op_us[("idle", "(no kernel running)")] += hi - lo
            continue
        share = (hi - lo) / len(active)
        for _, _, category, name in active:
            result.category_us[category] += share
            result.op_us[(category, name)] += share
    return result


def analyze_trace(raw_events: list[dict[str, Any]], step_range: str = STEP_RANGE) -> list[StepBreakdown]:
    """One StepBreakdown per `step_range` range of the trace (the Chrome trace's traceEvents).

    Device time is used when the trace holds device kernels, host time otherwise. FLOPs of
    matmul-like ops (mm, addmm, bmm, baddbmm, _grouped_mm, scaled_dot_product_attention and its
    backward) come from their recorded shapes, by category.
    """
    # Device events carry the device index as their pid: the host process is the one holding the steps.
    host_pids = {e.get("pid") for e in raw_events if e.get("ph") == "X" and e.get("name") == step_range}
    events = _build_trees(raw_events, host_pids)
    _categorize(events)
    device_events = [e for e in raw_events if e.get("ph") == "X" and e.get("cat") in DEVICE_CATS]
    launcher: dict[int, _Event] = {}
    for event in events:
        if event.ext is not None:
            launcher.setdefault(event.ext, event)
    steps = [e for e in events if e.name == step_range and e.parent is None]
    if not steps:
        raise ValueError(f"the trace holds no {step_range!r} range: was it recorded around the profiled steps?")
    breakdowns = []
    for step in steps:
        inside = [e for e in events if step.start <= e.start < step.end]
        backward_ends = [e.end for e in inside if e.name.startswith(BACKWARD_PREFIX)]
        backward_end = max(backward_ends) if backward_ends else None
        if device_events:
            breakdown = _device_breakdown(step, device_events, launcher, backward_end)
        else:
            breakdown = _host_breakdown(step, backward_end)
        for event in inside:
            flops = _counted_flops(event)
            if flops:
                breakdown.shape_flops[_step_category(event, event.start, backward_end)] += flops
        breakdowns.append(breakdown)
    return breakdowns


# ------------------------------------------------------------------------------------------- the table


def build_table(
    breakdowns: list[StepBreakdown],
    wall_step_s: float,
    model_flops: dict[str, float],
    bytes_moved: dict[str, float],
    top_ops: int = 3,
) -> dict[str, Any]:
    """The per-step averages as a JSON-ready table.

    wall_step_s: the measured wall time of a profiled step (mean). model_flops: FLOPs per step
    by category known from the model (the expert GEMMs from tokens_per_expert), taking precedence
    over the FLOPs read from op shapes. bytes_moved: bytes per step by category (permute, combine,
    all-to-all), for GB/s.
    """
    n = len(breakdowns)
    seconds = {c: sum(b.category_us.get(c, 0.0) for b in breakdowns) / n / 1e6 for c in CATEGORIES}
    span_s = sum(b.span_us for b in breakdowns) / n / 1e6
    rows = []
    for category in CATEGORIES:
        time_s = seconds[category]
        if category == "idle" and time_s == 0.0:
            continue
        shape_flops = sum(b.shape_flops.get(category, 0.0) for b in breakdowns) / n
        flops = model_flops.get(category, shape_flops)
        moved = bytes_moved.get(category)
        ops = defaultdict(float)
        calls = defaultdict(int)
        for b in breakdowns:
            for (c, name), us in b.op_us.items():
                if c == category:
                    ops[name] += us / n / 1e6
            for (c, name), count in b.op_calls.items():
                if c == category:
                    calls[name] += count
        top = sorted(ops.items(), key=lambda kv: -kv[1])[:top_ops]
        rows.append({
            "category": category,
            "label": LABELS[category],
            "seconds_per_step": time_s,
            "share": time_s / wall_step_s if wall_step_s > 0 else float("nan"),
            "flops_per_step": flops or None,
            "flops_source": ("model (tokens_per_expert)" if category in model_flops else "op shapes") if flops else None,
            "shape_flops_per_step": shape_flops or None,
            "tflops": flops / time_s / 1e12 if flops and time_s > 0 else None,
            "bytes_per_step": moved,
            "gbps": moved / time_s / 1e9 if moved and time_s > 0 else None,
            "top_ops": [{"op": name, "seconds_per_step": s, "calls_per_step": calls[name] / n} for name, s in top],
        })
    total = sum(r["seconds_per_step"] for r in rows)
    return {
        "rows": rows,
        "categories_sum_s": total,
        "profiled_span_s": span_s,
        "wall_step_s": wall_step_s,
        "gap_s": wall_step_s - total,
        "gap_share": (wall_step_s - total) / wall_step_s if wall_step_s > 0 else float("nan"),
    }


def _throughput(row: dict[str, Any]) -> str:
    if row["tflops"] is not None:
        return f"{row['tflops']:.3g} TFLOP/s" if row["tflops"] >= 1 else f"{1e3 * row['tflops']:.3g} GFLOP/s"
    if row["gbps"] is not None:
        return f"{row['gbps']:.3g} GB/s"
    return "-"


def format_table(table: dict[str, Any], timeline: str) -> str:
    """The table as printed: one line per category with its top ops below, then the totals."""
    lines = [f"per-step time by category ({timeline}); share of the measured wall step time",
             f"{'category':<30} {'ms/step':>9} {'share':>7}  throughput"]
    for row in table["rows"]:
        lines.append(f"{row['label']:<30} {1e3 * row['seconds_per_step']:>9.3f} {row['share']:>7.1%}  {_throughput(row)}")
        for op in row["top_ops"]:
            if op["seconds_per_step"] > 0:
                name = op["op"] if len(op["op"]) <= 52 else op["op"][:49] + "..."
                lines.append(f"    {name:<52} {1e3 * op['seconds_per_step']:>8.3f} ms  x{op['calls_per_step']:.0f}")
    lines.append("-" * 62)
    lines.append(f"{'sum of categories':<30} {1e3 * table['categories_sum_s']:>9.3f} {table['categories_sum_s'] / table['wall_step_s']:>7.1%}")
    lines.append(f"{'measured step time (wall)':<30} {1e3 * table['wall_step_s']:>9.3f}")
    lines.append(f"{'gap (wall - sum)':<30} {1e3 * table['gap_s']:>9.3f} {table['gap_share']:>7.1%}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    # The Agg canvas directly, not pyplot: no global backend switch, no figure registry.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_expert_load(tokens_per_expert_LE: list[list[float]], path: Path, title: str) -> None:
    """One bar chart per routing decision (MoE layer, in model.routers order): tokens per expert,
    the mean as a dashed line."""
    num_layers = max(1, len(tokens_per_expert_LE))
    fig = _figure(max(6.0, 0.35 * max((len(r) for r in tokens_per_expert_LE), default=8) + 2), 1.9 * num_layers + 0.8)
    for layer, counts_E in enumerate(tokens_per_expert_LE):
        ax = fig.add_subplot(num_layers, 1, layer + 1)
        ax.bar(range(len(counts_E)), counts_E, color="C0")
        if counts_E:
            ax.axhline(sum(counts_E) / len(counts_E), color="k", linestyle="--", linewidth=0.8)
        ax.set_ylabel(f"layer {layer}\ntokens", fontsize=8)
        ax.set_xticks(range(len(counts_E)))
        ax.tick_params(labelsize=7)
    if fig.axes:
        fig.axes[-1].set_xlabel("expert")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_imbalance(imbalance_L: list[float], path: Path, title: str) -> None:
    """max / mean tokens per expert of each routing decision (1.0: perfectly balanced)."""
    fig = _figure(max(5.0, 0.6 * len(imbalance_L) + 2), 3.2)
    ax = fig.add_subplot()
    ax.bar(range(len(imbalance_L)), imbalance_L, color="C3")
    ax.axhline(1.0, color="k", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(imbalance_L)), [f"layer {i}" for i in range(len(imbalance_L))], fontsize=8)
    ax.set_ylabel("max / mean tokens per expert")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def imbalance(counts_E: list[float]) -> float:
    """max / mean of one layer's counts (nan when it routed nothing)."""
    total = sum(counts_E)
    return max(counts_E) / (total / len(counts_E)) if counts_E and total > 0 else math.nan
