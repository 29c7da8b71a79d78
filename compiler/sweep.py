"""Sweep: compile one model at several targets from one trace, then measure every deployed file
on the same runtime in one interleaved run, and show the latency-mAP front.

Each point is a full compile (plan, apply, reconstruct, optional fine-tune, save, export,
parity, the ONNX file's own mAP) into its own folder; the trace, the original's mAP and the
latency table (speedup targets) are made once. The latency of every point's deployed model
and of the unpruned model's is measured together at the end on the latency runtime, at
``--latency-batch`` (1 by default), interleaved (ort, the default: the ONNX files on ONNX
Runtime CPU; torch: the pruned checkpoints on PyTorch CUDA; tensorrt: the ONNX files as
engines), so the ratios compare. The recommended point: the fastest within
``--max-map-drop`` of the original's mAP (and faster than the original), or the most accurate
within ``--latency-ms``. A target the planner cannot reach (``--speedup 3`` past what
``--max-ratio`` allows) is listed with the planner's reason and the other points go on; a
sweep none of whose targets can be reached is an error.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from yoloprune.compiler.options import (
    DEFAULT_LATENCY_RUNTIME,
    CompileOptions,
    checked_choice,
    refuse_absent_runtime,
)
from yoloprune.graphs.errors import PlanError, TargetUnreachable
from yoloprune.graphs.files import (
    missing_folders,
    remove_if_empty,
    save_png_atomic,
    write_text_atomic,
)

DEFAULT_OUT = Path("runs/sweep")


@dataclass(frozen=True)
class SweepOptions:
    """A sweep: the compile options every point shares, the targets, and the criterion."""

    base: CompileOptions  # its target is ignored; out is the sweep's folder
    kind: str  # "macs" or "speedup"
    values: tuple[float, ...]
    max_map_drop: float | None = None
    latency_ms: float | None = None
    # Where and at which batch the points are timed, where the points' own planning times
    # nothing (a fixed --round-to under --macs; the compile would refuse the flags there as
    # unused); else the base's, which the points plan with too
    latency_batch: int | None = None
    latency_runtime: str | None = None

    @property
    def timing_batch(self) -> int:
        return self.latency_batch or self.base.latency_batch or 1

    @property
    def timing_runtime(self) -> str:
        return self.latency_runtime or self.base.latency_runtime or DEFAULT_LATENCY_RUNTIME

    def __post_init__(self) -> None:
        if self.kind not in ("macs", "speedup"):
            raise PlanError(f"sweep: target {self.kind!r}: use --macs or --speedup")
        if not self.values or len(set(self.values)) != len(self.values):
            raise PlanError(f"--{self.kind}: give distinct values, e.g. 0.9,0.7,0.5")
        names = [self.name(v) for v in self.values]
        if len(set(names)) != len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise PlanError(
                f"--{self.kind}: two values name the same point ({twice}): give values that "
                "differ within 6 significant digits"
            )
        if self.base.data is None:
            raise PlanError("sweep measures mAP: add --data data.yaml")
        if self.base.profile:
            raise PlanError(
                "sweep times its points together, with no bench step to profile: profile the "
                "files it writes with `bench --profile`"
            )
        if self.max_map_drop is not None and self.latency_ms is not None:
            raise PlanError("give one criterion: --max-map-drop or --latency-ms, not both")
        self._check_own_timing()
        batch, runtime = self.timing_batch, self.timing_runtime
        if batch > 1 and runtime != "torch" and not self.base.dynamic:
            raise PlanError(
                f"--latency-batch {batch}: the points' ONNX files are timed at that batch; add "
                "--dynamic so they take it"
            )
        for value in self.values:  # each point's options are checked now, before any work
            self.point(value).settings  # noqa: B018

    @property
    def out(self) -> Path:
        return DEFAULT_OUT if self.base.out is None else Path(self.base.out)

    def name(self, value: float) -> str:
        return f"{self.kind}-{value:g}"

    def _check_own_timing(self) -> None:
        """The sweep's own --latency-runtime/--latency-batch (set where the points time
        nothing): checked as a compile checks them, before any work."""
        if self.latency_batch is not None:
            checked_choice("latency_batch", self.latency_batch)
        if self.latency_runtime is not None:
            checked_choice("latency_runtime", self.latency_runtime)
            refuse_absent_runtime(self.latency_runtime)

    def point(self, value: float) -> CompileOptions:
        """One point's compile: the base's options at ``value``, with no bench step (the
        sweep times every point itself)."""
        return dataclasses.replace(
            self.base,
            **{self.kind: value},
            out=self.out / self.name(value),
            bench=False,
        )


def parse_values(text: str, flag: str, low: float, high: float, open_high: bool) -> tuple:
    """``0.9,0.8,0.7`` -> (0.9, 0.8, 0.7), each in range, or a one-line error."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise PlanError(f"{flag} {text}: give numbers separated by commas") from None
    for v in values:
        if not (low < v and (v < high if open_high else v <= high)):
            bound = ")" if open_high else "]"
            raise PlanError(f"{flag} {text}: every value must be in ({low:g}, {high:g}{bound}")
    return values


def run_sweep(options: SweepOptions) -> dict:
    """Compile every point, measure, pick, and write ``sweep.json``, ``sweep.md`` and
    ``sweep.png`` into the sweep's folder; returns the sweep record."""
    from yoloprune.compiler.pipeline import compile_shared, shared_job

    created = missing_folders(options.out)  # removed again if nothing is written (below)
    shared = shared_job(options.point(options.values[0]))
    original = shared.accuracy["original"]
    points, unreachable = [], []
    for value in tqdm(options.values, desc="sweep", unit="point", leave=False, disable=None):
        try:
            report = compile_shared(options.point(value), shared)
        except TargetUnreachable as exc:  # the point's staged files are removed
            unreachable.append({"name": options.name(value), options.kind: value, "why": str(exc)})
            continue
        points.append(_point_record(options, value, report))
    if not points:
        remove_if_empty(created)
        raise TargetUnreachable(
            "sweep: no target can be reached: "
            + "; ".join(f"{u['name']}: {u['why']}" for u in unreachable)
        )
    prepared = shared["prepared"]
    latency = _measure(options, prepared, shared["mode"], points)
    for point in points:
        point["latency_ms"] = latency["points"][point["name"]]
        point["latency_ratio"] = round(point["latency_ms"] / latency["baseline_ms"], 4)
        _note_sweep_timing(options.out / point["folder"], point, latency)
    record = {
        "model": options.base.model,
        "imgsz": prepared.imgsz,
        "data": str(options.base.data),
        "target": options.kind,
        "original": {"map50_95": original.map50_95, "latency_ms": latency["baseline_ms"]},
        "latency": {k: v for k, v in latency.items() if k != "points"},
        "criterion": _criterion(options),
        "points": points,
        "unreachable": unreachable,
        "front": _front(points),
    }
    record["recommended"] = _recommend(options, record)
    out = options.out
    for entry in unreachable:
        entry["earlier_folder_removed"] = _remove_earlier_point(out / entry["name"])
    write_text_atomic(out / "sweep.json", json.dumps(record, indent=1) + "\n")
    plot(record, out / "sweep.png")
    write_text_atomic(out / "sweep.md", render(record))
    return record


def _remove_earlier_point(folder: Path) -> bool:
    """An unreachable point's folder left by an earlier sweep into the same ``--out`` (a
    compile's output: it holds a report.json) would pass for this sweep's result: removed (a
    link to one: the link)."""
    if not (folder / "report.json").is_file():
        return False
    if folder.is_symlink():
        folder.unlink()
    else:
        shutil.rmtree(folder)
    return True


def _note_sweep_timing(folder: Path, point: dict, latency: dict) -> None:
    """The point's report.json and report.md with the latency the sweep measured for it (the
    points have no bench step of their own: the sweep times them all together)."""
    from yoloprune.compiler.report import render_markdown

    path = folder / "report.json"
    report = json.loads(path.read_text())
    report["latency_ms"]["sweep"] = {
        **{k: latency[k] for k in ("runtime", "batch", "threads", "runs", "machine")},
        "baseline_ms": latency["baseline_ms"],
        "median_ms": point["latency_ms"],
        "ratio": point["latency_ratio"],
        "record": "../sweep.md",
    }
    write_text_atomic(path, json.dumps(report, indent=1) + "\n")
    write_text_atomic(folder / "report.md", render_markdown(report))


def _point_record(options: SweepOptions, value: float, report: dict) -> dict:
    accuracy = report["accuracy"]["map50_95"]
    onnx = accuracy.get("onnx")
    return {
        "name": options.name(value),
        options.kind: value,
        "macs_ratio": report["macs"]["ratio"],
        "params_ratio": report["params"]["ratio"],
        "round_to": report["alignment"]["round_to"],
        "map50_95": onnx,  # the deployed ONNX file's own mAP
        "map50_95_pytorch": accuracy.get("finetuned", accuracy.get("pruned")),
        "folder": options.name(value),
        "files": sorted([*report["files"].values(), "report.json", "report.md"]),
        "onnx": report["files"]["onnx"],
        "checkpoint": report["files"]["checkpoint"],
        "seconds": report.get("seconds", {}),
    }


def _measure(options: SweepOptions, prepared, mode: str, points: list[dict]) -> dict:
    """The unpruned model and every point's deployed model, timed together (interleaved) on
    the latency runtime: the ONNX files on ort (and tensorrt, as engines), the pruned
    checkpoints on torch."""
    from yoloprune.compiler.bench import BenchSettings, time_sources
    from yoloprune.compiler.pipeline import export_baseline
    from yoloprune.kernels.ort import machine_info

    base = options.base
    runtime = options.timing_runtime
    settings = BenchSettings(
        runtime=runtime,
        batch=options.timing_batch,
        threads=base.threads,
        spinning=base.spinning,
        runs=options.point(options.values[0]).settings.bench_runs,
        warmup=3,
    )
    file = "checkpoint" if runtime == "torch" else "onnx"
    with tempfile.TemporaryDirectory() as tmp:
        baseline = prepared.model
        if runtime != "torch":
            path = Path(tmp) / "baseline.onnx"
            baseline = str(export_baseline(prepared.model, path, prepared.imgsz, mode, base))
        sources = {"baseline": baseline}
        sources.update({p["name"]: str(options.out / p["folder"] / p[file]) for p in points})
        timings, described = time_sources(sources, settings, prepared.imgsz)
    machine = machine_info()
    if settings.resolved_device().startswith("cuda"):
        from yoloprune.kernels.torch_runtime import gpu_info

        machine.update(gpu_info())
    return {
        "runtime": _runtime_text(settings, described),
        "batch": settings.batch,
        "threads": described.get("threads"),
        "runs": settings.runs,
        "machine": machine,
        "baseline_ms": round(timings["baseline"].median_ms, 3),
        "points": {p["name"]: round(timings[p["name"]].median_ms, 3) for p in points},
    }


def _runtime_text(settings, described: dict) -> str:
    """The runtime, as the results name it."""
    if settings.runtime == "ort":
        return "onnxruntime (CPUExecutionProvider, ORT_ENABLE_ALL), fp32"
    if settings.runtime == "torch":
        return f"PyTorch {described['device']} {described['precision']}"
    return f"TensorRT {described.get('tensorrt')} (each ONNX file's precision)"


def _criterion(options: SweepOptions) -> dict | None:
    if options.max_map_drop is not None:
        return {"max_map_drop": options.max_map_drop}
    if options.latency_ms is not None:
        return {"latency_ms": options.latency_ms}
    return None


def _front(points: list[dict]) -> list[str]:
    """The points no other point beats in both latency and mAP, fastest first."""
    front = []
    for p in sorted(points, key=lambda p: (p["latency_ms"], -p["map50_95"])):
        if not front or p["map50_95"] > front[-1]["map50_95"]:
            front.append(p)
    return [p["name"] for p in front]


def _recommend(options: SweepOptions, record: dict) -> dict | None:
    points, original = record["points"], record["original"]["map50_95"]
    if options.max_map_drop is not None:
        fits = [
            p
            for p in points
            if p["map50_95"] >= original - options.max_map_drop
            and p["latency_ms"] < record["original"]["latency_ms"]
        ]
        best = min(fits, key=lambda p: p["latency_ms"], default=None)
        why = f"the fastest within {options.max_map_drop:g} mAP of the original and faster than it"
    elif options.latency_ms is not None:
        fits = [p for p in points if p["latency_ms"] <= options.latency_ms]
        best = max(fits, key=lambda p: p["map50_95"], default=None)
        why = f"the most accurate within {options.latency_ms:g} ms"
    else:
        return None
    if best is None:
        return {"name": None, "why": f"no point is {why.removeprefix('the ')}"}
    return {"name": best["name"], "why": why}


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = record["points"]
    front = [p for name in record["front"] for p in points if p["name"] == name]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot([p["latency_ms"] for p in front], [p["map50_95"] for p in front], "-", color="#1f77b4")
    ax.scatter([p["latency_ms"] for p in points], [p["map50_95"] for p in points], zorder=3)
    for p in points:
        ax.annotate(
            p["name"],
            (p["latency_ms"], p["map50_95"]),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    original = record["original"]
    ax.scatter(
        [original["latency_ms"]],
        [original["map50_95"]],
        marker="*",
        s=120,
        color="black",
        label="original",
        zorder=3,
    )
    chosen = (record.get("recommended") or {}).get("name")
    if chosen:
        p = next(p for p in points if p["name"] == chosen)
        ax.scatter(
            [p["latency_ms"]],
            [p["map50_95"]],
            s=160,
            facecolors="none",
            edgecolors="red",
            label=f"recommended: {chosen}",
            zorder=4,
        )
    conditions = f"{timed_on(record['latency'])}; {machine_summary(record['latency']['machine'])}"
    ax.set_xlabel("latency, ms\n" + textwrap.fill(conditions, 80), fontsize=8)
    ax.set_ylabel("mAP@.5:.95 (points: their ONNX files;\noriginal: PyTorch)", fontsize=9)
    ax.set_title(f"{Path(record['model']).name} at {record['imgsz']} px")
    ax.grid(alpha=0.3)
    ax.legend()
    save_png_atomic(fig, path)


def timed_on(latency: dict) -> str:
    threads = f", {latency['threads']} threads" if latency.get("threads") else ""
    return f"{latency['runtime']}, batch {latency['batch']}{threads}"


def machine_summary(machine: dict) -> str:
    """The CPU with its vector extensions (kernels.ort.machine_text), behind the GPU where one
    ran the timing."""
    from yoloprune.kernels.ort import machine_text

    cpu = machine_text(machine)
    return f"{machine['gpu']}, host {cpu}" if machine.get("gpu") else cpu


def _cell(text: str) -> str:
    """``text`` as one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def render(record: dict) -> str:
    original, latency = record["original"], record["latency"]
    machine = latency["machine"]
    lines = [
        f"# Sweep: {record['model']} at {record['imgsz']} px",
        "",
        f"mAP@.5:.95 of each point's ONNX file on {record['data']} (val split, pycocotools); "
        f"latency: {timed_on(latency)}, median of {latency['runs']} interleaved runs, on "
        f"{machine_summary(machine)}. Original: mAP {original['map50_95']:.4f}, "
        f"{original['latency_ms']:.2f} ms.",
        "",
        f"| point | {record['target']} | MACs kept | params kept | round_to | mAP@.5:.95 | "
        "of original | latency ms | latency ratio | on the front | folder |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for p in record["points"]:
        share = p["map50_95"] / original["map50_95"] if original["map50_95"] else None
        lines.append(
            f"| {p['name']} | {p[record['target']]:g} | {p['macs_ratio']:.3f} | "
            f"{p['params_ratio']:.3f} | {p['round_to']} | {p['map50_95']:.4f} | "
            f"{'-' if share is None else f'{share:.1%}'} | {p['latency_ms']:.2f} | "
            f"{p['latency_ratio']:.3f} | {'yes' if p['name'] in record['front'] else ''} | "
            f"`{p['folder']}/` |"
        )
    lines += [
        f"| {u['name']} | {u[record['target']]:g} | not reachable: {_cell(u['why'])} |" + " |" * 8
        for u in record.get("unreachable", ())
    ]
    chosen = record.get("recommended")
    lines.append("")
    if chosen is None:
        lines.append(
            "No recommendation: give `--max-map-drop X` (the fastest point within X mAP of the "
            "original) or `--latency-ms Y` (the most accurate point within Y ms)."
        )
    elif chosen["name"] is None:
        lines.append(f"No recommendation: {chosen['why']}.")
    else:
        lines.append(f"**Recommended: {chosen['name']}** ({chosen['why']}).")
    lines += ["", "![latency against mAP](sweep.png)", ""]
    return "\n".join(lines)
