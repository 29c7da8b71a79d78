"""Coupled channels: torch-pruning's DependencyGraph, made correct for splits, as ChannelGroups.

A ChannelGroup is a set of channels that must be removed together: a conv's outputs, its BN,
every consumer's input slice, both sides of each residual add, each slice of each concat. It is
named by its root conv (the first conv whose outputs the group holds).
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch_pruning as tp
from torch import nn

from yoloprune.graphs.errors import ModelError
from yoloprune.graphs.family import family_of


class _PerOutputRanges(Sequence):
    """Offsets that torch-pruning slices as ``offsets[i:i+2]`` for the i-th consumer of a split.

    torch-pruning assumes the i-th traced consumer reads the i-th piece; the trace order is the
    reverse of execution and one piece may feed several consumers, so we answer each slice with
    the consumer's real piece bounds instead.
    """

    def __init__(self, ranges: list[tuple[int, int]]):
        self._ranges = ranges

    def __len__(self) -> int:
        return len(self._ranges) + 1

    def __getitem__(self, key):
        if isinstance(key, slice) and key.stop == (key.start or 0) + 2 and key.step is None:
            return list(self._ranges[key.start or 0])
        raise TypeError("per-output split ranges only support offsets[i:i+2]")

    def __repr__(self) -> str:
        return f"ranges{self._ranges}"


class CoupledGraph(tp.DependencyGraph):
    """DependencyGraph whose split/chunk index mapping is derived from autograd, not trace order.

    torch-pruning 1.6.1 on torch >= 2.x reads ``_saved_split_sizes`` (``torch.split`` with sizes)
    but ``torch.chunk`` records ``_saved_split_size``; it then falls back to inferring piece
    sizes from the consumers *in trace order*, which maps channels to the wrong consumer as soon
    as the pieces are consumed out of order or a piece has two consumers.
    """

    def build_dependency(self, model, example_inputs, **kwargs):
        super().build_dependency(model, example_inputs, **kwargs)
        self._fix_split_offsets()
        tp.dependency.index_mapping.update_index_mapping(self)
        return self

    def _fix_split_offsets(self) -> None:
        for node in self.module2node.values():
            if node.type != tp.ops.OPTYPE.SPLIT:
                continue
            grad_fn = node.grad_fn
            dim = getattr(grad_fn, "_saved_dim", None)
            sizes = list(getattr(grad_fn, "_saved_self_sym_sizes", ()) or ())
            if dim is None or not sizes or dim % len(sizes) != 1:
                continue  # not a channel split: torch-pruning leaves it unmapped
            total = int(sizes[1])
            if hasattr(grad_fn, "_saved_split_sizes"):
                pieces = [int(s) for s in grad_fn._saved_split_sizes]
            else:
                step = int(grad_fn._saved_split_size)
                pieces = [min(step, total - start) for start in range(0, total, step)]
            starts = [sum(pieces[:i]) for i in range(len(pieces))]
            ranges = []
            for consumer in node.outputs:
                piece = _piece_index(consumer.grad_fn, grad_fn)
                ranges.append((starts[piece], starts[piece] + pieces[piece]))
            node.module.offsets = _PerOutputRanges(ranges)
            node.module.split_sizes = [hi - lo for lo, hi in ranges]


def _piece_index(consumer_grad_fn, split_grad_fn) -> int:
    hits = [nr for fn, nr in consumer_grad_fn.next_functions if fn is split_grad_fn]
    if len(hits) != 1:
        raise ModelError(
            "a layer reads several pieces of one channel split; rewrite the split into "
            "separate convs before pruning (canonicalize)"
        )
    return hits[0]


@dataclass(frozen=True)
class GroupingLimits:
    """How long, and how much extra resident memory, tracing and group building may take.

    torch-pruning's index mapping can grow without bound on layers it cannot map (an
    unprotected attention block took > 20 GB); the guard stops it with a clear error instead.
    Real YOLO models need well under a second and a few hundred MB.
    """

    seconds: float = 120.0
    memory_gib: float = 4.0


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak is a conservative stand-in
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _GuardTripped(BaseException):
    """Raised inside the guarded thread when a limit is passed (BaseException, so that an
    ``except Exception`` in traced code cannot swallow it)."""


def _raise_in_thread(thread_id: int, exception: type[BaseException] | None) -> None:
    """Make ``thread_id`` raise ``exception`` at its next bytecode (None: cancel a pending one).

    Unlike ``_thread.interrupt_main`` this needs no SIGINT handler: a process started in the
    background or under nohup ignores SIGINT, and the guard must still stop the body there.
    """
    payload = ctypes.py_object(exception) if exception is not None else None
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), payload)


@contextmanager
def grouping_guard(limits: GroupingLimits, what: str) -> Iterator[None]:
    """Run the body under ``limits``; past either, interrupt it and raise ModelError."""
    start_bytes, start_time = _resident_bytes(), time.monotonic()
    guarded = threading.get_ident()
    tripped: list[str] = []
    finished = threading.Event()  # set under ``lock`` once the body is over: never raise after
    lock = threading.Lock()

    def watch() -> None:
        while not finished.wait(0.05):
            grown = (_resident_bytes() - start_bytes) / 2**30
            elapsed = time.monotonic() - start_time
            if grown > limits.memory_gib:
                tripped.append(f"memory grew by {grown:.1f} GiB (limit {limits.memory_gib:g})")
            elif elapsed > limits.seconds:
                tripped.append(f"it ran {elapsed:.0f} s (limit {limits.seconds:g})")
            if tripped:
                with lock:
                    if not finished.is_set():
                        _raise_in_thread(guarded, _GuardTripped)
                return

    watcher = threading.Thread(target=watch, name="grouping-guard", daemon=True)
    watcher.start()
    try:
        try:
            yield
        finally:
            with lock:
                finished.set()
                _raise_in_thread(guarded, None)  # one sent as the body finished: drop it
    except _GuardTripped:
        raise ModelError(
            f"{what}: channel-group building stopped, {tripped[0]}; the usual cause is a layer "
            "torch-pruning cannot map (e.g. attention reshaping channels into heads): protect "
            "its convs, or raise the limit (--group-seconds, --group-memory-gib)"
        ) from None
    finally:
        watcher.join()


@dataclass(frozen=True)
class Member:
    """One pruning operation of a group: a layer and which of its channels it touches."""

    layer: str
    kind: str  # "out" (conv/bn outputs) or "in" (a consumer's inputs)
    start: int
    stop: int
    of: int  # the layer's channel count on that side
    copies: int = 1  # how many times the group's channels appear (SPP/SPPF concat the same map)

    def __str__(self) -> str:
        span = (
            ""
            if (self.start, self.stop) == (0, self.of)
            else f"[{self.start}:{self.stop}/{self.of}]"
        )
        return f"{self.layer}.{self.kind}{span}" + (f" x{self.copies}" if self.copies > 1 else "")


@dataclass(frozen=True)
class ChannelGroup:
    id: str  # the root conv's module name
    size: int
    members: tuple[Member, ...]
    protected: bool = False
    reason: str = ""
    # groups sharing a tie keep equal counts (the two halves of a split block, so the family's
    # own class can express the pruned block); "" when free
    tie: str = ""


@dataclass(frozen=True)
class ConvChannels:
    """For MAC accounting: which group owns a conv's outputs and each slice of its inputs."""

    name: str
    out_group: str | None
    out_channels: int
    in_slices: tuple[tuple[str | None, int, int], ...]  # (group or None, channels, copies)
    groups: int
    kernel_area: int


def head_convs(model: nn.Module) -> list[nn.Conv2d]:
    """The detection head's output convs: their outputs are the model interface."""
    return family_of(model).head_convs(model)


def protected_convs(model: nn.Module) -> dict[nn.Conv2d, str]:
    """Convs whose output channels are never pruned, with the reason: the head's output convs
    (the model interface) and whatever else the family protects (attention blocks)."""
    return family_of(model).protected_convs(model)


def model_stride(model: nn.Module) -> int:
    return int(max(model.stride))


def build_graph(
    model: nn.Module, imgsz: int | None = None, limits: GroupingLimits | None = None
) -> CoupledGraph:
    """Trace the model (eval mode, raw head outputs) into a CoupledGraph."""
    stride = model_stride(model)
    size = imgsz or 2 * stride
    example = torch.zeros(1, 3, size, size)
    was_training = model.training
    with grouping_guard(limits or GroupingLimits(), "tracing"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = CoupledGraph().build_dependency(
            model, example, output_transform=family_of(model).trace_outputs, verbose=False
        )
    model.train(was_training)
    return graph


def _members(graph: CoupledGraph, group) -> tuple[Member, ...]:
    size = len(group[0].idxs)
    members = []
    for dep, idxs in group:
        module = dep.target.module
        if not isinstance(module, nn.Module) or isinstance(module, tp.ops.DummyMHA):
            continue
        name = graph._module2name.get(module)
        if name is None:  # concat/add/upsample nodes: visible through their consumers' slices
            continue
        is_out = graph.is_out_channel_pruning_fn(dep.handler)
        total = (graph.get_out_channels(module) if is_out else graph.get_in_channels(module)) or 0
        kind = "out" if is_out or isinstance(module, nn.BatchNorm2d) else "in"
        copies = max(1, len(idxs) // size)
        members.append(Member(name, kind, min(idxs), max(idxs) + 1, int(total), copies))
    unique = {(m.layer, m.kind, m.start): m for m in members}
    return tuple(unique.values())


def channel_groups(
    model: nn.Module,
    graph: CoupledGraph | None = None,
    limits: GroupingLimits | None = None,
    custom_modules: bool = False,
) -> list[ChannelGroup]:
    """All channel groups of a model, protected convs (head outputs, attention) included.

    Unless ``custom_modules``, the two halves of every split block are tied (see
    :func:`tie_split_halves`), so the pruned model loads with its family's own classes."""
    limits = limits or GroupingLimits()
    graph = graph or build_graph(model, limits=limits)
    protected = protected_convs(model)
    with grouping_guard(limits, "grouping"):
        found = list(
            graph.get_all_groups(root_module_types=[nn.Conv2d], ignored_layers=list(protected))
        )
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    groups = []
    for group in found:
        root = group[0].dep.target.module
        members = sorted(_members(graph, group), key=lambda m: (order[m.layer], m.kind, m.start))
        # Name the group by its first producer conv in execution order (readable, stable).
        producers = [
            m.layer
            for m in members
            if m.kind == "out" and isinstance(model.get_submodule(m.layer), nn.Conv2d)
        ]
        groups.append(ChannelGroup(producers[0], root.out_channels, tuple(members)))
    for conv, reason in protected.items():
        name = graph._module2name[conv]
        members = (Member(name, "out", 0, conv.out_channels, conv.out_channels),)
        groups.append(ChannelGroup(name, conv.out_channels, members, True, reason))
    _check_disjoint(groups)
    groups = sorted(groups, key=lambda g: order[g.id])
    return (
        groups if custom_modules else tie_split_halves(family_of(model).split_halves(model), groups)
    )


def tie_split_halves(
    halves: list[tuple[str, str, tuple[str, str]]], groups: list[ChannelGroup]
) -> list[ChannelGroup]:
    """Tie the groups of each split block's two halves (ultralytics' C2f/C3k2 ``cv1`` chunks and
    C2PSA's halves, held as ``cv1a``/``cv1b``): ultralytics' classes split ``cv1`` into equal
    halves, so a pruned block is expressible by them only if both halves keep equal counts.
    Tied groups share a ``tie`` label; a half whose partner cannot be pruned (C2PSA's attention
    half) is kept whole (protected, with the reason). ``halves``: the family's
    :meth:`~graphs.family.ModelFamily.split_halves`."""
    if not halves:
        return groups
    owner = {m.layer: g.id for g in groups for m in g.members if m.kind == "out"}
    by_id = {g.id: g for g in groups}
    for block, kind, pair in halves:
        owners = [by_id.get(owner.get(conv, "")) for conv in pair]
        free = [g for g in owners if g is not None and not g.protected]
        if len(free) < 2 or free[0].size != free[1].size:
            reason = (
                f"kept whole: ultralytics' {kind} ({block}) needs equal halves and its other half "
                "is not pruned (--allow-custom-modules prunes it)"
            )
            for g in free:
                by_id[g.id] = replace(by_id[g.id], protected=True, reason=reason)
            continue
        labels = {by_id[g.id].tie for g in free} - {""}
        label = min(labels | {block})
        for g in list(by_id.values()):  # merge ties that share a group
            if g.tie in labels:
                by_id[g.id] = replace(g, tie=label)
        for g in free:
            by_id[g.id] = replace(by_id[g.id], tie=label)
    # a tie with a member kept whole keeps every member whole (equal counts)
    whole = {g.tie: g.reason for g in by_id.values() if g.tie and g.protected}
    for g in list(by_id.values()):
        if g.tie in whole:
            by_id[g.id] = replace(g, protected=True, reason=whole[g.tie], tie="")
    return [by_id[g.id] for g in groups]


def _check_disjoint(groups: list[ChannelGroup]) -> None:
    owner: dict[tuple[str, str, int], str] = {}
    for g in groups:
        for m in g.members:
            key = (m.layer, m.kind, m.start)
            if key in owner and owner[key] != g.id:
                raise ModelError(f"{m} is coupled to two groups ({owner[key]}, {g.id})")
            owner[key] = g.id


def conv_channels(model: nn.Module, groups: list[ChannelGroup]) -> list[ConvChannels]:
    """Each Conv2d's channel ownership, to count MACs of any plan without pruning."""
    out_owner: dict[str, str] = {}
    in_owner: dict[str, list[tuple[int, int, str]]] = {}
    for g in groups:
        for m in g.members:
            if m.kind == "out":
                out_owner[m.layer] = g.id
            else:
                in_owner.setdefault(m.layer, []).append((m.start, m.stop, g.id, m.copies))
    convs = []
    for name, conv in model.named_modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        slices, cursor = [], 0
        for start, stop, gid, copies in sorted(in_owner.get(name, [])):
            if start > cursor:
                slices.append((None, start - cursor, 1))
            slices.append((gid, stop - start, copies))
            cursor = stop
        if cursor < conv.in_channels:
            slices.append((None, conv.in_channels - cursor, 1))
        convs.append(
            ConvChannels(
                name,
                out_owner.get(name),
                conv.out_channels,
                tuple(slices),
                conv.groups,
                conv.kernel_size[0] * conv.kernel_size[1],
            )
        )
    return convs
