"""Fine-tune pass: recover accuracy after pruning, optionally distilling from the original model.

The model object is trained as it is (never rebuilt from YAML, so pruned shapes stay). SGD or
AdamW with yolov5's parameter groups (decay on conv weights only), warm-up, cosine or linear
decay per step, EMA, mixed precision (fp16 on CUDA, bf16 on CPUs with bf16 instructions),
optional gradient accumulation to a nominal batch, a resumable
``last.pt`` and the best EMA by mAP@.5:.95 in ``best.pt``. Under ``torchrun`` it runs
DistributedDataParallel (NCCL on GPUs, Gloo on CPUs); rank 0 evaluates and saves.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from yoloprune.compiler.evaluation.evaluate import (
    EvalSettings,
    Metrics,
    evaluate,
    torch_predictor,
)
from yoloprune.compiler.train.cache import SampleMemo, TeacherTargets, map_tensors
from yoloprune.compiler.train.data import DataConfig, YoloDataset, collate
from yoloprune.compiler.train.objective import objective_for
from yoloprune.graphs.checkpoint import ModelInfo, load_model, save_pruned
from yoloprune.graphs.errors import YoloPruneError
from yoloprune.kernels.torch_runtime import memory_layout


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 10
    batch: int = 16
    imgsz: int | None = None
    optimizer: str = "sgd"
    lr0: float | None = None  # sgd 0.01, adamw 0.003
    lrf: float = 0.01
    schedule: str = "cosine"
    schedule_every: str = "step"  # "epoch": yolov5's steps (what the committed benchmarks used)
    momentum: float = 0.937
    weight_decay: float = 5e-4
    # None: min(1, epochs / 8). Fine-tuning starts from a working model: a short warm-up.
    warmup_epochs: float | None = None
    # None: biases warm up from 0 like every weight; yolov5's from-scratch recipe starts them at
    # 0.1, which wrecks a pruned model's first steps (with AdamW every bias moves ~0.1 a step).
    warmup_bias_lr: float | None = None
    # None: one optimizer step per batch. A short fine-tune lives on its number of updates:
    # accumulating to yolov5's 64 with batch 16 gave a quarter of them (measured: README).
    nominal_batch: int | None = None
    ema: bool = True
    ema_tau: float | None = None  # None: min(2000, updates / 5)
    # Mixed precision in the student's forward: fp16 on CUDA, bf16 on the CPU. None: on CUDA,
    # and on CPUs with bf16 instructions (CPU_BF16_FLAGS), where the pruned embedded model's
    # forward and backward take 0.86x their fp32 time (2-core AVX-512 BF16 EPYC; README).
    amp: bool | None = None
    distill: float = 0.0  # weight of output-level distillation from the teacher
    workers: int = 0
    seed: int = 0
    device: str | None = None
    eval_every: int = 1  # validate every N epochs and after the last; 0: only after the last
    augment: bool = True
    # Convolutions in channels-last memory where the model allows (kernels.torch_runtime.
    # memory_layout): on the 2-core CPU a yolov5n training step 65 -> 45 ms, the teacher 44 -> 27.
    channels_last: bool = True
    # Memory for what stays the same between epochs: validation images, and without
    # augmentation the training images and the teacher's targets (compiler/train/cache.py).
    cache_mib: int = 2048

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch < 1:
            raise YoloPruneError("--epochs and --batch must be positive")
        if self.optimizer not in ("sgd", "adamw"):
            raise YoloPruneError(f"--optimizer {self.optimizer}: use sgd or adamw")
        if self.schedule not in ("cosine", "linear"):
            raise YoloPruneError(f"--schedule {self.schedule}: use cosine or linear")
        if self.schedule_every not in ("step", "epoch"):
            raise YoloPruneError(f"schedule_every {self.schedule_every!r}: use step or epoch")
        if self.eval_every < 0:
            raise YoloPruneError(f"--eval-every {self.eval_every}: use 0 (the last epoch) or more")
        if self.distill < 0:
            raise YoloPruneError("--distill must be >= 0")
        if self.cache_mib < 0:
            raise YoloPruneError("cache_mib must be >= 0 (0 keeps nothing between epochs)")

    @property
    def warmup(self) -> float:
        """Warm-up length in epochs."""
        return min(1.0, self.epochs / 8) if self.warmup_epochs is None else self.warmup_epochs

    @property
    def default_lr0(self) -> float:
        return 0.01 if self.optimizer == "sgd" else 0.003


@dataclass
class TrainResult:
    model: nn.Module  # the best EMA (or last, without validation data)
    history: list[dict] = field(default_factory=list)
    best: dict | None = None
    best_metrics: Metrics | None = None  # the best model's evaluation (model's own export mode)
    evaluated_on: str | None = None  # the device type those evaluations ran on
    seconds: float = 0.0
    mixed_precision: str | None = None  # what the forward ran in: "bf16", "fp16"; None: fp32
    recipe: dict | None = None  # _recipe_record(): batch, optimizer, lr0, distillation, ...
    cache: dict | None = None  # SampleMemo.summary(): what was kept between epochs


class ModelEMA:
    """Exponential moving average of weights, the decay ramping up as yolov5's does."""

    def __init__(self, model: nn.Module, tau: float, decay: float = 0.9999, updates: int = 0):
        self.ema = copy.deepcopy(_unwrap(model)).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.tau, self.decay, self.updates = tau, decay, updates
        self._slots: tuple[nn.Module, list, list] | None = None  # (source, averaged, current)

    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        source = _unwrap(model)
        if self._slots is None or self._slots[0] is not source:
            self._slots = (source, _averaged_slots(self.ema), _averaged_slots(source))
        # the tensors are looked up in their modules' dicts on every step (a module moved or
        # converted holds new ones); state_dict() twice a step cost 1.1 ms of 3.3 on yolov5n
        averages = [slots[name] for slots, name in self._slots[1]]
        current = [slots[name] for slots, name in self._slots[2]]
        with torch.no_grad():  # one fused update (a loop cost 2.4 ms a step on yolov5n)
            torch._foreach_lerp_(averages, current, 1 - d)


def _averaged_slots(module: nn.Module) -> list[tuple[dict, str]]:
    """Where each tensor the EMA averages lives, in ``state_dict`` order: the dict holding it
    (its module's ``_parameters`` or ``_buffers``) and its name there. Averaged: the floating
    state, but QAT's ranges (``*_amax``), which stay the model's own."""
    slots = []
    for key, value in module.state_dict(keep_vars=True).items():
        if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
            continue
        if key.endswith("_amax"):
            continue
        path, _, name = key.rpartition(".")
        owner = module.get_submodule(path)
        slots.append((owner._parameters if name in owner._parameters else owner._buffers, name))
    return slots


# The CPU flags of bf16 arithmetic in hardware; without them bf16 is emulated and slower.
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def autocast_dtype(amp: bool | None, device: torch.device) -> torch.dtype | None:
    """What the student's forward autocasts to on ``device``: fp16 on CUDA, bf16 elsewhere;
    None: fp32. ``amp`` None: on CUDA, and on a CPU with bf16 instructions."""
    if amp is None:
        amp = device.type == "cuda" or (device.type == "cpu" and cpu_computes_bf16())
    if not amp:
        return None
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512_BF16 or AMX)."""
    from yoloprune.kernels.ort import cpu_description

    return bool(CPU_BF16_FLAGS & set(cpu_description()[1]))


def in_float32(tree):
    """``tree`` (a model's raw output: tensors in lists, tuples and dicts) with every floating
    tensor in fp32."""
    return map_tensors(lambda t: t.float() if t.is_floating_point() else t, tree)


def _teacher_out(teacher_targets, images, metas, low: torch.dtype | None):
    """The teacher's targets for a batch, in fp32: on a GPU computed in the student's fp16
    autocast (it runs every step there), on the CPU in fp32 (its targets are kept for every
    epoch, so bf16 would save one epoch's teacher time and round every epoch's targets)."""
    with torch.autocast("cuda", dtype=torch.float16, enabled=low is torch.float16):
        return in_float32(teacher_targets(images, [m["index"] for m in metas]))


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _param_groups(model: nn.Module, settings: TrainSettings, lr: float, decay: float):
    """yolov5's three groups. Fused updates (one kernel for all parameters): on yolov5n the
    AdamW step with gradient clipping took 4.3 ms as a loop, 1.6 ms fused."""
    bn_weights, weights, biases = [], [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "bias":
                biases.append(p)
            elif isinstance(module, nn.BatchNorm2d):
                bn_weights.append(p)
            else:
                weights.append(p)
    first = [{"params": bn_weights}]  # empty where BatchNorm was folded (QAT)
    if settings.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            first, lr=lr, momentum=settings.momentum, nesterov=True, fused=True
        )
    else:
        optimizer = torch.optim.AdamW(
            first, lr=lr, betas=(settings.momentum, 0.999), weight_decay=0.0, fused=True
        )
    optimizer.add_param_group({"params": weights, "weight_decay": decay})
    optimizer.add_param_group({"params": biases, "weight_decay": 0.0})
    return optimizer


def accumulation(settings: TrainSettings, world: int = 1) -> tuple[int, float]:
    """Batches per optimizer step, and the weight decay scaled to the batch each step sees
    (yolov5's rule). Without a nominal batch: one step per batch of every process, decay as set."""
    nominal = settings.nominal_batch or settings.batch * world
    accumulate = max(round(nominal / (settings.batch * world)), 1)
    return accumulate, settings.weight_decay * settings.batch * world * accumulate / nominal


def _lr_factor(settings: TrainSettings):
    """The learning rate's factor at a (fractional) epoch: evaluated every step."""
    if settings.schedule == "cosine":
        return lambda x: (
            ((1 - math.cos(x * math.pi / settings.epochs)) / 2) * (settings.lrf - 1) + 1
        )
    return lambda x: (1 - x / settings.epochs) * (1.0 - settings.lrf) + settings.lrf


def _distributed() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def training_device(settings: TrainSettings, local_rank: int = 0) -> torch.device:
    """The device ``train`` runs on: ``settings.device``, else this process's GPU, else the CPU."""
    if settings.device:
        return torch.device(settings.device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise YoloPruneError(
            f"process {local_rank} of this machine has no GPU of its own "
            f"({torch.cuda.device_count()} visible): start at most that many processes per "
            "machine (torchrun --nproc_per_node), or train on the CPU (CUDA_VISIBLE_DEVICES=)"
        )
    return torch.device(f"cuda:{local_rank}")


def _default_layout_after(fit):
    """``fit(model, ...)`` that leaves the model in the default memory layout, also when it
    fails (training runs channels-last where the model allows)."""

    @functools.wraps(fit)
    def fitted(model: nn.Module, *args, **kwargs):
        try:
            return fit(model, *args, **kwargs)
        finally:
            model.to(memory_format=torch.contiguous_format)

    return fitted


@_default_layout_after
def train(
    model: nn.Module,
    info: ModelInfo,
    data: DataConfig,
    settings: TrainSettings,
    *,
    teacher: nn.Module | None = None,
    save_dir: Path | None = None,
    resume: Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune ``model`` in place on ``data.train``; validate on ``data.val`` each epoch."""
    from tqdm import tqdm

    world, rank, local_rank = _distributed()
    device = training_device(settings, local_rank)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    imgsz = settings.imgsz or info.imgsz
    torch.manual_seed(settings.seed + rank)
    if not data.train:
        raise YoloPruneError("the data YAML has no 'train' split to fine-tune on")
    reuse = settings.cache_mib and settings.epochs > 1  # one epoch has nothing to reuse
    memo = SampleMemo(settings.cache_mib << 20) if reuse else None
    train_set = YoloDataset(
        data.train,
        data.nc,
        imgsz,
        augment=settings.augment,
        seed=settings.seed,
        # workers are separate processes: what they kept would die with each epoch's workers
        memo=memo if settings.workers == 0 else None,
        memo_kind="train",
    )
    val_set = YoloDataset(data.val, data.nc, imgsz, memo=memo) if rank == 0 and data.val else None
    sampler = (
        torch.utils.data.distributed.DistributedSampler(train_set, seed=settings.seed)
        if world > 1
        else None
    )
    batches = torch.utils.data.DataLoader(
        train_set,
        batch_size=settings.batch,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=settings.workers,
        collate_fn=collate,
        drop_last=len(train_set) > settings.batch,
        generator=torch.Generator().manual_seed(settings.seed),
    )
    layout = memory_layout(model) if settings.channels_last else torch.contiguous_format
    model = model.to(device).float().to(memory_format=layout).train()
    objective = objective_for(model, imgsz, settings.epochs)
    # a copy: the teacher is the caller's original model, which must stay where it was (moved
    # to the GPU in place, it broke every later stage that runs it on the CPU)
    teacher_targets = None
    if teacher is not None and settings.distill:
        frozen = copy.deepcopy(teacher).to(device).float().to(memory_format=layout).eval()
        teacher_targets = TeacherTargets(
            frozen,
            objective.distill_targets,
            # on a GPU the teacher's forward costs little next to holding its outputs there
            memo if not settings.augment and device.type == "cpu" else None,
        )
    accumulate, decay = accumulation(settings, world)
    lr0 = settings.lr0 or settings.default_lr0
    optimizer = _param_groups(model, settings, lr0, decay)
    total_updates = settings.epochs * len(batches) // accumulate
    ema = (
        ModelEMA(model, settings.ema_tau or max(1.0, min(2000.0, total_updates / 5)))
        if settings.ema and rank == 0
        else None
    )
    low = autocast_dtype(settings.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=low is torch.float16)
    names = (*objective.part_names, "kd")
    start_epoch, result, begin = 0, TrainResult(model), time.perf_counter()
    if resume is not None:
        start_epoch, result = _resume(resume, model, optimizer, ema, result, device)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None
        )
    for epoch in range(start_epoch, settings.epochs):
        epoch_start = time.perf_counter()
        model.train()
        train_set.epoch = epoch
        if sampler is not None:
            sampler.set_epoch(epoch)
        optimizer.zero_grad()
        bar = tqdm(
            batches,
            desc=f"epoch {epoch + 1}/{settings.epochs}",
            leave=False,
            disable=(not progress or rank != 0) or None,
        )
        running = torch.zeros(len(names))
        for i, (images, targets, metas) in enumerate(bar):
            step = i + len(batches) * epoch
            rates = learning_rates(settings, lr0, step, len(batches))
            warming = warmup_progress(settings, step, len(batches))
            for group, rate in zip(optimizer.param_groups, rates, strict=True):
                group["lr"] = rate
                if "momentum" in group and warming is not None:
                    group["momentum"] = 0.8 + (settings.momentum - 0.8) * warming
            images = images.to(device, non_blocking=True).contiguous(memory_format=layout)
            with torch.autocast(device.type, dtype=low or torch.float32, enabled=low is not None):
                raw = model(images)
            raw = in_float32(raw)  # the losses in fp32 (box IoUs lose digits in bf16)
            loss, parts = objective(raw, targets.to(device))
            kd = torch.zeros((), device=device)  # per image, as the objective's parts are
            if teacher_targets is not None:
                teacher_out = _teacher_out(teacher_targets, images, metas, low)
                kd = objective.distill(raw, teacher_out) * settings.distill
                loss = loss + kd * images.shape[0]  # the losses' sum over the batch
            if world > 1:
                loss = loss * world
            scaler.scale(loss).backward()
            if (step + 1) % accumulate == 0 or i == len(batches) - 1:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad()
                if ema is not None:
                    ema.update(model)
            running = (running * i + torch.cat((parts.cpu(), kd.detach().cpu().view(1)))) / (i + 1)
            if rank == 0 and bar is not None and hasattr(bar, "set_postfix"):
                bar.set_postfix(
                    {n: f"{v:.3f}" for n, v in zip(names, running.tolist(), strict=True)}
                )
        objective.end_epoch()
        if rank != 0:
            continue
        record = {"epoch": epoch + 1, **dict(zip(names, map(float, running), strict=True))}
        record["lr"] = optimizer.param_groups[0]["lr"]
        record["train_seconds"] = round(time.perf_counter() - epoch_start, 1)
        current = ema.ema if ema is not None else _unwrap(model)
        last_epoch = epoch + 1 == settings.epochs
        every = settings.eval_every
        if val_set is not None and (last_epoch or (every and (epoch + 1) % every == 0)):
            metrics = evaluate(
                torch_predictor(_eval_copy(current, device)),
                val_set,
                data.names,
                EvalSettings(),  # the compile's own settings: its evaluations compare
                progress=progress,
            )
            record.update(map50_95=metrics.map50_95, map50=metrics.map50)
            if result.best is None or metrics.map50_95 > result.best["map50_95"]:
                result.best, result.best_metrics = dict(record), metrics
                result.evaluated_on = device.type
                result.model = _trainable_copy(current)
                if save_dir is not None:
                    save_pruned(
                        result.model, info, Path(save_dir) / "best.pt", extra={"metrics": record}
                    )
        result.history.append(record)
        if progress:
            losses = " ".join(f"{n} {record[n]:.4f}" for n in names)
            tqdm.write(
                f"epoch {epoch + 1}/{settings.epochs}: {losses}"
                + (f" mAP@.5:.95 {record['map50_95']:.4f}" if "map50_95" in record else "")
            )
        if save_dir is not None:
            _save_last(
                Path(save_dir) / "last.pt", model, info, optimizer, ema, epoch + 1, result, settings
            )
    if result.best is None:
        result.model = _trainable_copy(ema.ema if ema is not None else _unwrap(model))
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    result.seconds = round(time.perf_counter() - begin, 1)
    result.mixed_precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(low)
    distill = settings.distill if teacher_targets is not None else 0.0
    result.recipe = _recipe_record(settings, lr0, distill, world)
    result.cache = memo.summary() if memo is not None else None
    return result


def _recipe_record(settings: TrainSettings, lr0: float, distill: float, processes: int) -> dict:
    """What a fine-tune ran with, as plain data for the report: ``lr0`` resolved, ``distill``
    the weight applied (0 without a teacher)."""
    return {
        "batch": settings.batch,  # per process
        "processes": processes,
        "optimizer": settings.optimizer,
        "lr0": lr0,
        "distill": distill,
        "augment": settings.augment,
    }


def _trainable_copy(model: nn.Module) -> nn.Module:
    """A CPU copy in eval mode with gradients enabled again (the EMA's are off), so the result
    can be traced, pruned further or trained like any model."""
    result = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format).eval()
    for p in result.parameters():
        p.requires_grad_(True)
    return result


def _eval_copy(model: nn.Module, device: torch.device) -> nn.Module:
    return copy.deepcopy(model).float().eval().to("cpu" if device.type != "cuda" else device)


def warmup_progress(settings: TrainSettings, step: int, steps_per_epoch: int) -> float | None:
    """How far into the warm-up ``step`` is (0 to 1, its last step included); None without one
    or after it."""
    warmup_iters = round(settings.warmup * steps_per_epoch)
    if not warmup_iters or step > warmup_iters:
        return None
    return step / warmup_iters


def learning_rates(settings: TrainSettings, lr0: float, step: int, steps_per_epoch: int):
    """The learning rate of each parameter group (BatchNorm weights, weights, biases) at
    ``step``: the schedule, evaluated every step (or once per epoch), after a linear warm-up
    from 0 (biases from ``warmup_bias_lr`` where set)."""
    epoch = step / steps_per_epoch if settings.schedule_every == "step" else step // steps_per_epoch
    scheduled = lr0 * _lr_factor(settings)(epoch)
    x = warmup_progress(settings, step, steps_per_epoch)
    if x is None:
        return [scheduled] * 3
    bias_start = settings.warmup_bias_lr or 0.0
    return [scheduled * x, scheduled * x, bias_start + (scheduled - bias_start) * x]


def _save_last(path: Path, model, info, optimizer, ema, epoch, result, settings) -> None:
    state = {
        "epoch": epoch,
        "optimizer": optimizer.state_dict(),
        "history": result.history,
        "best": result.best,
        "settings": asdict(settings),
    }
    if ema is not None:
        state.update(ema=ema.ema.state_dict(), ema_updates=ema.updates)
    save_pruned(_unwrap(model), info, path, train_state=state)


def _resume(path: Path, model, optimizer, ema, result, device):
    ckpt = torch.load(path, map_location=device, weights_only=True)
    state = ckpt.get("train_state")
    if state is None:
        raise YoloPruneError(f"{path}: no training state to resume from; pass a last.pt")
    resumed, _ = load_model(path)
    model.load_state_dict(resumed.state_dict())
    optimizer.load_state_dict(state["optimizer"])
    _match_layouts(optimizer)
    if ema is not None and "ema" in state:
        ema.ema.load_state_dict(state["ema"])
        ema.updates = state["ema_updates"]
    result.history = list(state["history"])
    result.best = state["best"]
    best_path = path.with_name("best.pt")
    if result.best is not None and best_path.exists():  # kept unless a later epoch beats it
        result.model = load_model(best_path)[0].to(device)
    return int(state["epoch"]), result


def _match_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Optimizer state in its parameter's memory layout: a ``last.pt`` written in another
    layout would otherwise be read as flat memory by the fused step, mixing up elements."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.shape == p.shape:
                    optimizer.state[p][key] = torch.empty_like(p).copy_(value)


def with_overrides(settings: TrainSettings, **changes) -> TrainSettings:
    return replace(settings, **{k: v for k, v in changes.items() if v is not None})
