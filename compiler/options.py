"""Options: a compile's flags validated once, then resolved into the settings each pass takes
(Target, Constraints, GroupingLimits, the planner and importance by name, LatencySettings,
TrainSettings), with every default in this file. Nothing downstream reads a raw flag or
substitutes a default of its own: every value is honoured or refused here, before any work.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from yoloprune.compiler.export import DEFAULT_PARITY_TOLERANCE
from yoloprune.compiler.latency_planner import LatencySettings
from yoloprune.compiler.planner import Constraints, Target
from yoloprune.compiler.precision import PRECISIONS
from yoloprune.compiler.quantize import (
    CALIBRATION_METHODS,
    INT8_FLOAT_PRECISIONS,
    calibration_for,
    refuse_unused_flags,
)
from yoloprune.compiler.score import IMAGE_IMPORTANCES, IMPORTANCES
from yoloprune.compiler.train.finetune import TrainSettings
from yoloprune.graphs.checkpoint import MAX_IMGSZ, MIN_IMGSZ
from yoloprune.graphs.dependency import GroupingLimits
from yoloprune.graphs.errors import PlanError

DEFAULT_MACS = 0.5
DEFAULT_IMPORTANCE = "l2"
# With unlabeled images at hand (--calib-images, or --data's train split) channels are scored by
# the output energy they carry into their consumers: on the embedded YOLOv5n with reconstruction,
# 0.936 / 0.887 of the original's mAP at MACs 0.7 / 0.5 against L2's 0.908 / 0.858 (YOLOv8n:
# level); benchmarks/results/oneshot.md.
DEFAULT_IMAGE_IMPORTANCE = "energy"
# How channels are shared among groups (compiler.planners): the same fraction everywhere, one
# score threshold, or measured sensitivity (compiler.allocation), which reads images.
ALLOCATIONS = ("uniform", "global", "sensitivity")
# With unlabeled images at hand, a --macs or --ratio plan is allocated by measured sensitivity:
# at MACs 0.5 one-shot on the trained YOLOv5n / YOLOv8n / YOLO26n it ran at 0.668 / 0.691 /
# 0.699 of the original's ORT CPU time against uniform's 0.669 / 0.684 / 0.690, mAP 0.695 /
# 0.762 / 0.760 against 0.704 / 0.748 / 0.673 (benchmarks/results/allocation.md); at make
# compile's point (MACs 0.35), seeds 0-2: fine-tuned mAP 0.8044 against 0.7987, latency ratio
# 0.523 against 0.512 (benchmarks/results/demo_allocation.md).
DEFAULT_IMAGE_ALLOCATION = "sensitivity"
# --allocation sensitivity's images by default: 32 at 256 px, and as many pixels at larger
# sizes (at least 8): YOLOv5s at 640 measures 8 images in about a minute on 2 cores
DEFAULT_ALLOCATION_IMAGES = 32
ALLOCATION_IMAGES_AT = 256
MIN_DEFAULT_ALLOCATION_IMAGES = 8
# --allocation sensitivity's default --max-ratio: measured per group alone, removals compound
# along a path; without a floor the allocation empties groups (compiler.allocation). 0.6 down
# to MACs 0.5, more below (sensitivity_max_ratio), never more than SENSITIVITY_MAX_RATIO_CAP:
# every group keeps a tenth (the curves are measured down to a quarter kept; below that the
# allocation follows their last segment), and the default never reaches 1, which --max-ratio
# refuses (at --ratio 0.87 or --macs 0.018 the rule alone would give it)
SENSITIVITY_MAX_RATIO = 0.6
SENSITIVITY_MAX_RATIO_CAP = 0.9
DEFAULT_OUT = Path("runs/compile")
DEFAULT_LATENCY_RUNTIME = "ort"
DEFAULT_BENCH_RUNS = 20
# Channel alignment: measured on the latency runtime and checked for accuracy
# (compiler/alignment.py); a number given with --round-to is used as it is.
DEFAULT_ROUND_TO = "auto"


@dataclass(frozen=True)
class CompileOptions:
    """Every field None means "the library default"."""

    model: str
    imgsz: int | None = None
    ratio: float | None = None
    macs: float | None = None
    importance: str | None = None
    global_allocation: bool = False
    # how channels are shared among groups: uniform (default), global (= --global), or
    # sensitivity (measured on unlabeled images: compiler.allocation)
    allocation: str | None = None
    allocation_images: int | None = None  # images --allocation sensitivity measures on
    latency_aware: bool = False  # --macs allocated by importance per millisecond saved
    round_to: int | str | None = None  # a number, or "auto" (the default): measured
    max_ratio: float | None = None
    drop_blocks: bool = False  # latency-aware: residual blocks may be removed whole
    out: Path | None = None
    bench: bool = True
    profile: bool = False  # the bench step also profiles both files (kernels.profile)
    dynamic: bool = False
    simplify: bool = True
    plan: Path | None = None
    parity_tolerance: float | None = None
    threads: int | None = None
    spinning: bool = False  # ONNX Runtime intra-op thread spinning when timing (see kernels.ort)
    bench_runs: int | None = None
    seed: int = 0
    method: str = "structured"
    data: Path | None = None
    epochs: int | None = None
    batch: int | None = None
    distill: float | None = None
    optimizer: str | None = None
    lr0: float | None = None
    augment: bool | None = None  # fine-tune augmentation: flips, HSV and scale jitter
    amp: bool | None = None  # fine-tune mixed precision (None: TrainSettings' auto rule)
    eval_every: int | None = None  # validate every N epochs and after the last (0: the last)
    # re-estimate BatchNorm statistics on --data's train split after pruning (default: where
    # no reconstruction runs)
    recalibrate: bool | None = None
    reconstruct: bool = True  # re-fit the kept weights on calibration images (--data's, or
    reconstruct_images: int | None = None  # --calib-images) after pruning; how many images
    steps: int | None = None  # iterative mode: prune in this many steps, fine-tuning between
    speedup: float | None = None  # latency-aware: measured baseline / pruned latency
    latency_ms: float | None = None  # latency-aware: a budget in milliseconds
    latency_runtime: str | None = None  # the runtime the latency table is measured on (ort)
    latency_table: Path | None = None  # the table file (default: per-device cache)
    latency_batch: int | None = None  # the batch latency is planned and profiled at (1)
    export_mode: str | None = None  # raw | end2end (default: end2end where the head has it)
    group_seconds: float | None = None  # guard on tracing/group building
    group_memory_gib: float | None = None
    # ultralytics: let split blocks' halves differ (the pruned file then needs yoloprune)
    allow_custom_modules: bool = False
    precision: str | None = None  # also lower the exported ONNX to this precision (fp16, int8)
    calib_images: Path | None = None  # reconstruction, int8: a folder of images (else --data's)
    calib_count: int | None = None  # int8: at most this many calibration images
    calib_method: str | None = None  # int8: how activation ranges are set (default max)
    int8_float: str | None = None  # int8: the precision of the file's float part (fp16)
    int8_max_map_drop: float | None = None  # int8: keep sensitive convs in float within this
    int8_sensitivity_images: int | None = None  # train images the sensitivity pass measures on
    precision_parity_tolerance: float | None = None  # the lowered file's (default per precision)

    def __post_init__(self) -> None:
        """Every value is honoured or refused here, before any work (never replaced)."""
        for name in (*(r[0] for r in _INT_RANGES), *(c[0] for c in _CHOICES)):
            value = getattr(self, name)
            if value is not None:
                checked_choice(name, value)
        for name, low, high, open_low in _FLOAT_RANGES:
            value = getattr(self, name)
            if value is None:
                continue
            if not (isinstance(value, int | float) and math.isfinite(value)) or not (
                (low < value if open_low else low <= value) and value <= high
            ):
                bound = "(" if open_low else "["
                shown = f"{value:g}" if isinstance(value, int | float) else repr(value)
                raise PlanError(f"--{_flag(name)} {shown}: must be in {bound}{low:g}, {high:g}]")
        if self.latency_runtime == "torch":
            refuse_absent_runtime("torch")
        if self.round_to is not None and self.round_to != "auto" and type(self.round_to) is not int:
            raise PlanError(f"--round-to {self.round_to}: give a positive integer or auto")
        self._check_paths()
        self.settings  # noqa: B018  (resolving refuses combinations that select nothing)

    @cached_property
    def settings(self) -> CompileSettings:
        """The options resolved, defaults applied (computed once); flag combinations are
        refused before any file is read."""
        sensitivity = sensitivity_for(self.int8_max_map_drop, self.int8_sensitivity_images)
        target = self.target()
        if self.steps is not None and self.steps > 1:
            if self.method != "structured" or self.plan is not None:
                raise PlanError(
                    "--steps works with structured planning only (no --plan, no unstructured)"
                )
            if target.latency:
                raise PlanError("--steps takes --macs or --ratio; latency targets plan in one step")
            if self.epochs and self.epochs < self.steps:
                raise PlanError(
                    f"--epochs {self.epochs} with --steps {self.steps}: every step fine-tunes "
                    f"at least one epoch; give --epochs {self.steps} or more, or fewer steps"
                )
        importance = self.importance
        if importance is None:
            reads = self.images is not None and self.plan is None and self.method == "structured"
            importance = DEFAULT_IMAGE_IMPORTANCE if reads else DEFAULT_IMPORTANCE
        if importance == "taylor" and self.data is None and self.plan is None:
            raise PlanError(
                "--importance taylor needs --data data.yaml (it scores channels by the "
                "detection loss's gradients on training images)"
            )
        if importance in IMAGE_IMPORTANCES and self.images is None and self.plan is None:
            raise PlanError(
                f"--importance {importance} reads unlabeled images: add --calib-images DIR or "
                "--data data.yaml (its train split)"
            )
        self._refuse_ignored()
        planner = "replay" if self.plan is not None else planner_name(self, target)
        group_sensitivity = measures_group_sensitivity(self, planner)
        self._check_allocation(group_sensitivity)
        runtime = LatencySettings(
            runtime=DEFAULT_LATENCY_RUNTIME
            if self.latency_runtime is None
            else self.latency_runtime,
            threads=self.threads,
            spinning=self.spinning,
            table=self.latency_table,
            batch=self.latency_batch or 1,
        )
        latency = runtime if planner in ("latency", "latency-aware") else None
        if self.latency_table is not None and latency is None:
            raise PlanError(
                f"--latency-table {self.latency_table} is the latency planners' per-layer table "
                "(--speedup, --latency-ms, --latency-aware); none runs here: drop it"
            )
        round_to = DEFAULT_ROUND_TO if self.round_to is None else self.round_to
        aligns = round_to == "auto" and planner not in ("replay", "unstructured")
        if self.latency_batch is not None and latency is None and not aligns:
            raise PlanError(
                f"--latency-batch {self.latency_batch} is the batch the latency planners and "
                "--round-to auto measure at; neither runs here: drop it"
            )
        if self.latency_runtime == "tensorrt":
            _check_tensorrt_timing(latency is not None, aligns)
            runtime = dataclasses.replace(runtime, precision=self.timed_precision())
        reconstruction = self.reconstruction()
        reads_images = (
            reconstruction
            or importance in IMAGE_IMPORTANCES
            or self.precision == "int8"
            or group_sensitivity
        )
        if self.calib_images is not None and not reads_images:
            raise PlanError(
                f"--calib-images {self.calib_images} feeds reconstruction, --importance "
                f"{'/'.join(IMAGE_IMPORTANCES)}, --allocation sensitivity and INT8 calibration; "
                "none runs here: drop it"
            )
        calibration = calibration_for(
            self.precision,
            self.calib_images,
            self.data,
            self.calib_count,
            self.calib_method,
            self.int8_float,
        )
        if sensitivity is not None and self.data is not None:  # its images, checked now
            from yoloprune.compiler.sensitivity import measured_files
            from yoloprune.compiler.train.data import read_data_yaml

            measured_files(read_data_yaml(self.data), sensitivity.images, calibration.files)
        constraints = self.constraints(target if group_sensitivity else None)
        if planner not in ("replay", "unstructured"):
            self._refuse_ratio_above_floor(target, constraints)
        return CompileSettings(
            alignment=runtime if aligns else None,
            reconstruction=reconstruction,
            sensitivity=sensitivity,
            calibration=calibration,
            target=target,
            constraints=constraints,
            grouping=self.grouping_limits(),
            planner=planner,
            group_sensitivity=group_sensitivity,
            importance=importance,
            allocation_images=self.allocation_images,
            latency=latency,
            train=_train_settings(self),
            out=DEFAULT_OUT if self.out is None else Path(self.out),
            bench_runs=DEFAULT_BENCH_RUNS if self.bench_runs is None else self.bench_runs,
            parity_tolerance=(
                DEFAULT_PARITY_TOLERANCE if self.parity_tolerance is None else self.parity_tolerance
            ),
        )

    def _refuse_ratio_above_floor(self, target: Target, constraints: Constraints) -> None:
        """--ratio R removes R of every group (uniform) or of all channels: more than
        --max-ratio lets any group lose cannot be planned, and is refused, not capped."""
        if target.kind != "ratio" or target.value <= constraints.max_ratio:
            return
        default = "" if self.max_ratio is not None else " (its default here)"
        raise PlanError(
            f"--ratio {target.value:g} removes more channels than --max-ratio "
            f"{constraints.max_ratio:g}{default} lets any group lose: give --max-ratio "
            f"{target.value:g} or more, or a lower --ratio"
        )

    def _check_allocation(self, group_sensitivity: bool) -> None:
        if self.allocation_images is not None and not group_sensitivity:
            raise PlanError(
                f"--allocation-images {self.allocation_images} sizes --allocation sensitivity's "
                "measurement, which does not run here: drop it"
            )
        if group_sensitivity and self.images is None:
            raise PlanError(
                "--allocation sensitivity measures on unlabeled images: add --calib-images DIR "
                "or --data data.yaml (its train split)"
            )

    def _check_paths(self) -> None:
        if self.out is not None and Path(self.out).exists() and not Path(self.out).is_dir():
            raise PlanError(f"--out {self.out}: is a file; OUT must be a folder (new or existing)")
        if self.plan is not None and not Path(self.plan).is_file():
            raise PlanError(f"--plan {self.plan}: plan file not found; write one with `plan`")
        if self.latency_table is not None and Path(self.latency_table).is_dir():
            raise PlanError(
                f"--latency-table {self.latency_table}: is a folder; give a JSON file path "
                "(it is created if missing)"
            )

    def _refuse_ignored(self) -> None:
        """Flags a path would not use are refused, not ignored."""
        shaping = {
            "--ratio": self.ratio,
            "--macs": self.macs,
            "--speedup": self.speedup,
            "--latency-ms": self.latency_ms,
            "--importance": self.importance,
            "--round-to": None if self.round_to == DEFAULT_ROUND_TO else self.round_to,
            "--max-ratio": self.max_ratio,
            "--global": self.global_allocation or None,
            "--allocation": self.allocation,
            "--allocation-images": self.allocation_images,
            "--latency-aware": self.latency_aware or None,
            "--drop-blocks": self.drop_blocks or None,
        }
        if self.profile and not self.bench:
            raise PlanError("--profile splits the bench step's latency ratio: drop --no-bench")
        if self.recalibrate and self.data is None:
            raise PlanError(
                "--recalibrate re-estimates BatchNorm statistics on --data's training images: "
                "add --data data.yaml (reconstruction on --calib-images sets them itself)"
            )
        if self.recalibrate and self.method == "unstructured":
            raise PlanError(
                "--recalibrate follows channel pruning; --method unstructured leaves the "
                "BatchNorms as yolov5's torch_utils.prune does: drop it"
            )
        given = [flag for flag, value in shaping.items() if value is not None]
        if self.plan is not None and (given or self.method != "structured"):
            unused = given or ["--method"]
            raise PlanError(
                f"--plan {self.plan} replays its own target and settings: drop {', '.join(unused)}"
            )
        unused = [f for f in given if f not in ("--ratio", "--macs", "--speedup", "--latency-ms")]
        if self.method == "unstructured" and unused:
            raise PlanError(
                "--method unstructured zeroes --ratio of each conv's weights: "
                f"{', '.join(unused)} do not apply; drop them"
            )
        if self.precision == "int8" and self.epochs:  # quantization-aware training
            if self.steps is not None and self.steps > 1:
                raise PlanError(
                    "--precision int8 with --epochs fine-tunes with the quantizers in the loop "
                    "(QAT), which runs in one-shot compiles: drop --steps, or compile without "
                    "--precision and `export --precision int8` the result (PTQ)"
                )
            if self.method == "unstructured":
                raise PlanError(
                    "--method unstructured with --precision int8 --epochs: QAT would regrow "
                    "the zeroed weights; drop --epochs (PTQ) or --precision"
                )
        training = {
            "--batch": self.batch,
            "--distill": self.distill,
            "--optimizer": self.optimizer,
            "--lr0": self.lr0,
            "--augment" if self.augment else "--no-augment": self.augment,
            "--amp" if self.amp else "--no-amp": self.amp,
            "--eval-every": self.eval_every,
        }
        given = [flag for flag, value in training.items() if value is not None]
        if given and not self.epochs:
            raise PlanError(
                f"{', '.join(given)} set the fine-tune, which runs with --epochs N (and --data): "
                "add --epochs or drop them"
            )
        flags = {
            "--calib-count": self.calib_count,
            "--calib-method": self.calib_method,
            "--int8-float": self.int8_float,
            "--int8-max-map-drop": self.int8_max_map_drop,
            "--int8-sensitivity-images": self.int8_sensitivity_images,
        }
        refuse_unused_flags(self.precision, self.precision_parity_tolerance, flags)
        if self.int8_max_map_drop is not None and self.data is None:
            raise PlanError(
                "--int8-max-map-drop measures mAP: add --data data.yaml (its train split)"
            )

    def target(self) -> Target:
        given = [
            (kind, value)
            for kind, value in (
                ("ratio", self.ratio),
                ("macs", self.macs),
                ("speedup", self.speedup),
                ("latency_ms", self.latency_ms),
            )
            if value is not None
        ]
        if len(given) > 1:
            names = " and ".join("--" + k.replace("_", "-") for k, _ in given)
            raise PlanError(f"give one target, not {names}")
        if given:
            return Target(*given[0])
        return Target("macs", DEFAULT_MACS)

    @cached_property
    def images(self):
        """Unlabeled images for reconstruction and the image-reading importances: the
        ``--calib-images`` folder, else ``--data``'s train split; None without either."""
        from yoloprune.compiler.reconstruct import Reconstruction, ReconstructSettings

        settings = ReconstructSettings(seed=self.seed)
        if self.reconstruct_images is not None:
            settings = dataclasses.replace(settings, images=self.reconstruct_images)
        if self.calib_images is not None:
            source = Reconstruction(Path(self.calib_images), None, settings)
        elif self.data is not None and _has_train_split(self.data):
            source = Reconstruction(None, Path(self.data), settings)
        else:
            return None
        source.files  # noqa: B018  (a missing or empty source fails now)
        return source

    def timed_precision(self) -> str:
        """The deployed file's precision as latency profiles name it: fp32, fp16, int8 (fp16
        float part, the default) or int8-fp32 (``--int8-float fp32``)."""
        if self.precision == "int8" and self.int8_float == "fp32":
            return "int8-fp32"
        return self.precision or "fp32"

    def reconstruction(self):
        """One-shot reconstruction's settings and images (None where it does not run): on by
        default whenever images are at hand and channels are removed."""
        images = self.reconstruct_images
        if not self.reconstruct:
            if images is not None:
                raise PlanError("--reconstruct-images sizes reconstruction: drop --no-reconstruct")
            return None
        if self.method != "structured":
            if images is not None:
                raise PlanError(
                    "--method unstructured keeps every weight as it is: drop --reconstruct-images"
                )
            return None
        if self.images is None and images is not None:
            raise PlanError(
                "--reconstruct-images: reconstruction reads images; add --calib-images DIR "
                "or --data data.yaml (its train split)"
            )
        return self.images

    def grouping_limits(self) -> GroupingLimits:
        defaults = GroupingLimits()
        return GroupingLimits(
            defaults.seconds if self.group_seconds is None else self.group_seconds,
            defaults.memory_gib if self.group_memory_gib is None else self.group_memory_gib,
        )

    def constraints(self, sensitivity_target: Target | None = None) -> Constraints:
        """The plan's constraints; ``sensitivity_target``: the target of a plan allocated by
        measured sensitivity (its own default --max-ratio)."""
        defaults = Constraints()
        fixed = type(self.round_to) is int
        max_ratio = (
            defaults.max_ratio
            if sensitivity_target is None
            else sensitivity_max_ratio(sensitivity_target)
        )
        return Constraints(  # round_to "auto" is chosen at planning (CompileSettings.alignment)
            round_to=self.round_to if fixed else defaults.round_to,
            max_ratio=max_ratio if self.max_ratio is None else self.max_ratio,
            drop_blocks=self.drop_blocks,
        )


# (field, lowest, highest) of the integer options; floats add whether the low end is open.
_INT_RANGES = (
    ("imgsz", MIN_IMGSZ, MAX_IMGSZ),
    ("threads", 1, 1024),
    ("bench_runs", 1, 100_000),
    ("epochs", 0, 10_000),
    ("eval_every", 0, 10_000),
    ("batch", 1, 4096),
    ("steps", 1, 100),
    ("calib_count", 1, 100_000),
    ("int8_sensitivity_images", 1, 1_000_000),
    ("reconstruct_images", 1, 100_000),
    ("allocation_images", 1, 100_000),
    ("latency_batch", 1, 4096),
)
_FLOAT_RANGES = (
    ("parity_tolerance", 0.0, 1e6, True),
    ("precision_parity_tolerance", 0.0, 1e6, True),
    ("int8_max_map_drop", 0.0, 1.0, False),
    ("distill", 0.0, 1e6, False),
    ("lr0", 0.0, 10.0, True),
    ("group_seconds", 0.0, 86_400.0, True),
    ("group_memory_gib", 0.0, 1024.0, True),
)
_CHOICES = (
    ("importance", tuple(IMPORTANCES)),
    ("allocation", ALLOCATIONS),
    ("method", ("structured", "unstructured")),
    ("latency_runtime", ("ort", "torch", "tensorrt")),
    ("export_mode", ("raw", "end2end")),
    ("optimizer", ("sgd", "adamw")),
    ("precision", PRECISIONS),
    ("calib_method", CALIBRATION_METHODS),
    ("int8_float", INT8_FLOAT_PRECISIONS),
)


def _flag(name: str) -> str:
    short = {"parity_tolerance": "parity-tol", "precision_parity_tolerance": "precision-parity-tol"}
    return short.get(name, name.replace("_", "-"))


@dataclass(frozen=True)
class CompileSettings:
    """A compile's options resolved: what each pass takes, every default applied."""

    target: Target
    constraints: Constraints
    grouping: GroupingLimits
    planner: str  # a name in compiler.planners.PLANNERS, or "replay" (--plan)
    # --allocation sensitivity (alone, or pricing a latency plan's steps): groups measured
    group_sensitivity: bool
    importance: str  # a name in compiler.score.IMPORTANCES
    allocation_images: int | None  # --allocation-images (None: allocation_image_count's)
    latency: LatencySettings | None  # latency-aware planners only
    train: TrainSettings | None  # fine-tuning (--data with --epochs); imgsz set at load
    out: Path
    bench_runs: int
    parity_tolerance: float
    calibration: object = None  # compiler.quantize.Calibration with --precision int8
    sensitivity: object = None  # compiler.sensitivity.Sensitivity with --int8-max-map-drop
    reconstruction: object = None  # compiler.reconstruct.Reconstruction where it runs
    # --round-to auto: the runtime whose latency table chooses the alignment (None: fixed)
    alignment: LatencySettings | None = None


def _check_tensorrt_timing(plans_latency: bool, aligns: bool) -> None:
    """TensorRT times --round-to auto's alignment profile (engines of conv chains at the
    compile's precision); whole-model latency planning measures on ort or torch. The
    combination is checked first, then that TensorRT is here."""
    if plans_latency:
        raise PlanError(
            "--latency-runtime tensorrt measures --round-to auto's alignment profile only; "
            "--speedup, --latency-ms and --latency-aware plan on ort or torch: pick one of those"
        )
    if not aligns:
        raise PlanError(
            "--latency-runtime tensorrt measures --round-to auto's alignment profile, which "
            "this compile does not run (a fixed --round-to, --plan or unstructured): drop it"
        )
    refuse_absent_runtime("tensorrt")


def refuse_absent_runtime(runtime: str) -> None:
    """--latency-runtime torch needs a CUDA GPU and tensorrt needs TensorRT: one line where
    this machine lacks it (ort always runs)."""
    if runtime == "torch":
        import torch

        if not torch.cuda.is_available():
            raise PlanError(
                "--latency-runtime torch measures on a CUDA GPU and none is available here: "
                "use --latency-runtime ort (ONNX Runtime CPU) or run on a GPU machine"
            )
    if runtime == "tensorrt":
        from yoloprune.kernels.tensorrt import available

        ok, why = available()
        if not ok:
            raise PlanError(f"--latency-runtime tensorrt: {why}")


def checked_choice(name: str, value) -> None:
    """An option's value among its choices (:data:`_CHOICES`) or an integer in its range
    (:data:`_INT_RANGES`), as CompileOptions checks its own; one line otherwise."""
    for option, choices in _CHOICES:
        if option == name and value not in choices:
            raise PlanError(f"--{_flag(name)} {value}: use one of {', '.join(choices)}")
    for option, low, high in _INT_RANGES:
        if option == name and (type(value) is not int or not low <= value <= high):
            raise PlanError(f"--{_flag(name)} {value}: must be an integer in [{low}, {high}]")


def _has_train_split(data: Path) -> bool:
    from yoloprune.compiler.train.data import read_data_yaml

    return bool(read_data_yaml(data).train)


def allocation_image_count(given: int | None, imgsz: int) -> int:
    """--allocation sensitivity's images: as given, else the default's pixels at ``imgsz``."""
    if given is not None:
        return given
    share = (ALLOCATION_IMAGES_AT / imgsz) ** 2
    count = round(DEFAULT_ALLOCATION_IMAGES * share)
    return max(MIN_DEFAULT_ALLOCATION_IMAGES, min(DEFAULT_ALLOCATION_IMAGES, count))


def sensitivity_for(max_map_drop: float | None, images: int | None):
    """The sensitivity pass's settings (None without a drop); images without a drop refused."""
    from yoloprune.compiler.sensitivity import DEFAULT_IMAGES, Sensitivity

    if max_map_drop is None:
        if images is not None:
            raise PlanError("--int8-sensitivity-images sizes the pass: add --int8-max-map-drop D")
        return None
    return Sensitivity(max_map_drop, DEFAULT_IMAGES if images is None else images)


def planner_name(options: CompileOptions, target: Target) -> str:
    """The registered planner the flags select, or a one-line error for a combination that
    selects none."""
    if options.method == "unstructured":
        if options.ratio is None or options.macs is not None or target.latency:
            raise PlanError(
                "--method unstructured takes --ratio (the fraction of weights zeroed, "
                "e.g. 0.3), not --macs"
            )
        return "unstructured"
    if options.drop_blocks and not (target.latency or options.latency_aware):
        raise PlanError(
            "--drop-blocks needs a latency-aware plan: --speedup, --latency-ms, or --macs with "
            "--latency-aware (blocks are removed where that saves the most time)"
        )
    allocation = options.allocation
    if options.global_allocation:
        if allocation not in (None, "global"):
            raise PlanError(
                f"--global is --allocation global: drop it or --allocation {allocation}"
            )
        allocation = "global"
    if target.latency or options.latency_aware:
        if allocation not in (None, "sensitivity"):
            raise PlanError(
                f"--allocation {allocation}: latency plans allocate channels by the time they "
                "save (--speedup, --latency-ms, --latency-aware), priced by importance or, "
                "with --allocation sensitivity, by measured error; drop one"
            )
        if allocation == "sensitivity" and options.drop_blocks:
            raise PlanError(
                "--drop-blocks with --allocation sensitivity: a removed block's error is not "
                "measured (only kept fractions 3/4, 1/2, 1/4 are); drop one"
            )
        if target.latency:
            return "latency"
        if target.kind != "macs":
            raise PlanError("--latency-aware plans a --macs target")
        return "latency-aware"
    if allocation is None:
        return DEFAULT_IMAGE_ALLOCATION if options.images is not None else "uniform"
    return allocation


def refuse_timing_flags_without_bench(options: CompileOptions) -> None:
    """``compile --no-bench``: --bench-runs sizes the bench step alone, and --spinning applies
    only where something is timed (the bench step, a latency planner, --round-to auto). A sweep
    sets no bench step on its points and times them itself, so this is compile's check."""
    if options.bench:
        return
    if options.bench_runs is not None:
        raise PlanError(
            f"--bench-runs {options.bench_runs} sets the bench step's timed runs, which "
            "--no-bench skips: drop one"
        )
    settings = options.settings
    if options.spinning and settings.latency is None and settings.alignment is None:
        raise PlanError(
            "--spinning times ONNX Runtime with intra-op spinning on; nothing is timed here "
            "(--no-bench, a given --round-to, no latency planner): drop one"
        )


def sensitivity_max_ratio(target: Target) -> float:
    """--allocation sensitivity's default --max-ratio: no group keeps less than the uniform
    plan's kept fraction to the power 8/3, and none loses more than 0.6 where that allows
    more (MACs 0.5 and above), and at most SENSITIVITY_MAX_RATIO_CAP. At make compile's MACs
    0.35 that is 0.75, where 0.6 bound the allocation and 0.75 measured better; at MACs 0.5,
    0.7 measured below 0.6 on two of three models (README, *Sensitivity allocation*)."""
    if target.kind == "macs":
        uniform_kept = math.sqrt(target.value)
    elif target.kind == "ratio":
        uniform_kept = 1 - target.value
    else:  # latency targets have no uniform plan to size the floor by: 0.6
        return SENSITIVITY_MAX_RATIO
    rule = round(1 - uniform_kept ** (8 / 3), 2)
    return min(SENSITIVITY_MAX_RATIO_CAP, max(SENSITIVITY_MAX_RATIO, rule))


def measures_group_sensitivity(options: CompileOptions, planner: str) -> bool:
    """Whether the planner prices removals by each group's measured head error
    (--allocation sensitivity, alone or with a latency plan)."""
    return planner == "sensitivity" or (
        planner in ("latency", "latency-aware") and options.allocation == "sensitivity"
    )


# A compile's fine-tune (--epochs N): AdamW (lr0 0.003, TrainSettings' default), distilled from
# the original (always at hand), one update per batch of 8, no augmentation, after a short
# warm-up (TrainSettings' defaults). Measured on the embedded model, 2 epochs, three one-shot
# starts: batch 8 without augmentation 0.698 / 0.757 / 0.777 against batch 16 with it 0.670 /
# 0.754 / 0.757, 12 % less time per epoch; the trainer before these defaults 0.56 at --speedup 2
# (README, benchmarks/results/short_finetune.md).
FINETUNE_DEFAULTS = {"optimizer": "adamw", "distill": 1.0, "batch": 8, "augment": False}


def _train_settings(options: CompileOptions) -> TrainSettings | None:
    if not options.epochs:
        return None
    changes = dict(FINETUNE_DEFAULTS, seed=options.seed)
    changes.update(
        (k, getattr(options, k))
        for k in ("epochs", "batch", "distill", "optimizer", "lr0", "augment", "amp", "eval_every")
        if getattr(options, k) is not None
    )
    return dataclasses.replace(TrainSettings(), **changes)
