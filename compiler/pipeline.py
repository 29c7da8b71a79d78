"""The compile job: load, graph, score, plan, apply, save, export, parity, bench, report.

Only composition lives here; each step is a pass in its own module. Every output is written to
a staging folder inside OUT and moved into place at the end, so a failed run leaves nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from yoloprune.compiler.alignment import (
    ALIGNMENT_RUNS,
    ALIGNMENT_SECONDS,
    choose_alignment,
    refuse_alignment,
)
from yoloprune.compiler.allocation import GroupSensitivity
from yoloprune.compiler.apply import apply_plan, count_params
from yoloprune.compiler.export import check_parity, export_mode, export_onnx, output_layout
from yoloprune.compiler.options import CompileOptions, allocation_image_count
from yoloprune.compiler.planner import MacCounter, conv_macs, spatial_sizes
from yoloprune.compiler.planners import Measure, PlanRequest, run_planner
from yoloprune.compiler.report import build_report, write_report
from yoloprune.compiler.score import importance_named
from yoloprune.compiler.unstructured import sparsify, sparsity
from yoloprune.graphs.checkpoint import ModelInfo, load_model, save_pruned
from yoloprune.graphs.dependency import GroupingLimits, build_graph, channel_groups, conv_channels
from yoloprune.graphs.errors import PlanError, TargetUnreachable, YoloPruneError
from yoloprune.graphs.family import OUTPUT_LAYOUTS, family_named, family_of
from yoloprune.graphs.files import signals_held
from yoloprune.graphs.plan import GroupPlan, PruningPlan

__all__ = [
    "STAGES",
    "CompileOptions",
    "Prepared",
    "compile_model",
    "plan_for",
    "prepare",
    "prune_in_memory",
]


@dataclass
class Prepared:
    model: object
    info: ModelInfo
    imgsz: int
    groups: list = field(default_factory=list)
    graph: object = None
    # measurements of this model that plans at other targets or alignments reuse (a sweep's
    # points): --allocation sensitivity's, by its images, importance and seed
    measured: dict = field(default_factory=dict)


def check_imgsz(imgsz: int, info: ModelInfo) -> int:
    stride = int(max(info.stride))
    if imgsz <= 0 or imgsz % stride:
        lower, upper = max(stride, imgsz // stride * stride), (imgsz // stride + 1) * stride
        raise PlanError(
            f"--imgsz {imgsz} must be a positive multiple of {stride} (the model's largest "
            f"stride): use {lower} or {upper}"
        )
    return imgsz


def prepare(
    model_spec: str,
    imgsz: int | None = None,
    limits: GroupingLimits | None = None,
    custom_modules: bool = False,
) -> Prepared:
    """Load a model and trace its channel groups (under ``limits``; split blocks' halves tied
    unless ``custom_modules``)."""
    model, info = load_model(model_spec)
    size = check_imgsz(info.imgsz if imgsz is None else imgsz, info)
    graph = build_graph(model, limits=limits)
    groups = channel_groups(model, graph, limits, custom_modules)
    return Prepared(model, info, size, groups, graph)


def mac_counter(prepared: Prepared, requested_mode: str | None = None) -> MacCounter:
    """MACs of the model as exported in ``requested_mode`` (``--export-mode``; None: the
    model's own), :func:`deployed_skip`."""
    mode = export_mode(prepared.model, requested_mode)
    return MacCounter(
        conv_channels(prepared.model, prepared.groups),
        spatial_sizes(prepared.model, prepared.imgsz),
        deployed_skip(prepared.model, mode),
    )


def deployed_skip(model, mode: str) -> set[str]:
    """The convs an export in ``mode`` leaves out, which MACs do not count: YOLO26's head
    branch that trains only (end to end the one-to-many, raw the one-to-one)."""
    return family_of(model).undeployed_convs(model, mode)


def plan_for(prepared: Prepared, options: CompileOptions, kept_at_least: tuple = ()) -> PruningPlan:
    """Score and plan with the registered planner the options select (or replay a plan file
    after checking it fits this model); ``kept_at_least``: (group id, channels) floors beyond
    the options' own (--steps: the original sizes' --max-ratio floor)."""
    settings = options.settings
    if settings.planner == "replay":
        return fitted_plan(PruningPlan.load(options.plan), prepared, str(options.plan))
    request = plan_request(prepared, options)
    if kept_at_least:
        constraints = dataclasses.replace(request.constraints, kept_at_least=kept_at_least)
        request = dataclasses.replace(request, constraints=constraints)
    if settings.alignment is None:
        return run_planner(request, settings.planner)
    measure = alignment_measure(prepared, settings.alignment)
    request, alignment = choose_alignment(request, settings.planner, settings.alignment, measure)
    while True:
        try:
            plan = run_planner(request, settings.planner)
        except TargetUnreachable as exc:  # e.g. a ms budget the knapsack cannot meet at 32
            request, alignment = refuse_alignment(request, alignment, str(exc))
            continue
        return dataclasses.replace(plan, alignment=alignment)


def plan_request(prepared: Prepared, options: CompileOptions) -> PlanRequest:
    """What a planner gets: the traced model, the resolved target and constraints, the
    importance criterion, and for latency planners their settings and runtime measure."""
    settings = options.settings
    latency = settings.latency
    return PlanRequest(
        name=prepared.info.name,
        model=prepared.model,
        graph=prepared.graph,
        groups=prepared.groups,
        imgsz=prepared.imgsz,
        counter=mac_counter(prepared, options.export_mode),
        target=settings.target,
        constraints=settings.constraints,
        importance=importance_named(
            settings.importance, options.data, prepared.imgsz, options.images
        ),
        seed=options.seed,
        latency=latency,
        measure=None if latency is None else plan_latency_measure(prepared, latency),
        sensitivity=group_sensitivity(prepared, options),
    )


def group_sensitivity(prepared: Prepared, options: CompileOptions) -> GroupSensitivity | None:
    """--allocation sensitivity's measurement of this model (made once, then reused)."""
    settings = options.settings
    if not settings.group_sensitivity:
        return None
    count = allocation_image_count(settings.allocation_images, prepared.imgsz)
    # the first of the images reconstruction reads, listed as if it read at least ``count``
    source = options.images
    files = tuple(source.spread(max(count, source.settings.images))[:count])
    key = ("sensitivity", files, settings.importance, options.seed)
    if key not in prepared.measured:
        prepared.measured[key] = GroupSensitivity(files, prepared.imgsz)
    return prepared.measured[key]


def plan_latency_measure(prepared: Prepared, settings, seconds: float = 0.0) -> Measure:
    """Times plans applied to ``prepared.model`` on the latency runtime, interleaved (more
    runs within ``seconds`` per model)."""
    from yoloprune.compiler.bench import BenchSettings, time_models

    bench = BenchSettings(
        runtime=settings.runtime,
        batch=settings.batch,
        threads=settings.threads,
        spinning=settings.spinning,
        device=settings.device,
        precision=settings.precision,
        runs=settings.runs,
        warmup=3,
        seconds=seconds,
    )

    def measure(plans: dict[str, PruningPlan | None]) -> dict[str, float]:
        models = {
            name: prepared.model if p is None else apply_plan(prepared.model, p)
            for name, p in plans.items()
        }
        timings = time_models(models, bench, prepared.imgsz)
        return {name: t.median_ms for name, t in timings.items()}

    return measure


def alignment_measure(prepared: Prepared, settings) -> Measure | None:
    """Times ``--round-to auto``'s candidate plans as whole models on ort or torch; None on
    TensorRT, where the alignment profile of conv chains stands in."""
    if settings.runtime not in ("ort", "torch"):
        return None
    fixed_runs = dataclasses.replace(settings, runs=ALIGNMENT_RUNS)
    return plan_latency_measure(prepared, fixed_runs, seconds=ALIGNMENT_SECONDS)


def fitted_plan(plan: PruningPlan, prepared: Prepared, source: str) -> PruningPlan:
    """A plan read from a file, checked against the model it is replayed on: every group it
    names is a prunable group of this model with the same size, and every prunable group it
    leaves out is listed as kept whole. Its MAC figures are recounted after surgery
    (:func:`counted`), never taken from the file."""
    if plan.imgsz != prepared.imgsz:
        raise PlanError(f"{source}: plan was made at imgsz {plan.imgsz}, not {prepared.imgsz}")
    prunable = {g.id: g for g in prepared.groups if not g.protected}
    named = {g.id: g for g in plan.groups}
    if len(named) != len(plan.groups):
        raise PlanError(f"{source}: a group is listed twice; regenerate the plan with `plan`")
    for group in plan.groups:
        own = prunable.get(group.id)
        if own is None or own.size != group.size:
            found = f"{own.size} channels" if own else "no prunable group of that name"
            raise PlanError(
                f"{source}: group {group.id} ({group.size} channels in the plan) does not fit "
                f"this model ({found}); make the plan for this model with `plan`"
            )
    groups = tuple(
        named.get(g.id) or GroupPlan(g.id, g.size, tuple(range(g.size)))
        for g in prepared.groups
        if not g.protected
    )
    return dataclasses.replace(plan, groups=groups)


def counted(plan: PruningPlan, original, pruned, imgsz: int, mode: str) -> PruningPlan:
    """``plan`` with its MACs counted on the original and the pruned model themselves, as
    exported in ``mode``."""
    return dataclasses.replace(
        plan,
        macs_before=conv_macs(original, imgsz, deployed_skip(original, mode)),
        macs_after=conv_macs(pruned, imgsz, deployed_skip(pruned, mode)),
    )


def replay_warnings(recorded: PruningPlan, recounted: PruningPlan, source: str) -> list[str]:
    """A warning where a replayed plan's MACs, counted on the pruned model, are not those its
    file records (a plan that leaves groups out, which are kept whole, or one edited by hand or
    made for another export mode): the plan is applied as it is, and this says what it did."""
    if math.isclose(recorded.macs_ratio, recounted.macs_ratio, rel_tol=1e-3):
        return []
    target = recorded.target
    return [
        f"{source}: the plan file records MACs kept {recorded.macs_ratio:.3f} (target "
        f"{target['kind']} {target['value']:g}); replayed on this model it keeps "
        f"{recounted.macs_ratio:.3f} (groups a plan leaves out are kept whole); regenerate it "
        "with `plan` if that is not what you meant"
    ]


def apply_any(model, plan: PruningPlan):
    """Structured plans remove channels; unstructured ones zero weights in place of that."""
    if plan.method == "unstructured":
        return sparsify(model, plan.target["value"])
    return apply_plan(model, plan)


STAGING_PREFIX = ".staging-"
BENCH_WARMUP = 3  # untimed runs before the bench step's timing (and its profile)
REPORT_FILES = ("report.json", "report.md")


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A staging folder inside ``out``; its files move into ``out`` only if the block succeeds,
    replacing the results of an earlier compile there (never mixing two models' files).

    Staging folders left by a compile that was killed outright (SIGKILL, a power cut) are
    removed by the next compile into the same ``out``.
    """
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(out)
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=out))
    except OSError as exc:
        raise YoloPruneError(
            f"--out {out}: cannot write there ({exc.strerror or exc}); choose a writable folder"
        ) from exc
    try:
        yield staging
        with signals_held():  # an interrupt now would leave old and new results mixed
            _remove_previous_results(out)
            for item in sorted(staging.iterdir()):
                item.replace(out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def _remove_stale_staging(out: Path) -> None:
    """Staging folders of compiles that are no longer running (named ``.staging-<pid>-*``)."""
    for folder in out.glob(f"{STAGING_PREFIX}*"):
        pid = folder.name[len(STAGING_PREFIX) :].split("-", 1)[0]
        if folder.is_dir() and not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_previous_results(out: Path) -> None:
    """The files an earlier compile wrote into ``out`` (listed in its report.json)."""
    report = out / "report.json"
    try:
        files = json.loads(report.read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return  # no earlier compile here (or not one of ours): nothing to replace
    names = [*files.values(), *REPORT_FILES] if isinstance(files, dict) else list(REPORT_FILES)
    for name in names:
        path = out / str(name)
        if isinstance(name, str) and path.parent == out and path.is_file():
            path.unlink()


@dataclass
class Job:
    """One compile: its options, data, staging folder, and the artifacts the stages add."""

    options: CompileOptions
    data: object  # DataConfig or None
    staging: Path | None  # None: nothing is written (prune_in_memory)
    artifacts: dict = field(default_factory=dict)
    accuracy: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def __getitem__(self, name: str):
        return self.artifacts[name]


@dataclass(frozen=True)
class Stage:
    """A named step of the compile: ``run(job)`` returns the artifacts it makes. It runs only
    where ``when(options, data)`` holds, after the artifacts it ``requires`` exist, and must
    leave those it ``ensures``."""

    name: str
    run: Callable[[Job], dict]
    requires: tuple[str, ...] = ()
    ensures: tuple[str, ...] = ()
    when: Callable[[CompileOptions, object], bool] = lambda options, data: True


def _iterative_mode(options: CompileOptions, data) -> bool:
    return options.steps is not None and options.steps > 1


def _one_shot(options: CompileOptions, data) -> bool:
    return not _iterative_mode(options, data)


def _fine_tunes(options: CompileOptions, data) -> bool:
    return bool(data and options.epochs) and _one_shot(options, data)


def _load_stage(job: Job) -> dict:
    options, data = job.options, job.data
    prepared = prepare(
        options.model, options.imgsz, options.settings.grouping, options.allow_custom_modules
    )
    info = prepared.info
    mode = export_mode(prepared.model, options.export_mode)  # a wrong one fails before pruning
    if not info.pretrained:
        tqdm.write(
            f"WARNING: {options.model} is an architecture (YAML), not trained weights: "
            "random init. MACs and latency are real; accuracy is meaningless."
        )
    if data and data.nc != info.nc:
        raise PlanError(
            f"{options.data}: {data.nc} classes but {options.model} has {info.nc}; evaluate "
            "a model on the data it was trained for"
        )
    return {
        "prepared": prepared,
        "original": prepared.model,
        "mode": mode,
        "val": _val_dataset(data, prepared.imgsz),
    }


def _evaluation(model_key: str, label: str) -> Callable[[Job], dict]:
    def run(job: Job) -> dict:
        job.accuracy[label] = _eval(job[model_key], job["val"], job.data, job["mode"])
        return {}

    return run


def _finetuned_evaluation(job: Job) -> dict:
    """The fine-tuned model's mAP: the fine-tune's own evaluation of the model it kept where
    that is the very model exported, evaluated as here (on the CPU, in the export mode the
    compile exports; the same images and settings); else evaluated here."""
    training, pruned = job.artifacts.get("training"), job["pruned"]
    if (
        training is not None
        and training.best_metrics is not None
        and training.model is pruned
        and training.evaluated_on == "cpu"  # a GPU's TF32 convolutions score differently
        and job["mode"] == export_mode(pruned)
    ):
        job.accuracy["finetuned"] = training.best_metrics
        return {}
    return _evaluation("pruned", "finetuned")(job)


def _iterative_stage(job: Job) -> dict:
    return _iterative(job["prepared"], job.options, job.data, job.staging)


def _finetune_stage(job: Job) -> dict:
    training = _finetune(job["pruned"], job["prepared"], job.data, job.options, job.staging)
    return {"training": training, "pruned": _keep_sparsity(training.model, job["plan"])}


def _qat_stage(job: Job) -> dict:
    """``--precision int8 --epochs N``: the fine-tune runs with the INT8 quantizers in the loop;
    the fp32 files carry the same weights in the model's own form."""
    from yoloprune.compiler.train.qat import quantization_aware_training

    options, prepared = job.options, job["prepared"]
    settings = dataclasses.replace(options.settings.train, imgsz=prepared.imgsz)
    qat = quantization_aware_training(
        job["pruned"],
        prepared.info,
        job.data,
        settings,
        options.settings.calibration,
        teacher=prepared.model if settings.distill else None,
    )
    return {"training": qat.training, "pruned": qat.fp32, "qat": qat}


def _unstructured_replay(job: Job, flag: str, given) -> bool:
    """Whether the plan is a replayed unstructured one, whose zeros reconstruction and
    recalibration would undo (a fresh unstructured compile never runs them): skipped, or,
    where the user asked for it (``flag`` ``given``), refused."""
    if job["plan"].method != "unstructured":
        return False
    if given:
        raise PlanError(
            f"{flag} follows channel pruning; the plan {job.options.plan} zeroes weights "
            "(unstructured), which it would undo: drop it"
        )
    return True


def _reconstruct_stage(job: Job) -> dict:
    """The pruned model re-fitted to the original's layer outputs on unlabeled images."""
    prepared, plan = job["prepared"], job["plan"]
    if _unstructured_replay(job, "--reconstruct-images", job.options.reconstruct_images):
        return {"reconstructed": None}
    return {
        "reconstructed": _reconstruct(prepared.model, job["pruned"], plan, prepared, job.options)
    }


def _reconstruct(original, pruned, plan: PruningPlan, prepared: Prepared, options) -> dict:
    from yoloprune.compiler.reconstruct import reconstruct_pruned

    return reconstruct_pruned(
        original,
        pruned,
        lambda model: apply_plan(model, plan),
        options.settings.reconstruction,
        prepared.imgsz,
        fixed=family_named(prepared.info.family).unquantized(pruned),
    )


def _recalibrate(model, options: CompileOptions, imgsz: int) -> int:
    from yoloprune.compiler.train.recalibrate import recalibrate_on_data

    return recalibrate_on_data(model, options.data, imgsz, seed=options.seed)


def _save_stage(job: Job) -> dict:
    """Plan (its MACs counted on the models), pruned checkpoint, and for ultralytics models the
    checkpoint stock ultralytics loads."""
    prepared, pruned = job["prepared"], job["pruned"]
    info, imgsz = prepared.info, prepared.imgsz
    plan = counted(job["plan"], prepared.model, pruned, imgsz, job["mode"])
    replayed = job.options.plan
    warnings = [] if replayed is None else replay_warnings(job["plan"], plan, str(replayed))
    name = info.name.removesuffix("-pruned")
    paths = {
        "checkpoint": job.staging / f"{name}-pruned.pt",
        "onnx": job.staging / f"{name}-pruned.onnx",
        "plan": job.staging / f"{name}-plan.json",
    }
    plan.save(paths["plan"])
    save_pruned(pruned, info, paths["checkpoint"], extra={"plan": paths["plan"].name})
    rewritten, family = None, family_named(info.family)
    if family.native_suffix:
        paths[family.name] = job.staging / f"{name}{family.native_suffix}"
        rewritten = family.save_native(pruned, info.names, imgsz, paths[family.name])
    return {"plan": plan, "paths": paths, "rewritten": rewritten, "replay_warnings": warnings}


def _export_stage(job: Job) -> dict:
    options = job.options
    export_onnx(
        job["pruned"],
        job["paths"]["onnx"],
        job["prepared"].imgsz,
        dynamic=options.dynamic,
        simplify=options.simplify,
        mode=job["mode"],
    )
    return {"onnx": job["paths"]["onnx"]}


def _parity_stage(job: Job) -> dict:
    options = job.options
    tolerance = options.settings.parity_tolerance
    parity = check_parity(
        job["pruned"],
        job["onnx"],
        job["prepared"].imgsz,
        tolerance=tolerance,
        threads=options.threads,
    )
    parity.require(job["onnx"].name)
    return {"parity": parity}


def _precision_stage(job: Job) -> dict:
    """The exported file lowered to ``--precision`` beside it, parity checked at its tolerance."""
    from yoloprune.compiler.precision import lower_checked

    options = job.options
    precision = options.precision
    path, parity, record = lower_checked(
        job["pruned"],
        job["onnx"],
        job["prepared"].imgsz,
        precision,
        threads=options.threads,
        tolerance=options.precision_parity_tolerance,
        calibration=options.settings.calibration,
        mode=job["mode"],
        dynamic=options.dynamic,
        trained=job.artifacts.get("qat"),
        keep_float=_sensitivity_step(job),
    )
    job["paths"][f"onnx_{precision}"] = path
    lowered = {
        "file": path.name,
        "onnx_bytes": path.stat().st_size,
        "parity": parity.to_dict(),
        "quantization": record,
    }
    if job["val"] is not None:  # the lowered file's own mAP, on ONNX Runtime
        metrics = _eval_onnx(path, job["val"], job.data, options)
        lowered.update(map50_95=metrics.map50_95, map50=metrics.map50)
    return {"precisions": {precision: lowered}}


def _sensitivity_step(job: Job):
    """``--int8-max-map-drop``: the sensitivity pass on the data's train split, else None."""
    sensitivity = job.options.settings.sensitivity
    if sensitivity is None:
        return None
    from yoloprune.compiler.sensitivity import keeper

    calibration = job.options.settings.calibration
    return keeper(
        sensitivity, job.data, job["prepared"].imgsz, job["mode"], exclude=calibration.files
    )


def _eval_onnx_stage(job: Job) -> dict:
    job.accuracy["onnx"] = _eval_onnx(job["onnx"], job["val"], job.data, job.options)
    return {}


def _bench_stage(job: Job) -> dict:
    prepared = job["prepared"]
    baseline = (prepared.model, prepared.imgsz, job["mode"])
    return {"latency": _bench(baseline, job["onnx"], job.options)}


def _report_stage(job: Job) -> dict:
    prepared, pruned, plan, paths = job["prepared"], job["pruned"], job["plan"], job["paths"]
    mode = job["mode"]
    report = build_report(
        info=prepared.info,
        plan=plan,
        groups=prepared.groups,
        imgsz=prepared.imgsz,
        params=(count_params(prepared.model), count_params(pruned)),
        onnx_bytes=paths["onnx"].stat().st_size,
        parity=job["parity"],
        latency=job.artifacts.get("latency"),
        seconds=dict(job.seconds),
        options=job.options,
        files={k: p.name for k, p in paths.items()},
    )
    report["accuracy"] = _accuracy_section(
        job.accuracy,
        job.artifacts.get("training"),
        job.data,
        job.artifacts.get("recalibrated", 0),
    )
    report["reconstruction"] = job.artifacts.get("reconstructed")
    fp32 = {
        "file": paths["onnx"].name,
        "onnx_bytes": paths["onnx"].stat().st_size,
        "parity": job["parity"].to_dict(),
    }
    if "onnx" in job.accuracy:
        fp32.update(map50_95=job.accuracy["onnx"].map50_95, map50=job.accuracy["onnx"].map50)
    report["precisions"] = {"fp32": fp32, **job.artifacts.get("precisions", {})}
    layout = output_layout(pruned, mode)
    report["export"] = {"mode": mode, "layout": layout, "output0": OUTPUT_LAYOUTS[layout]}
    family = prepared.info.family
    if family_named(family).native_suffix:  # the file the family's own tools load
        report["export"][f"{family}_checkpoint"] = {
            "file": paths[family].name,
            "blocks_kept_as_yoloprune_classes": job["rewritten"],
        }
    if plan.method == "unstructured":
        report["sparsity"] = {
            "conv_weights_zero": sparsity(pruned),
            "requested": plan.target["value"],
        }
    report["warnings"] += job.artifacts.get("replay_warnings", [])
    write_report(report, job.staging)
    return {"report": report}


# The compile, in order. Each stage names what it needs and what it leaves; compile_model runs
# those whose condition holds (the progress bar counts them), and an error names its stage.
STAGES: tuple[Stage, ...] = (
    Stage("load + graph", _load_stage, ensures=("prepared", "original", "mode", "val")),
    Stage(
        "eval original",
        _evaluation("original", "original"),
        requires=("original", "val"),
        when=lambda options, data: bool(data),
    ),
    Stage(
        "iterative prune + fine-tune",
        _iterative_stage,
        requires=("prepared",),
        ensures=("plan", "pruned"),
        when=_iterative_mode,
    ),
    Stage(
        "score + plan",
        lambda job: {"plan": plan_for(job["prepared"], job.options)},
        requires=("prepared",),
        ensures=("plan",),
        when=_one_shot,
    ),
    Stage(
        "apply",
        lambda job: {"pruned": apply_any(job["prepared"].model, job["plan"])},
        requires=("prepared", "plan"),
        ensures=("pruned",),
        when=_one_shot,
    ),
    Stage(
        "reconstruct",
        _reconstruct_stage,
        requires=("prepared", "plan", "pruned"),
        ensures=("reconstructed",),
        when=lambda options, data: (
            _one_shot(options, data) and options.settings.reconstruction is not None
        ),
    ),
    Stage(
        "recalibrate",
        lambda job: {
            "recalibrated": 0
            if _unstructured_replay(job, "--recalibrate", job.options.recalibrate)
            else _recalibrate(job["pruned"], job.options, job["prepared"].imgsz)
        },
        requires=("pruned",),
        ensures=("recalibrated",),
        when=lambda options, data: _one_shot(options, data) and _recalibrates(options, data),
    ),
    Stage(
        "eval pruned",
        _evaluation("pruned", "pruned"),
        requires=("pruned", "val"),
        when=lambda options, data: bool(data) and _one_shot(options, data),
    ),
    Stage(
        "fine-tune",
        _finetune_stage,
        requires=("pruned", "plan"),
        ensures=("training", "pruned"),
        when=lambda options, data: _fine_tunes(options, data) and options.precision != "int8",
    ),
    Stage(
        "quantization-aware fine-tune",
        _qat_stage,
        requires=("pruned", "prepared"),
        ensures=("training", "pruned", "qat"),
        when=lambda options, data: _fine_tunes(options, data) and options.precision == "int8",
    ),
    Stage(
        "eval fine-tuned",
        _finetuned_evaluation,
        requires=("pruned", "val"),
        when=lambda options, data: bool(data) and bool(options.epochs),
    ),
    Stage(  # iterative steps without fine-tuning: the composed model is the pruned one
        "eval pruned (steps)",
        _evaluation("pruned", "pruned"),
        requires=("pruned", "val"),
        when=lambda options, data: (
            bool(data) and not options.epochs and _iterative_mode(options, data)
        ),
    ),
    Stage("save", _save_stage, requires=("plan", "pruned"), ensures=("plan", "paths")),
    Stage("export", _export_stage, requires=("pruned", "paths"), ensures=("onnx",)),
    Stage("parity", _parity_stage, requires=("pruned", "onnx"), ensures=("parity",)),
    Stage(
        "precision",
        _precision_stage,
        requires=("pruned", "onnx", "paths"),
        ensures=("precisions",),
        when=lambda options, data: options.precision not in (None, "fp32"),
    ),
    Stage(
        "eval onnx",
        _eval_onnx_stage,
        requires=("onnx", "val"),
        when=lambda options, data: bool(data),
    ),
    Stage(
        "bench",
        _bench_stage,
        requires=("prepared", "onnx"),
        ensures=("latency",),
        when=lambda options, data: options.bench,
    ),
    Stage("report", _report_stage, requires=("plan", "parity", "paths"), ensures=("report",)),
)


def compile_model(options: CompileOptions) -> dict:
    """Run the whole job (:data:`STAGES`); return the report dict. Outputs land in
    ``options.out``, all at once at the end."""
    out = options.settings.out
    data = _data_for(options)
    stages = [stage for stage in STAGES if stage.when(options, data)]
    with (
        staged_output(out) as staging,
        tqdm(total=len(stages), desc="compile", unit="stage", leave=False, disable=None) as bar,
    ):
        job = Job(options, data, staging)
        for stage in stages:
            bar.set_description(stage.name)
            run_stage(stage, job)
            bar.update()
    return job["report"]


# What a compile of one point shares with the others in a sweep (compile_shared).
SHARED_STAGES = ("load + graph", "eval original")


def compile_shared(options: CompileOptions, shared: Job) -> dict:
    """Compile ``options`` reusing ``shared``'s load + graph, data and original evaluation (a
    job that ran :data:`SHARED_STAGES` on the same model, image size and data); outputs land in
    ``options.out`` as :func:`compile_model`'s do. Returns the report dict."""
    with staged_output(options.settings.out) as staging:
        job = Job(options, shared.data, staging)
        job.artifacts.update(
            {k: shared.artifacts[k] for k in ("prepared", "original", "mode", "val")}
        )
        job.accuracy.update({k: v for k, v in shared.accuracy.items() if k == "original"})
        _run_stages(job, lambda name: name not in SHARED_STAGES)
    return job["report"]


def shared_job(options: CompileOptions) -> Job:
    """Run :data:`SHARED_STAGES` once (trace, original mAP) for :func:`compile_shared`."""
    job = Job(options, _data_for(options), staging=None)
    _run_stages(job, lambda name: name in SHARED_STAGES)
    return job


def _run_stages(job: Job, wanted: Callable[[str], bool]) -> None:
    """Run, in order, the stages ``wanted`` by name whose condition holds for ``job``."""
    for stage in STAGES:
        if wanted(stage.name) and stage.when(job.options, job.data):
            run_stage(stage, job)


# The stages that build the pruned model in memory (nothing written, no evaluation).
IN_MEMORY_STAGES = ("load + graph", "score + plan", "apply", "reconstruct", "recalibrate")


def prune_in_memory(options: CompileOptions, prepared: Prepared | None = None) -> Job:
    """Run the compile's own in-memory stages on ``options`` (load + graph unless ``prepared``
    is given, then score + plan, apply, reconstruct and recalibrate where compile would): the
    model compile would write, built the same way, for benchmarks and notebooks. Returns the job
    (its ``plan``, ``pruned``, ``reconstructed``, ``recalibrated`` artifacts)."""
    if _iterative_mode(options, None):
        raise PlanError("prune_in_memory runs one-shot compiles; --steps needs compile itself")
    job = Job(options, _data_for(options), staging=None)
    stages = set(IN_MEMORY_STAGES)
    if prepared is not None:
        job.artifacts.update(prepared=prepared, original=prepared.model)
        stages.discard("load + graph")
    _run_stages(job, stages.__contains__)
    return job


def run_stage(stage: Stage, job: Job) -> None:
    """Run one stage: check what it requires, time it (the report lists every stage but its
    own), add its artifacts, check what it ensures. A user error names the stage."""
    missing = [name for name in stage.requires if name not in job.artifacts]
    if missing:
        raise YoloPruneError(f"internal error: stage {stage.name!r} needs {missing}")
    start = time.perf_counter()
    try:
        made = stage.run(job)
    except YoloPruneError as exc:
        raise type(exc)(f"{stage.name}: {exc}") from exc
    job.seconds[stage.name] = round(time.perf_counter() - start, 3)
    job.artifacts.update(made)
    missing = [name for name in stage.ensures if name not in job.artifacts]
    if missing:
        raise YoloPruneError(f"internal error: stage {stage.name!r} did not make {missing}")


def _data_for(options: CompileOptions):
    from yoloprune.compiler.train.data import read_data_yaml

    if options.data is None:
        if options.epochs:
            raise PlanError("--epochs needs --data data.yaml (what to fine-tune on)")
        return None
    return read_data_yaml(options.data)


def _recalibrates(options: CompileOptions, data) -> bool:
    """BatchNorm statistics are re-estimated after structured pruning when training images are
    at hand and no reconstruction ran (it sets each BatchNorm's shift itself, and measured
    better without re-estimation; ``--recalibrate`` asks for both); the unstructured baseline
    stays as yolov5's torch_utils.prune leaves it."""
    wanted = options.recalibrate
    if wanted is None:
        wanted = options.settings.reconstruction is None
    return bool(data and data.train) and wanted and options.method == "structured"


def _val_dataset(data, imgsz: int):
    """Read and check the validation split once; every evaluation of the job shares it."""
    from yoloprune.compiler.evaluation.evaluate import val_dataset

    return val_dataset(data, imgsz) if data else None


def _eval(model, val, data, mode: str | None = None):
    """PyTorch mAP of ``model`` as it is exported in ``mode`` (so it compares with ONNX's)."""
    from yoloprune.compiler.evaluation.evaluate import evaluate, torch_predictor

    return evaluate(torch_predictor(model, mode), val, data.names, progress=False)


def _eval_onnx(path: Path, val, data, options: CompileOptions):
    from yoloprune.compiler.evaluation.evaluate import evaluate, onnx_predictor

    with onnx_predictor(path, options.threads) as predict:
        return evaluate(predict, val, data.names, runtime="onnxruntime", progress=False)


def _finetune(pruned, prepared: Prepared, data, options: CompileOptions, staging: Path):
    from yoloprune.compiler.train.finetune import train

    settings = dataclasses.replace(options.settings.train, imgsz=prepared.imgsz)
    teacher = prepared.model if settings.distill else None
    work = staging / "finetune"
    work.mkdir()
    try:
        return train(pruned, prepared.info, data, settings, teacher=teacher, save_dir=work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _iterative(prepared: Prepared, options: CompileOptions, data, staging: Path):
    """Prune in ``options.steps`` equal steps (geometric in MACs or channels kept), scoring the
    current model at each step and fine-tuning it between steps (epochs split evenly), with the
    original as teacher; after each step's surgery the step's model is reconstructed from the one
    before it and/or its BatchNorm statistics re-estimated, as a one-shot compile would. Returns
    the artifacts: the composed plan (against the original), the model, the last training, the
    images each recalibration saw (0: none) and the last step's reconstruction record."""
    k, target = options.steps, options.settings.target
    per_step = step_epochs(options.epochs or 0, k)
    # no step leaves a group fewer channels than --max-ratio of its original size allows
    max_ratio = options.settings.constraints.max_ratio
    least = tuple((g.id, math.ceil(g.size * (1 - max_ratio))) for g in prepared.groups)
    current, composed, training, recalibrated, reconstructed = prepared, None, None, 0, None
    macs_original, history, seconds = None, [], 0.0
    for i in range(1, k + 1):
        macs_now = mac_counter(current, options.export_mode).macs()
        macs_original = macs_original or macs_now
        if target.kind == "macs":
            goal = target.value ** (i / k) * macs_original / macs_now
            step_options = dataclasses.replace(options, macs=min(goal, 0.999), ratio=None)
        else:
            step_options = dataclasses.replace(options, ratio=1 - (1 - target.value) ** (1 / k))
        if composed is not None:  # the alignment the first step chose (or was given) holds
            step_options = dataclasses.replace(step_options, round_to=composed.round_to)
        plan = plan_for(current, step_options, kept_at_least=least)
        model = apply_plan(current.model, plan)
        if options.settings.reconstruction is not None:
            reconstructed = _reconstruct(current.model, model, plan, current, options)
        if _recalibrates(options, data):
            recalibrated = _recalibrate(model, options, prepared.imgsz)
        composed = plan if composed is None else composed.then(plan)
        if per_step[i - 1]:
            teacher_options = dataclasses.replace(options, epochs=per_step[i - 1], steps=None)
            step_training = _finetune(model, prepared, data, teacher_options, staging)
            history += [{**record, "step": i} for record in step_training.history]
            seconds += step_training.seconds
            # every step's epochs in one history (the report's fine-tune line counts them all)
            training = dataclasses.replace(
                step_training, history=list(history), seconds=round(seconds, 1)
            )
            model = training.model
        limits = options.settings.grouping
        graph = build_graph(model, limits=limits)
        groups = channel_groups(model, graph, limits, custom_modules=options.allow_custom_modules)
        current = Prepared(model, prepared.info, prepared.imgsz, groups, graph)
    composed = dataclasses.replace(
        composed,
        target={"kind": target.kind, "value": target.value, "steps": k},
        macs_before=macs_original,
    )
    made = {"plan": composed, "pruned": current.model, "training": training}
    made["recalibrated"] = recalibrated
    if reconstructed is not None:
        made["reconstructed"] = reconstructed
    return made


def step_epochs(epochs: int, steps: int) -> list[int]:
    """``epochs`` split over ``steps`` as evenly as whole epochs allow, the earlier steps
    taking the remainder: they add up to ``epochs`` (the options refuse fewer than steps)."""
    return [epochs // steps + (i < epochs % steps) for i in range(steps)]


def _keep_sparsity(model, plan: PruningPlan):
    """Fine-tuning an unstructured model regrows its zeros: zero them again (as yolov5 does
    after training with torch_utils.prune), so the reported model is what was evaluated."""
    if plan.method != "unstructured":
        return model
    return sparsify(model, plan.target["value"])


def _accuracy_section(accuracy: dict, training, data, recalibrated: int = 0) -> dict:
    if not accuracy:
        return {}
    section = {
        "data": str(data.root),
        "settings": "val.py conventions: conf 0.001, IoU 0.6, max 300 detections, pycocotools",
        "map50_95": {k: m.map50_95 for k, m in accuracy.items()},
        "map50": {k: m.map50 for k, m in accuracy.items()},
        "per_class": {k: m.per_class for k, m in accuracy.items()},
        "images": next(iter(accuracy.values())).images,
        "data_check": next(iter(accuracy.values())).data_check,
        # training images (per step in iterative mode); 0: the original statistics were kept
        "batchnorm_recalibrated_on": recalibrated,
    }
    if training is not None:
        section["finetune"] = {
            "history": training.history,
            "seconds": training.seconds,
            "mixed_precision": training.mixed_precision,
            "recipe": training.recipe,
            "kept_between_epochs": training.cache,
        }
    return section


def export_baseline(original, path: Path, imgsz: int, mode: str, options) -> Path:
    """The unpruned model's ONNX file, exported as the compile exports the pruned one (the same
    export mode, batch axis and simplification), so their latencies compare."""
    return export_onnx(
        original, path, imgsz, dynamic=options.dynamic, simplify=options.simplify, mode=mode
    )


def _profile(baseline_onnx: Path, pruned_onnx: Path, images, options: CompileOptions) -> dict:
    """Both files under ONNX Runtime's profiler, one after the other, with the timing's
    threads, spinning and warm-up, and the pruned one's kernel-time ratio split against the
    original's (:func:`kernels.profile.split_against`). A profile that cannot be split is
    recorded as skipped, with why: it explains the latency, the compile's files stand."""
    from yoloprune.kernels.ort import default_threads
    from yoloprune.kernels.profile import PROFILE_MAX_RUNS, profile_onnx, split_against

    runs = min(options.settings.bench_runs, PROFILE_MAX_RUNS)
    threads = options.threads or default_threads()
    conditions = {"runs": runs, "warmup": BENCH_WARMUP, "threads": threads}
    conditions["spinning"] = options.spinning
    try:
        before, after = (
            profile_onnx(path, images, runs, BENCH_WARMUP, threads, options.spinning)
            for path in (baseline_onnx, pruned_onnx)
        )
        split = split_against(after, before)
    except ValueError as exc:
        return {**conditions, "skipped": str(exc)}
    return {
        **conditions,
        "before": before.to_dict(convs=False),
        "after": after.to_dict(convs=False),
        "split": split,
    }


def _bench(baseline: tuple, pruned_onnx: Path, options: CompileOptions) -> dict:
    """ONNX Runtime CPU latency, batch 1, baseline (model, imgsz, export mode) and pruned
    interleaved (A B A B)."""
    from yoloprune.compiler.bench import seeded_images
    from yoloprune.kernels.ort import OrtRunner, machine_info, time_runners

    original, imgsz, mode = baseline
    with tempfile.TemporaryDirectory() as tmp:
        baseline_onnx = export_baseline(original, Path(tmp) / "baseline.onnx", imgsz, mode, options)
        before = OrtRunner(baseline_onnx, options.threads, options.spinning)
        after = OrtRunner(pruned_onnx, options.threads, options.spinning)
        images = seeded_images(1, imgsz)
        runs = options.settings.bench_runs
        with before, after:
            timings = time_runners(
                {"before": before, "after": after}, images, runs, warmup=BENCH_WARMUP
            )
        baseline_bytes = baseline_onnx.stat().st_size
        profile = _profile(baseline_onnx, pruned_onnx, images, options) if options.profile else None
    result = {
        "runtime": "onnxruntime (CPUExecutionProvider, ORT_ENABLE_ALL)",
        "batch": 1,
        "imgsz": imgsz,
        "precision": "fp32",
        "threads": after.threads,
        "spinning": after.spinning,
        "order": after.order_text(),
        "before": timings["before"].to_dict(),
        "after": timings["after"].to_dict(),
        "ratio": timings["after"].median_ms / timings["before"].median_ms,
        "baseline_onnx_bytes": baseline_bytes,
        "machine": machine_info(),
    }
    if profile:
        result["profile"] = profile
    return result
