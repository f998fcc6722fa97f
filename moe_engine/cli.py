"""`moe-engine`: the command line.

    moe-engine train [--config PATH] [--set a.b.c=VALUE ...] [--resume [CHECKPOINT]] [--overwrite] [--baselines JSON]
    moe-engine finetune --from CHECKPOINT [--config PATH] [--freeze experts,routers,backbone] [--set ...] [--baselines JSON]
    moe-engine baselines [--config PATH] [--set ...] [--out JSON]   train each task alone (for Delta_p)
    moe-engine convert --from-hf HF_DIR --out MODEL.pt | --to-hf MODEL.pt --out HF_DIR   Hugging Face checkpoints
    moe-engine profile [--config PATH] [--set ...] [--steps N] [--out DIR]   per-op time table, trace, expert load
    moe-engine config [--config PATH] [--set ...]      print the resolved config as YAML
    moe-engine bench [--quick] [--shapes ...] [--routing ...] [--out PATH]   benchmark vs peers

Errors a user can fix (a config value, a checkpoint that does not fit, a run directory in use)
print one line naming the problem and exit with status 2, before any training starts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moe_engine.config import Config, ConfigError, load_config
from moe_engine.routing import PLAIN_ROUTER_TYPES

if TYPE_CHECKING:
    from moe_engine.train import Trainer, TrainResult


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH", help="YAML run config (default: the embedded default job)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config field, e.g. --set moe.num_experts=16 (repeatable)",
    )


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="start over in a train.out_dir that holds checkpoints")
    parser.add_argument(
        "--baselines", metavar="JSON",
        help="single-task results (from `moe-engine baselines`) to report Delta_p against",
    )
    parser.add_argument(
        "--deepspeed_config", "--deepspeed-config", metavar="JSON",
        help="train under DeepSpeed's engine with this config (same as --set parallel.deepspeed_config=JSON)",
    )
    # The deepspeed launcher passes --local_rank to every rank; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-engine", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train the multi-task MoE model")
    _add_config_args(train)
    train.add_argument(
        "--resume", nargs="?", const="auto", metavar="CHECKPOINT",
        help="continue from a checkpoint file or run directory; alone: the newest in train.out_dir, if any",
    )
    _add_run_args(train)
    finetune = commands.add_parser(
        "finetune", help="fine-tune a pre-trained checkpoint on new tasks or a subset (without --from: train from scratch)",
    )
    _add_config_args(finetune)
    finetune.add_argument(
        "--resume", nargs="?", const="auto", metavar="CHECKPOINT",
        help="continue an interrupted fine-tuning run (its own checkpoints, not the pre-trained one)",
    )
    finetune.add_argument("--from", dest="init_from", metavar="CHECKPOINT",
                          help="pre-trained checkpoint file, folder or run directory (sets finetune.init_from)")
    finetune.add_argument("--freeze", metavar="GROUPS", help="comma-separated: experts, routers, backbone (sets finetune.freeze)")
    _add_run_args(finetune)
    baselines = commands.add_parser("baselines", help="train every task of a config alone: the single-task baselines of Delta_p")
    _add_config_args(baselines)
    baselines.add_argument("--out", metavar="JSON", help="where to write the baselines (default: train.out_dir/baselines.json)")
    show = commands.add_parser("config", help="print the resolved config as YAML")
    _add_config_args(show)
    from moe_engine.mtl.mmoe_experiment import DESCRIPTION as MMOE_DESCRIPTION, add_arguments as add_mmoe_arguments

    mmoe = commands.add_parser("mmoe-synthetic", help="MMoE vs OMoE vs shared-bottom on the MMoE paper's synthetic tasks",
                               description=MMOE_DESCRIPTION)
    add_mmoe_arguments(mmoe)
    convert = commands.add_parser("convert", help="Hugging Face MoE checkpoints (Mixtral, Qwen2/3-MoE, OLMoE) to moe_engine and back")
    from moe_engine.hf.convert import add_arguments as add_convert_arguments

    add_convert_arguments(convert)
    profile = commands.add_parser("profile", help="profile a few training steps: per-op table, Chrome trace, expert-load plots")
    from moe_engine.profiling import add_arguments as add_profile_arguments

    add_profile_arguments(profile)
    bench = commands.add_parser("bench", help="benchmark our MoE layer and kernels against their peers")
    from moe_engine.bench import add_arguments as add_bench_arguments

    add_bench_arguments(bench)
    return parser


def _task_expert_lines(task_names: list[str], counts_LXE) -> list[str]:
    """Which experts each task's test tokens went to (share of its choices), per MoE layer: how a
    task-conditional router has split the experts among the tasks."""
    lines = ["\nexperts each task uses on the test split (expert:share of the task's choices)"]
    for layer, counts_XE in enumerate(counts_LXE.tolist()):
        for name, counts_E in zip(task_names, counts_XE):
            total = max(sum(counts_E), 1)
            used = [(e, c / total) for e, c in enumerate(counts_E) if c]
            cells = " ".join(f"{e}:{share:.0%}" for e, share in used)
            lines.append(f"moe layer {layer} {name:<8} {len(used)} experts  {cells}")
    return lines


def format_report(cfg: Config, trainer: Trainer, result: TrainResult, delta: dict[str, Any] | None = None) -> str:
    """The end-of-run summary: per-task results against chance (and single-task baselines), tokens per
    expert, where files went."""
    workload = trainer.workload
    ranks = f" x {trainer.run_info.world_size} ranks" if trainer.run_info.world_size > 1 else ""
    lines = [f"\ntrained {result.step} steps in {result.wall_seconds:.1f} s on {trainer.device}{ranks}"]
    if trainer.frozen is not None:
        lines.append(trainer.frozen.describe())
    baseline = delta["baselines"] if delta else {}
    lines.append(f"{'task':<12} {'metric':<9} {'result':>7} {'chance':>7}" + (f" {'single':>7}" if baseline else "") + "  description")
    chance, descriptions = workload.chance(), workload.descriptions()
    for name, metric in workload.primary_metrics().items():
        value = result.eval_metrics[f"{metric}_{name}"]
        single = baseline.get(name, {}).get(metric)
        single_cell = (f" {single:>7.3f}" if single is not None else f" {'-':>7}") if baseline else ""
        lines.append(f"{name:<12} {metric:<9} {value:>7.3f} {chance.get(name, float('nan')):>7.3f}{single_cell}  "
                     f"{descriptions.get(name, '')}")
    if delta:
        lines.append(f"Delta_p against the single-task baselines: {delta['delta_p']:+.2f} % (over {', '.join(delta['tasks'])})")
    counts_LE = result.tokens_per_expert_LE
    top_k = getattr(trainer.model.routers[0], "top_k", cfg.moe.router.top_k) if trainer.model.routers else cfg.moe.router.top_k
    how = ("each expert picks its tokens, on average " if cfg.moe.router.type == "expert_choice" else "top-") + f"{top_k}"
    lines.append(f"\ntokens per expert on the test split ({how} choices, {cfg.moe.num_experts} experts)")
    for layer, counts_E in enumerate(counts_LE.tolist()):
        total = max(sum(counts_E), 1)
        imbalance = max(counts_E) / (total / len(counts_E))
        cells = " ".join(f"{c:>6}" for c in counts_E)
        lines.append(f"moe layer {layer}: {cells}   max/mean {imbalance:.2f}")
    if cfg.moe.router.type not in PLAIN_ROUTER_TYPES:
        lines.extend(_task_expert_lines(trainer.task_names, result.tokens_per_task_expert_LXE))
    outputs = "train.csv, eval.csv, tensorboard/, checkpoints/, results.json"
    if cfg.logging.routing_telemetry and counts_LE.numel():
        outputs += ", routing.csv, routing/ (task x expert heatmaps)"
    lines.append(f"\nrun directory: {trainer.out_dir} ({outputs})")
    return "\n".join(lines)


def primary_results(trainer: Trainer, result: TrainResult) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of each task's primary metric on the test split."""
    return {name: {metric: result.eval_metrics[f"{metric}_{name}"]} for name, metric in trainer.workload.primary_metrics().items()}


def read_baselines(baselines_file: str, task_names: list[str]) -> dict[str, Any]:
    """The "results" of a `moe-engine baselines` file, checked before any training: valid JSON, a
    results mapping, and at least one of this run's tasks. Raises FileNotFoundError or ValueError."""
    path = Path(baselines_file)
    if not path.is_file():
        raise FileNotFoundError(f"--baselines {baselines_file!r}: no such file (make one with `moe-engine baselines`)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"--baselines {baselines_file!r}: not valid JSON ({err})") from err
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, dict):
        raise ValueError(f"--baselines {baselines_file!r}: no \"results\" mapping (what `moe-engine baselines` writes)")
    if not any(t in results for t in task_names):
        raise ValueError(f"--baselines {baselines_file!r} holds tasks {sorted(results)}, none of this run's {sorted(task_names)}")
    return results


def delta_against(baselines: dict[str, Any], baselines_file: str, trainer: Trainer, result: TrainResult) -> dict[str, Any]:
    """Delta_p of this run against single-task results (`read_baselines`), over the tasks both have."""
    from moe_engine.mtl.delta_p import delta_p

    ours = primary_results(trainer, result)
    tasks = [t for t in ours if t in baselines]
    directions = trainer.workload.metric_directions()
    higher_is_better = {t: {metric: directions[metric] for metric in ours[t]} for t in tasks}
    value = delta_p({t: baselines[t] for t in tasks}, {t: ours[t] for t in tasks}, higher_is_better)
    return {"delta_p": value, "tasks": tasks, "baselines": baselines, "file": baselines_file}


def _train(args: argparse.Namespace) -> int:
    from moe_engine.parallel.runtime import shutdown_distributed
    from moe_engine.train import TRAINER_SETUP_ERRORS, NonFiniteLossError, Trainer, TrainingInterrupted

    # Paths and names from options, taken literally (not as YAML); they win over --set as before.
    values: dict[str, Any] = {}
    if args.deepspeed_config:
        values["parallel.deepspeed_config"] = args.deepspeed_config
    if getattr(args, "init_from", None):
        values["finetune.init_from"] = args.init_from
    if getattr(args, "freeze", None):
        values["finetune.freeze"] = [group.strip() for group in args.freeze.split(",")]
    cfg = load_config(args.config, args.overrides, values)
    try:
        # Before the Trainer, which may clear the run directory (--overwrite), and before any training:
        # a bad file would otherwise fail only after the run. The run's tasks are data.tasks, in order.
        baselines = read_baselines(args.baselines, cfg.data.tasks) if args.baselines else None
        trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
    except TRAINER_SETUP_ERRORS as err:
        print(f"moe-engine {args.command}: error: {err}", file=sys.stderr)
        return 2
    main_rank = trainer.run_info.is_main  # under a launcher, rank 0 speaks for the job
    try:
        if trainer.step and main_rank:
            print(f"resuming from {trainer.last_checkpoint} at step {trainer.step}", file=sys.stderr)
        try:
            result = trainer.run()
        except TrainingInterrupted as err:
            if main_rank:
                print(f"moe-engine train: {err}", file=sys.stderr)
            return 128 + err.signum
        except NonFiniteLossError as err:
            if main_rank:
                print(f"moe-engine train: error: {err}", file=sys.stderr)
            return 1
        if main_rank:
            delta = delta_against(baselines, args.baselines, trainer, result) if baselines is not None else None
            report = {
                "step": result.step,
                "wall_seconds": result.wall_seconds,
                "eval": result.eval_metrics,
                "results": primary_results(trainer, result),
                "chance": trainer.workload.chance(),
                "delta_p": delta["delta_p"] if delta else None,
                "finetune": {"init_from": cfg.finetune.init_from, "freeze": cfg.finetune.freeze},
                "tokens_per_expert": result.tokens_per_expert_LE.tolist(),
                "tokens_per_task_expert": result.tokens_per_task_expert_LXE.tolist(),
                "checkpoint": str(result.checkpoint),
                "world_size": trainer.run_info.world_size,
            }
            (trainer.out_dir / "results.json").write_text(json.dumps(report, indent=2))
            print(format_report(cfg, trainer, result, delta))
        return 0
    finally:
        shutdown_distributed(trainer.run_info)


def _baselines(args: argparse.Namespace) -> int:
    """Train each task of the config alone, with the same settings, in train.out_dir/single_<task>;
    write {task: {metric: value}} for --baselines."""
    from moe_engine.train import TRAINER_SETUP_ERRORS, NonFiniteLossError, Trainer, TrainingInterrupted

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path(cfg.train.out_dir) / "baselines.json"
    results, runs = {}, {}
    for i, task in enumerate(cfg.data.tasks):
        run_dir = Path(cfg.train.out_dir) / f"single_{task}"
        print(f"[{i + 1}/{len(cfg.data.tasks)}] {task} alone -> {run_dir}", file=sys.stderr)
        values: dict[str, Any] = {"data.tasks": [task], "train.out_dir": str(run_dir)}  # literal, not YAML
        if cfg.data.mixing_weights is not None:
            values.update({"data.mixing_weights": None, "data.mixing": "size"})
        single_cfg = load_config(args.config, args.overrides, values)
        try:
            trainer = Trainer(single_cfg, overwrite=True)
        except TRAINER_SETUP_ERRORS as err:
            print(f"moe-engine baselines: error: {err}", file=sys.stderr)
            return 2
        try:
            result = trainer.run()
        except TrainingInterrupted as err:
            print(f"moe-engine baselines: {err} (while training {task} alone)", file=sys.stderr)
            return 128 + err.signum
        except NonFiniteLossError as err:
            print(f"moe-engine baselines: error: {err} (while training {task} alone)", file=sys.stderr)
            return 1
        results.update(primary_results(trainer, result))
        runs[task] = str(run_dir)
        print(f"    {results[task]}", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results, "runs": runs, "config": args.config, "overrides": args.overrides}, indent=2))
    print(f"single-task baselines: {out}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from moe_engine.bench import run

    return run(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "bench":
            return _bench(args)
        if args.command == "mmoe-synthetic":
            from moe_engine.mtl.mmoe_experiment import run_from_args

            return run_from_args(args)
        if args.command == "profile":
            from moe_engine.profiling import run_from_args as run_profile

            return run_profile(args)
        if args.command == "convert":
            from moe_engine.hf.convert import run_from_args as run_convert

            return run_convert(args)
        if args.command == "baselines":
            return _baselines(args)
        if args.command == "config":
            print(load_config(args.config, args.overrides).to_yaml(), end="")
            return 0
        return _train(args)
    except ConfigError as err:
        print(f"moe-engine {args.command}: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
