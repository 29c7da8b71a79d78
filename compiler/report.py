"""Report pass: report.json (machine-readable), report.md (human), and a per-group plot."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from yoloprune.compiler.latency_planner import LatencySettings
from yoloprune.graphs.checkpoint import ModelInfo
from yoloprune.graphs.files import write_text_atomic
from yoloprune.graphs.plan import PruningPlan
from yoloprune.kernels.ort import machine_text

MACS_COUNTED = (
    "multiply-accumulates of every Conv2d the exported graph holds (detection head included; "
    "YOLO26: the head branch of its export mode, not the one that trains only) for one "
    "{imgsz}x{imgsz} image, batch 1; BatchNorm is assumed folded into the convs; pooling, "
    "upsampling, activations and box decoding are not counted (thop/yolov5 GFLOPs = 2 x MACs)"
)


def build_report(
    *,
    info: ModelInfo,
    plan: PruningPlan,
    groups,
    imgsz: int,
    params,
    onnx_bytes: int,
    parity,
    latency: dict | None,
    seconds: dict,
    options,
    files: dict,
) -> dict:
    kept = {g.id: g for g in plan.groups}
    group_rows = []
    for g in groups:
        plan_group = kept.get(g.id)
        group_rows.append(
            {
                "id": g.id,
                "total": g.size,
                "kept": plan_group.kept if plan_group else g.size,
                "protected": g.protected,
                "members": len(g.members),
            }
        )
    aligned = all(r["kept"] % plan.round_to == 0 for r in group_rows if r["kept"] < r["total"])
    warnings = []
    if not info.pretrained:
        warnings.append(
            "random init (model built from YAML): MACs and latency are real, "
            "accuracy is meaningless"
        )
    warnings += _missed_latency_goal(plan.latency, latency)
    warnings += parity_warnings(parity.to_dict())
    return {
        "model": {
            "source": info.source,
            "family": info.family,
            "pretrained": info.pretrained,
            "nc": info.nc,
            "names": list(info.names),
            "stride": list(info.stride),
            "anchors": [list(a) for a in info.anchors],
            "imgsz": imgsz,
        },
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "plan": {
            "importance": plan.importance,
            "allocation": plan.allocation,
            "target": plan.target,
            "round_to": plan.round_to,
            "max_ratio": plan.max_ratio,
            "drop_blocks": list(plan.drop_blocks),
            "latency": plan.latency,
            # --allocation sensitivity: what was measured (each group's curve: the plan file)
            "sensitivity": None
            if plan.sensitivity is None
            else {k: v for k, v in plan.sensitivity.items() if k != "errors"},
        },
        "params": {"before": params[0], "after": params[1], "ratio": params[1] / params[0]},
        "macs": {
            "before": plan.macs_before,
            "after": plan.macs_after,
            "ratio": plan.macs_ratio,
            "counted": MACS_COUNTED.format(imgsz=imgsz),
        },
        "onnx_bytes": onnx_bytes,
        "latency_ms": {"onnxruntime_cpu": latency} if latency else {},
        "parity": parity.to_dict(),
        "alignment": {
            "round_to": plan.round_to,
            "all_pruned_groups_aligned": aligned,
            "chosen_by": plan.alignment,  # --round-to auto's measurement, else None (given)
            "precision_note": _precision_note(plan, options),
        },
        "groups": group_rows,
        "seconds": seconds,
        "files": files,
        "warnings": warnings,
    }


def parity_warnings(parity: dict) -> list[str]:
    """A warning where an end-to-end file's parity compared no detection: every top-k score
    lay within the tolerance of the k-th (flat scores: random weights on noise), so boxes and
    classes went unchecked and the figure says nothing."""
    if parity.get("compared") != 0:
        return []
    return [
        "ONNX parity compared no detection: every end-to-end score lies within the tolerance "
        f"of the k-th ({parity['tolerance']:g}; flat scores, as random weights on noise give), "
        "so boxes and classes were not checked; export with --export-mode raw to compare the "
        "raw outputs"
    ]


def _missed_latency_goal(planned: dict | None, bench: dict | None) -> list[str]:
    """A warning where the bench step (ONNX Runtime CPU, fp32, batch 1) re-measured a latency
    goal planned on the same runtime, precision and batch, and found it missed: the planner's
    measurement and the bench step's are separate runs, and a shared machine's speed drifts
    between them (seen: a --speedup 1.75 plan re-measured at 1.64x)."""
    if not planned or not bench or "goal_ms" not in planned or planned["runtime"] != "ort":
        return []
    key = planned.get("table_key", {})
    if key.get("batch") != 1 or key.get("precision") != "fp32":
        return []
    goal_ratio = planned["goal_ms"] / planned["baseline_ms"]
    if bench["ratio"] <= goal_ratio * (1 + LatencySettings().tolerance):  # the planner's own
        return []
    return [
        f"the bench step measured a latency ratio of {bench['ratio']:.3f} (speed-up "
        f"{1 / bench['ratio']:.2f}x), short of the goal's {goal_ratio:.3f} (the planner measured "
        f"{planned['measured_speedup']:.2f}x): this machine's timings drift between runs; compile "
        "again, or ask for a little more speed-up"
    ]


def _precision_note(plan: PruningPlan, options) -> str | None:
    """Where the alignment was measured at another precision than the deployed file's."""
    if not plan.alignment:
        return None
    from yoloprune.compiler.alignment import precision_note

    deployed = options.timed_precision()
    return precision_note(plan.alignment, deployed, plans_latency=plan.latency is not None)


def _alignment_lines(alignment: dict) -> list[str]:
    lines = [
        f"Alignment: every pruned group keeps a multiple of {alignment['round_to']}: "
        f"{'yes' if alignment['all_pruned_groups_aligned'] else 'NO'}"
        + (
            "."
            if not alignment.get("chosen_by")
            else f" (chosen: {alignment_text(alignment['chosen_by'])})."
        )
    ]
    if alignment.get("precision_note"):
        lines.append(f"Note: {alignment['precision_note']}.")
    return [*lines, ""]


def profile_text(latency: dict) -> str:
    """The bench step's profile (``compile --profile``) in a sentence: the pruned file's
    kernel-time ratio split into MACs, convolution efficiency lost and other operators."""
    from yoloprune.kernels.profile import PROFILER_SLACK, profiled_slow

    profile = latency["profile"]
    if "skipped" in profile:
        return f"latency split not available: {profile['skipped']}"
    split = profile["split"]
    text = (
        f"latency split (ONNX Runtime's profiler, {profile['runs']} runs each, kernel time): "
        f"ratio {split['ratio']:.3f} = MACs {split['macs_share']:.3f} (the pruned file's "
        "convolution MACs at the original's mean convolution throughput) + convolution "
        f"efficiency lost {split['conv_efficiency_lost']:+.3f} + other operators "
        f"{split['rest']:.3f}; floor {split['floor']:.3f} (those MACs at the original's "
        "fastest convolution's throughput plus the other operators)"
    )
    if any(
        profiled_slow(profile[side]["run_ms"], latency[side]["median_ms"])
        for side in ("before", "after")
    ):
        text += (
            f"; profiled runs took more than {PROFILER_SLACK:g}x the timed ones (the profiler's "
            "own cost per operator, large for small models, or noise): indicative only"
        )
    return text


def _priced(allocation: str, target_kind: str) -> str:
    """What a plan allocated by measured sensitivity removed channels by."""
    if allocation != "sensitivity":
        return "error per ms (latency plan)"
    return "error per channel" if target_kind == "ratio" else "error per MAC"


def sensitivity_text(
    allocation: str, target_kind: str, max_ratio: float, measured: dict, replayed: bool = False
) -> str:
    """How a plan allocated by measured sensitivity was made, in one line (its record without
    the curves, as the report keeps it); ``replayed``: the plan came from ``--plan``, nothing
    was measured now."""
    if replayed:
        other = "as recorded in the replayed plan"
    elif allocation == "sensitivity":
        other = "--allocation uniform: the same fraction everywhere"
    else:
        other = "without --allocation sensitivity: priced by importance"
    return (
        f"each group's head output error measured on {measured['images']} unlabeled images in "
        f"{measured['seconds']:g} s; channels removed where they add the least "
        f"{_priced(allocation, target_kind)}, at most {max_ratio:g} of a group ({other})"
    )


def _alignment_cost(row: dict):
    """A candidate row's accuracy cost and how its figures print: the measured head output
    error added (sensitivity plans), or the fraction of the importance removed."""
    if "error_added" in row:
        return row["error_added"], lambda value: f"{value:.3g}"
    return row.get("importance_removed"), lambda value: f"{value:.1%}"


def alignment_text(record: dict) -> str:
    """``--round-to auto``'s choice in one line: each candidate's time against the finest
    plannable one's, its accuracy cost (importance removed, or for sensitivity plans the error
    added) and, for the faster coarse ones, what the finest would cost at the same speed."""
    parts = []
    for row in record["candidates"]:
        text = f"{row['round_to']}: {row['relative_latency']:.3f}x time"
        if row.get("plannable") is False:
            parts.append(text + ", target not plannable at this alignment")
            continue
        if row.get("planner_refused"):
            parts.append(text + ", the planner cannot meet the target at this alignment")
            continue
        if row.get("fallback"):
            text += ", the only alignment left the planner could meet the target at"
        cost, figure = _alignment_cost(row)
        if cost is not None:
            text += (
                f", adds head output error {figure(cost)}"
                if "error_added" in row
                else f", removes {figure(cost)} of the importance"
            )
        finest = row.get("finest_at_this_speed")
        if "finest_at_this_speed" in row:
            text += (
                f" (the finest at this speed: {figure(finest)})"
                if finest is not None
                else " (the finest cannot run this fast)"
            )
        tied = row["eligible"] and finest is not None and cost is not None and cost > finest
        parts.append(
            text
            + (", more but within the tie: eligible" if tied else "")
            + ("" if row["eligible"] else ", not taken")
        )
    key = record["table_key"]
    batch = f" batch {key['batch']}" if key.get("batch", 1) != 1 else ""
    return (
        f"round_to {record['chosen']} measured on {record['runtime']} {key['device']} "
        f"{key['precision']}{batch} ({'; '.join(parts)}; {record['rule']})"
    )


def _fmt_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def render_markdown(report: dict) -> str:
    m, p, macs = report["model"], report["params"], report["macs"]
    lines = [f"# yoloprune report: {Path(m['source']).name}", ""]
    lines += [f"> **WARNING**: {w}" for w in report["warnings"]]
    plan = report["plan"]
    lines += [
        f"Target {plan['target']['kind']} = {plan['target']['value']:g}, importance "
        f"{plan['importance']}, {plan['allocation']} allocation, round_to {plan['round_to']}, "
        f"max ratio {plan['max_ratio']:g}, image {m['imgsz']}x{m['imgsz']}.",
        "",
    ]
    if plan.get("sensitivity"):
        measured = plan["sensitivity"]
        levels = " / ".join(f"{level:g}" for level in measured["levels"])
        lines += [
            f"Sensitivity allocation: each group pruned alone to {levels} of its channels on "
            f"{measured['images']} unlabeled images, its head output error measured "
            f"({measured['seconds']:g} s); channels removed where they add the least "
            f"{_priced(plan['allocation'], plan['target']['kind'])}. The curves are in the "
            "plan file.",
            "",
        ]
    if plan.get("drop_blocks"):
        lines += [
            f"Residual blocks removed whole ({len(plan['drop_blocks'])}, shortcut kept): "
            + ", ".join(f"`{b}`" for b in plan["drop_blocks"])
            + ".",
            "",
        ]
    lines += [
        "| | before | after | after / before |",
        "|---|---:|---:|---:|",
        f"| params | {_fmt_count(p['before'])} | {_fmt_count(p['after'])} | {p['ratio']:.3f} |",
        f"| MACs | {_fmt_count(macs['before'])} | {_fmt_count(macs['after'])} "
        f"| {macs['ratio']:.3f} |",
    ]
    latency = report["latency_ms"].get("onnxruntime_cpu")
    if latency:
        lines.append(
            f"| latency, ONNX Runtime CPU, median ms | {latency['before']['median_ms']:.1f} | "
            f"{latency['after']['median_ms']:.1f} | {latency['ratio']:.3f} |"
        )
        lines += [
            "",
            f"Latency: {latency['runtime']}, batch {latency['batch']}, fp32, "
            f"{latency['threads']} threads, median of {latency['after']['runs']} runs "
            f"({latency['order']}), on {machine_text(latency['machine'])}. Latency efficiency "
            f"(MACs ratio / latency ratio): {macs['ratio'] / latency['ratio']:.2f}.",
        ]
        if "profile" in latency:
            lines += ["", profile_text(latency) + "."]
    elif "sweep" in report["latency_ms"]:
        from yoloprune.compiler.sweep import machine_summary, timed_on

        timed = report["latency_ms"]["sweep"]  # stated as sweep.md states it
        lines += [
            "",
            f"Latency: timed by the sweep with its other points ({timed['record']}): "
            f"{timed['median_ms']:.2f} ms against the original's {timed['baseline_ms']:.2f} ms "
            f"(ratio {timed['ratio']:.3f}); {timed_on(timed)}, on "
            f"{machine_summary(timed['machine'])}.",
        ]
    else:
        lines += ["", "Latency not measured (--no-bench)."]
    lines += _latency_plan_lines(plan.get("latency"), latency)
    parity = report["parity"]
    lines += [
        "",
        f"MACs: {macs['counted']}.",
        "",
        f"ONNX parity: {parity['max_abs_diff']:.2e} (tolerance {parity['tolerance']:g}; "
        f"{parity['metric']}; {parity['max_abs_diff_pixels']:.3g} px before normalising). "
        f"ONNX file: {report['onnx_bytes'] / 1e6:.1f} MB"
        + (
            f", export mode {report['export']['mode']}, output0 {report['export']['output0']}."
            if report.get("export")
            else "."
        ),
        "",
    ]
    lines += _precision_lines(report.get("precisions") or {})
    lines += _ultralytics_checkpoint_lines(
        (report.get("export") or {}).get("ultralytics_checkpoint")
    )
    lines += _alignment_lines(report["alignment"])
    lines += _reconstruction_lines(report.get("reconstruction"))
    lines += _accuracy_lines(report.get("accuracy") or {})
    if report.get("sparsity"):
        lines += [
            f"Unstructured baseline: {report['sparsity']['conv_weights_zero']:.1%} of conv "
            "weights are zero, but every channel is still there: dense runtimes do the same "
            "work (see latency).",
            "",
        ]
    if report["files"].get("plot"):
        lines += [f"![kept channels per group]({report['files']['plot']})", ""]
    lines += [
        "## Channel groups",
        "",
        "| group (root conv) | kept / total | members | note |",
        "|---|---:|---:|---|",
    ]
    for g in report["groups"]:
        note = "protected" if g["protected"] else ("" if g["kept"] < g["total"] else "unpruned")
        lines.append(f"| `{g['id']}` | {g['kept']} / {g['total']} | {g['members']} | {note} |")
    return "\n".join(lines) + "\n"


def _latency_plan_lines(planned: dict | None, bench: dict | None) -> list[str]:
    """Latency-aware plans: the goal, what the table predicted, what was measured."""
    if not planned:
        return []
    if "goal_ms" not in planned:  # --macs --latency-aware: the table only ranks removals
        predicted = planned["predicted_ms_uncalibrated"] / planned["baseline_ms_uncalibrated"]
        return [
            "",
            f"Latency-aware allocation under the MACs target on {planned['runtime']} (table "
            f"{Path(planned['table']).name}, {planned['table_entries']} conv shapes): the "
            f"table predicts a latency ratio of {predicted:.3f} for the convolutions.",
        ]
    lines = [
        "",
        f"Latency-aware plan on {planned['runtime']} (table {Path(planned['table']).name}, "
        f"{planned['table_entries']} conv shapes, {planned['measured_now']} measured now): "
        f"goal {planned['goal_ms']:.2f} ms, predicted {planned['predicted_ms']:.2f} ms, "
        f"measured {planned['measured_ms']:.2f} ms (speed-up {planned['measured_speedup']:.3f}) "
        f"after {len(planned['rounds'])} round(s) of plan, measure, correct.",
    ]
    if bench:
        lines.append(
            f"Re-measured by the bench step: speed-up {1 / bench['ratio']:.3f} "
            f"({bench['runtime']})."
        )
    return lines


STAGES = {
    "original": "original",
    "pruned": "pruned, before fine-tuning",
    "finetuned": "pruned + fine-tuned",
    "onnx": "deployed ONNX (ONNX Runtime)",
}


def _reconstruction_lines(record: dict | None) -> list[str]:
    if not record:
        return [
            "Reconstruction: none (it needs images: `--data` or `--calib-images`; "
            "`--no-reconstruct` turns it off).",
            "",
        ]
    return [
        f"Reconstruction: {record['convs_fitted']} convs re-fitted to the original's outputs on "
        f"{record['images']} unlabeled images from {record['source']} (ridge least squares on up "
        f"to {record['positions_per_image']} positions per image and conv; dampings chosen on "
        f"held-out samples: {_chosen_text(record['dampings_chosen'])}) in "
        f"{record['seconds']:.1f} s, {record['peak_activation_mib']:.0f} MiB of activations "
        f"held; the head's relative output error {record['head_error_before']:.3f} -> "
        f"{record['head_error_after']:.3f}"
        + (
            f"; left as they were: {', '.join(record['convs_skipped'])}"
            if record["convs_skipped"]
            else ""
        )
        + ".",
        "",
    ]


def _chosen_text(chosen: dict) -> str:
    return ", ".join(
        f"{count} x {'weights kept' if key == 'kept' else key}" for key, count in chosen.items()
    )


def _accuracy_lines(accuracy: dict) -> list[str]:
    if not accuracy:
        return []
    lines = [
        "## Accuracy",
        "",
        f"{accuracy['images']} validation images ({accuracy['settings']}; "
        f"data check: {accuracy['data_check']}).",
        "",
        "| model | mAP@.5:.95 | mAP@.5 |",
        "|---|---:|---:|",
    ]
    for stage, value in accuracy["map50_95"].items():
        lines.append(
            f"| {STAGES.get(stage, stage)} | {value:.4f} | {accuracy['map50'][stage]:.4f} |"
        )
    if accuracy.get("finetune"):
        lines += ["", _finetune_text(accuracy["finetune"])]
    if accuracy.get("batchnorm_recalibrated_on") and "pruned" in accuracy["map50_95"]:
        lines += [
            "",
            f"The pruned model's BatchNorm statistics were re-estimated on "
            f"{accuracy['batchnorm_recalibrated_on']} training images before it was evaluated "
            "(no weight changed; `--no-recalibrate` keeps the original statistics).",
        ]
    return [*lines, ""]


OPTIMIZER_NAMES = {"adamw": "AdamW", "sgd": "SGD"}


def finetune_summary(finetune: dict) -> str:
    """A fine-tune (report.json's ``accuracy.finetune``) as "N epochs at batch B (AdamW, lr0 L,
    distillation D) in S s, the forward in bf16 mixed precision": what the console prints after
    "fine-tuned" and report.md after "Fine-tuned". Reports written before 2026-12-01 lack the
    precision, those before 2026-12-02 the recipe; what is missing is left out."""
    recipe = finetune.get("recipe")
    text = f"{len(finetune['history'])} epochs"
    if recipe:
        processes = f" x {recipe['processes']} processes" if recipe["processes"] > 1 else ""
        distill = f"distillation {recipe['distill']:g}" if recipe["distill"] else "no distillation"
        text += (
            f" at batch {recipe['batch']}{processes} ({OPTIMIZER_NAMES[recipe['optimizer']]}, "
            f"lr0 {recipe['lr0']:g}, {distill}" + (", augmented" if recipe["augment"] else "") + ")"
        )
    text += f" in {finetune['seconds']:.0f} s"
    if "mixed_precision" in finetune:
        low = finetune["mixed_precision"]
        text += f", the forward in {low} mixed precision" if low else ", in fp32"
    return text


def _finetune_text(finetune: dict) -> str:
    history = finetune["history"]
    evaluated = [h for h in history if "map50_95" in h]
    maps = " → ".join(f"{h['map50_95']:.4f}" for h in evaluated)
    if len(evaluated) == len(history) > 1:
        when = "after each epoch"
    else:
        numbers = ", ".join(
            f"{h['epoch']} of step {h['step']}" if "step" in h else str(h["epoch"])
            for h in evaluated
        )
        when = f"after epoch{'s' if len(evaluated) > 1 else ''} {numbers}"
    text = f"Fine-tuned {finetune_summary(finetune)}" + (
        f" (mAP@.5:.95 {when}: {maps})" if evaluated else ""
    )
    kept = finetune.get("kept_between_epochs")
    if kept:
        text += (
            f"; kept in memory between epochs: {kept['images']} training images, "
            f"{kept['teacher_outputs']} teacher outputs and {kept['val_images']} validation "
            f"images ({kept['used_mib']:.0f} of {kept['budget_mib']:.0f} MiB"
            + (f"; {kept['refused']} did not fit and were recomputed" if kept["refused"] else "")
            + ")"
        )
    return text + "."


def plot_groups(report: dict, path: Path) -> None:
    """Kept fraction of every group, in network order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["groups"]
    fig, ax = plt.subplots(figsize=(max(6, 0.12 * len(rows)), 3.2))
    colours = ["#999999" if r["protected"] else "#1f77b4" for r in rows]
    ax.bar(range(len(rows)), [r["kept"] / r["total"] for r in rows], color=colours)
    ax.axhline(report["macs"]["ratio"], color="#d62728", lw=1, ls="--", label="MACs kept")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("channel group (network order; grey = protected: head, attention)")
    ax.set_ylabel("channels kept")
    ax.set_title(f"{Path(report['model']['source']).name}: kept channels per group")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _precision_lines(precisions: dict) -> list[str]:
    """One row per file the model was written at (the fp32 export and any lowered copy), with
    how it was made and its own mAP where --data was given."""
    if len(precisions) < 2:
        return []
    lines = [
        "| precision | file | how | MB | parity vs PyTorch (tolerance) | mAP@.5:.95 | mAP@.5 |",
        "|---|---|---|---:|---|---:|---:|",
    ]
    for name, entry in precisions.items():
        parity, record = entry["parity"], entry.get("quantization") or {}
        how = ", ".join(
            str(record[k]).split(",")[0] for k in ("method", "calibrator", "qat") if k in record
        )
        if "float" in record:  # an INT8 file's float part
            how += f", {record['float'].split()[0]} elsewhere"
        maps = [f"{entry[k]:.4f}" if k in entry else "-" for k in ("map50_95", "map50")]
        lines.append(
            f"| {name} | {entry['file']} | {how or 'exported'} | {entry['onnx_bytes'] / 1e6:.1f} "
            f"| {parity['max_abs_diff']:.2e} ({parity['tolerance']:g}) | {' | '.join(maps)} |"
        )
    return [*lines, "", *_sensitivity_lines(precisions.get("int8", {}).get("quantization"))]


def _sensitivity_lines(record: dict | None) -> list[str]:
    sensitivity = (record or {}).get("sensitivity")
    if not sensitivity:
        return []
    kept = sensitivity["kept_in_float"]
    text = (
        f"INT8 sensitivity (mAP@.5:.95 on {sensitivity['images']} "
        f"{sensitivity.get('split', 'val')} images): float "
        f"{sensitivity['map50_95_float']:.4f}, int8 {sensitivity['map50_95_int8']:.4f}, allowed "
        f"drop {sensitivity['max_map_drop']:g}; "
    )
    if not kept:
        return [text + "within it, every conv stays quantized.", ""]
    convs = ", ".join(f"{k['conv']} ({k['map_cost_alone']:+.4f} alone)" for k in kept)
    verdict = (
        "within the allowed drop"
        if sensitivity["within_tolerance"]
        else f"NOT within the allowed drop: the cap of {len(kept)} convs (a quarter) was reached"
    )
    return [
        text + f"kept out of INT8 (in {sensitivity.get('kept_precision', 'fp32')}): {convs}; "
        f"int8 after: {sensitivity['map50_95_after']:.4f}, "
        f"{verdict}.",
        "",
    ]


def _ultralytics_checkpoint_lines(saved: dict | None) -> list[str]:
    if not saved:
        return []
    kept = saved["blocks_kept_as_yoloprune_classes"]
    where = (
        f"blocks {', '.join(kept)} keep their halves' different widths as yoloprune classes, so "
        "the file loads where yoloprune is installed"
        if kept
        else "every block is ultralytics' own class"
    )
    return [f"Ultralytics checkpoint: {saved['file']} (`YOLO(path)` loads it; {where}).", ""]


def write_report(report: dict, folder: Path) -> None:
    plot = folder / "groups.png"
    plot_groups(report, plot)
    report["files"]["plot"] = plot.name
    write_text_atomic(folder / "report.json", json.dumps(report, indent=1) + "\n")
    write_text_atomic(folder / "report.md", render_markdown(report))
