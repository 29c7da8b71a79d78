"""``python -m compiler <command>``: thin wrappers over the passes. Flags default to None."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from graphs.errors import YoloPruneError

EXAMPLES = """examples:
  python -m compiler compile yolov5x.pt --macs 0.5            # keep half the MACs
  python -m compiler compile yolov5s.pt --ratio 0.3 --global  # 30%% of channels, global ranking
  python -m compiler compile yolov5s.yaml --no-bench          # architecture only (random init)
  python -m compiler graph yolov5s.pt                          # show coupled channel groups
"""


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        metavar="MODEL",
        help="yolov5 release checkpoint (.pt), a yoloprune pruned .pt, or a model "
        "YAML (yolov5n/s/m/l/x[6].yaml are shipped)",
    )
    p.add_argument(
        "--imgsz",
        "--img",
        type=int,
        default=None,
        help="inference size in pixels, square (default: 640, or the checkpoint's)",
    )


def _plan_args(p: argparse.ArgumentParser) -> None:
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--ratio",
        type=float,
        default=None,
        help="fraction of channels to remove from every prunable group, in (0, 1)",
    )
    target.add_argument(
        "--macs",
        type=float,
        default=None,
        help="fraction of MACs to keep, in (0, 1), met within ±3%% (default 0.5)",
    )
    p.add_argument(
        "--importance",
        choices=["l1", "l2", "bn", "random"],
        default=None,
        help="channel score: weight L1/L2 norm over the group, BN scale, or random (default l2)",
    )
    p.add_argument(
        "--global",
        dest="global_allocation",
        action="store_true",
        help="rank channels across all groups (default: the same ratio per group)",
    )
    p.add_argument(
        "--round-to",
        type=int,
        default=None,
        help="kept channel counts are multiples of this (default 8; 32 for INT8)",
    )
    p.add_argument(
        "--max-ratio",
        type=float,
        default=None,
        help="most any one group may lose, in (0, 1) (default 0.8)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --importance random")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m compiler",
        description="yoloprune: structured channel pruning for YOLO detectors; the result is a "
        "smaller dense model, an ONNX file checked against PyTorch, and a report.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser(
        "compile",
        help="prune, export, check and report (the whole job)",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _model_args(c)
    _plan_args(c)
    c.add_argument(
        "--plan",
        type=Path,
        default=None,
        help="replay a plan JSON (from `plan` or an earlier compile) instead of planning",
    )
    c.add_argument("--out", type=Path, default=None, help="output folder (default runs/compile)")
    c.add_argument(
        "--no-bench", dest="bench", action="store_false", help="skip the latency measurement"
    )
    c.add_argument("--dynamic", action="store_true", help="ONNX with a dynamic batch axis")
    c.add_argument("--no-simplify", dest="simplify", action="store_false", help="skip onnxsim")
    c.add_argument(
        "--parity-tol",
        dest="parity_tolerance",
        type=float,
        default=None,
        help="max allowed ORT-vs-PyTorch difference (default 1e-3, see report)",
    )
    c.add_argument(
        "--threads",
        type=int,
        default=None,
        help="ONNX Runtime intra-op threads (default: all available cores)",
    )
    c.add_argument(
        "--bench-runs",
        type=int,
        default=None,
        help="timed runs per model (default 20, after 3 warm-up runs)",
    )

    g = sub.add_parser("graph", help="print the coupled channel groups of a model")
    _model_args(g)
    g.add_argument("--members", action="store_true", help="list every member of every group")

    pl = sub.add_parser("plan", help="write a pruning plan JSON without applying it")
    _model_args(pl)
    _plan_args(pl)
    pl.add_argument("--out", type=Path, required=True, help="plan JSON path to write")
    return parser


def cmd_compile(args) -> int:
    from compiler.pipeline import CompileOptions, compile_model

    fields = CompileOptions.__dataclass_fields__
    options = CompileOptions(**{k: v for k, v in vars(args).items() if k in fields})
    report = compile_model(options)
    out = options.out or Path("runs/compile")
    latency = report["latency_ms"].get("onnxruntime_cpu")
    print(
        f"params {report['params']['before']:,} -> {report['params']['after']:,} "
        f"({report['params']['ratio']:.3f})"
    )
    print(
        f"MACs   {report['macs']['before']:,} -> {report['macs']['after']:,} "
        f"({report['macs']['ratio']:.3f})"
    )
    if latency:
        print(
            f"ORT CPU latency (batch 1, {latency['threads']} threads, median ms) "
            f"{latency['before']['median_ms']:.1f} -> {latency['after']['median_ms']:.1f} "
            f"({latency['ratio']:.3f})"
        )
    print(f"parity {report['parity']['max_abs_diff']:.2e} <= {report['parity']['tolerance']:g}")
    print(
        f"wrote {out}/: " + ", ".join(sorted(report["files"].values())) + ", report.json, report.md"
    )
    return 0


def cmd_graph(args) -> int:
    from compiler.pipeline import prepare

    prepared = prepare(args.model, args.imgsz)
    groups = prepared.groups
    width = max(len(g.id) for g in groups)
    print(f"{'group (root conv)':<{width}}  channels  members  status")
    for g in groups:
        status = f"protected: {g.reason}" if g.protected else "prunable"
        print(f"{g.id:<{width}}  {g.size:>8}  {len(g.members):>7}  {status}")
        if args.members:
            for m in g.members:
                print(f"{'':<{width}}    {m}")
    prunable = [g for g in groups if not g.protected]
    print(
        f"{len(groups)} groups: {len(prunable)} prunable ({sum(g.size for g in prunable):,} "
        f"channels), {len(groups) - len(prunable)} protected"
    )
    return 0


def cmd_plan(args) -> int:
    from compiler.pipeline import CompileOptions, plan_for, prepare

    fields = CompileOptions.__dataclass_fields__
    options = CompileOptions(**{k: v for k, v in vars(args).items() if k in fields and k != "out"})
    prepared = prepare(args.model, args.imgsz)
    plan = plan_for(prepared, options)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plan.save(args.out)
    print(
        f"MACs kept {plan.macs_ratio:.3f}; {sum(g.pruned for g in plan.groups)} of "
        f"{len(plan.groups)} groups pruned; wrote {args.out}"
    )
    return 0


COMMANDS = {"compile": cmd_compile, "graph": cmd_graph, "plan": cmd_plan}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except YoloPruneError as exc:
        print(f"yoloprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("yoloprune: interrupted; nothing was written", file=sys.stderr)
        return 130
