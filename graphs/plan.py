"""A pruning plan: plain data, JSON round-trip, replayable on the same model."""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

from yoloprune.graphs.blocks import hidden_group
from yoloprune.graphs.errors import PlanError, first_line
from yoloprune.graphs.files import write_text_atomic

PLAN_FORMAT = "yoloprune.plan.v1"
MAX_PLAN_BYTES = 64 << 20  # a plan lists kept channel indices: a few MB for the largest models


@dataclass(frozen=True)
class GroupPlan:
    """Channels kept in one group (indices into the group's root conv outputs, ascending)."""

    id: str
    size: int
    keep: tuple[int, ...]

    @property
    def kept(self) -> int:
        return len(self.keep)

    @property
    def pruned(self) -> bool:
        return self.kept < self.size


@dataclass(frozen=True)
class PruningPlan:
    model: str
    imgsz: int
    importance: str
    allocation: str  # "uniform" | "global" | "sensitivity" | "latency"
    target: dict  # {"kind": "ratio" | "macs" | "speedup" | "latency_ms", "value": float}
    round_to: int
    max_ratio: float
    macs_before: int
    macs_after: int  # predicted from channel counts; equals the pruned model's by construction
    groups: tuple[GroupPlan, ...]
    seed: int = 0
    method: str = "structured"  # or "unstructured": no channel removed, weights zeroed
    latency: dict | None = None  # latency-aware plans: runtime, predicted and measured ms
    # residual blocks removed whole (graphs.blocks): their hidden groups keep 0 channels
    drop_blocks: tuple[str, ...] = ()
    # --round-to auto: the measured choice and its accuracy check (compiler.alignment)
    alignment: dict | None = None
    # --allocation sensitivity: images, levels, seconds and each group's measured head error
    # by kept channels (compiler.allocation)
    sensitivity: dict | None = None
    format: str = field(default=PLAN_FORMAT)

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> PruningPlan:
        """A plan read back from JSON, every field checked for its type and sense (keep
        indices distinct ascending integers in range, counts on the plan's own round_to)."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise PlanError(
                f"{source}: malformed plan JSON ({exc}); regenerate it with `plan`"
            ) from exc
        if type(data) is not dict or data.get("format") != PLAN_FORMAT:
            found = data.get("format") if type(data) is dict else type(data).__name__
            raise PlanError(f"{source}: not a yoloprune plan (format {found!r:.40})")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise PlanError(f"{source}: unknown plan key {unknown[0]!r:.40}; regenerate it")
        required = [
            f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
        ]
        missing = [name for name in required if name not in data]
        if missing:
            raise PlanError(f"{source}: plan key {missing[0]!r} is missing; regenerate it")
        try:
            fields_ = {k: _checked_field(k, v) for k, v in data.items()}
            plan = cls(**fields_)
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(
                f"{source}: malformed plan ({first_line(exc)}); regenerate it with `plan`"
            ) from exc
        plan.check_alignment(source)
        plan.check_emptied(source)
        if (plan.method == "unstructured") != (plan.target["kind"] == "sparsity"):
            raise PlanError(
                f"{source}: method {plan.method} with target {plan.target['kind']}: an "
                "unstructured plan's target is sparsity, and only its; regenerate it"
            )
        return plan

    def check_emptied(self, source: str = "plan") -> None:
        """A group keeps no channel exactly where the plan removes its residual block whole
        (``drop_blocks``: the block's hidden group, graphs.blocks)."""
        emptied = {g.id for g in self.groups if g.kept == 0}
        dropped = {hidden_group(block) for block in self.drop_blocks}
        if emptied - dropped:
            raise PlanError(
                f"{source}: group {sorted(emptied - dropped)[0]} keeps no channel, which only "
                "the hidden group of a block in drop_blocks may; regenerate it with `plan`"
            )
        if dropped - emptied:
            raise PlanError(
                f"{source}: drop_blocks removes a block whose hidden group "
                f"{sorted(dropped - emptied)[0]} keeps channels (or is not listed); regenerate "
                "it with `plan`"
            )

    def check_alignment(self, source: str = "plan") -> None:
        """Every pruned group keeps a multiple of ``round_to`` (0 for dropped blocks)."""
        for group in self.groups:
            if group.pruned and group.kept % self.round_to:
                raise PlanError(
                    f"{source}: group {group.id} keeps {group.kept} channels, not a multiple of "
                    f"the plan's round_to {self.round_to}; regenerate it with `plan`"
                )

    def then(self, later: PruningPlan) -> PruningPlan:
        """The single plan, against this plan's model, that equals applying ``self`` then
        ``later`` (made on the model ``self`` produced): kept indices compose."""
        mine = {g.id: g for g in self.groups}
        gone = [g for g in self.groups if g.kept == 0]  # hidden groups of dropped blocks
        if {g.id for g in later.groups} != set(mine) - {g.id for g in gone}:
            raise PlanError("plans to compose must come from the same network (same groups)")
        groups = list(gone)
        for g in later.groups:
            first = mine[g.id]
            if g.size != first.kept:
                raise PlanError(
                    f"group {g.id}: the later plan expects {g.size} channels, the "
                    f"earlier one leaves {first.kept}"
                )
            groups.append(GroupPlan(g.id, first.size, tuple(first.keep[i] for i in g.keep)))
        order = {g.id: i for i, g in enumerate(self.groups)}
        groups.sort(key=lambda g: order[g.id])
        drop = tuple(sorted({*self.drop_blocks, *later.drop_blocks}))
        return replace(self, groups=tuple(groups), macs_after=later.macs_after, drop_blocks=drop)

    def save(self, path: Path) -> None:
        write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> PruningPlan:
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"{path}: plan file not found; write one with `plan --out {path}`")
        if path.stat().st_size > MAX_PLAN_BYTES:
            raise PlanError(f"{path}: {path.stat().st_size:,} bytes is too large for a plan")
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError) as exc:
            raise PlanError(f"{path}: not a text plan file ({first_line(exc)})") from exc
        return cls.from_json(text, str(path))


_SCALARS = {
    "model": str,
    "imgsz": int,
    "importance": str,
    "allocation": str,
    "round_to": int,
    "max_ratio": float,
    "macs_before": int,
    "macs_after": int,
    "seed": int,
    "method": str,
    "format": str,
}


def _checked_field(key: str, value):
    """One plan field, of the type the plan writes (``ValueError``/``TypeError`` otherwise)."""
    if key in _SCALARS:
        kind = _SCALARS[key]
        if kind is float and type(value) is int:
            value = float(value)
        if type(value) is not kind or (kind is float and not math.isfinite(value)):
            raise TypeError(f"{key} must be a {kind.__name__}, not {value!r:.40}")
        if kind is int and key != "seed" and value < (1 if key != "macs_after" else 0):
            raise ValueError(f"{key} {value} is out of range")
        if key == "method" and value not in METHODS:
            raise ValueError(f"method {value!r:.40} is not one of {', '.join(METHODS)}")
        return value
    if key == "groups":
        if type(value) is not list:
            raise TypeError("groups must be a list")
        return tuple(_checked_group(g) for g in value)
    if key == "drop_blocks":
        if type(value) is not list or not all(type(b) is str for b in value):
            raise TypeError("drop_blocks must be a list of module names")
        return tuple(value)
    if key == "alignment":
        return None if value is None else _checked_alignment(value)
    if key == "sensitivity":
        return None if value is None else _checked_sensitivity(value)
    if key == "target":
        return _checked_target(value)
    if key == "latency":
        if not (type(value) is dict or value is None):
            raise TypeError("latency must be a mapping")
        return value
    raise KeyError(key)


METHODS = ("structured", "unstructured")
TARGET_KINDS = ("ratio", "macs", "speedup", "latency_ms", "sparsity")  # sparsity: unstructured


def _checked_target(value) -> dict:
    """``{"kind": ..., "value": ...}`` in the kind's range (and, from --steps, ``steps``)."""
    if type(value) is not dict or value.get("kind") not in TARGET_KINDS:
        raise TypeError(f"target must be a mapping with kind one of {', '.join(TARGET_KINDS)}")
    number = value.get("value")
    if type(number) not in (int, float) or not (math.isfinite(number) and number > 0):
        raise ValueError(f"target value {number!r:.40} must be a positive number")
    fraction = value["kind"] in ("ratio", "macs", "sparsity")
    if (fraction and number >= 1) or (value["kind"] == "speedup" and number < 1):
        bound = "below 1" if fraction else "at least 1"
        raise ValueError(f"target {value['kind']} {number:g} must be {bound}")
    if set(value) - {"kind", "value", "steps"}:
        raise TypeError("target holds only kind, value and steps")
    if "steps" in value and (type(value["steps"]) is not int or value["steps"] < 1):
        raise TypeError("target steps must be a positive integer")
    return value


_ALIGNMENT_FIELDS = {
    "chosen": int,
    "rule": str,
    "accuracy_check": str,
    "candidates": list,
    "runtime": str,
    "table_key": dict,
}


def _checked_record(key: str, record, kinds: dict) -> None:
    """A record of exactly ``kinds``' fields, each of its type (or one of its types)."""
    if type(record) is not dict or set(record) != set(kinds):
        raise TypeError(f"{key} must be a mapping of {sorted(kinds)}")
    for name, kind in kinds.items():
        allowed = kind if isinstance(kind, tuple) else (kind,)
        if type(record[name]) not in allowed:
            raise TypeError(f"{key}.{name} must be a {' or '.join(k.__name__ for k in allowed)}")


def _checked_alignment(record) -> dict:
    """``--round-to auto``'s record, as compiler.alignment writes it (shown, never executed)."""
    _checked_record("alignment", record, _ALIGNMENT_FIELDS)
    for row in record["candidates"]:
        if not (
            type(row) is dict
            and type(row.get("round_to")) is int
            and type(row.get("relative_latency")) in (int, float)
            and type(row.get("eligible")) is bool
        ):
            raise TypeError("alignment.candidates: rows of round_to, relative_latency, eligible")
    return record


_SENSITIVITY_FIELDS = {"images": int, "levels": list, "seconds": (int, float), "errors": dict}


def _checked_sensitivity(record) -> dict:
    """``--allocation sensitivity``'s record, as compiler.allocation writes it (shown only)."""
    _checked_record("sensitivity", record, _SENSITIVITY_FIELDS)
    for group, curve in record["errors"].items():
        if type(curve) is not dict or not all(
            type(k) is str and k.isdigit() and type(e) in (int, float) and math.isfinite(e)
            for k, e in curve.items()
        ):
            raise TypeError(f"sensitivity.errors[{group!r:.60}]: kept channels -> error")
    return record


def _checked_group(group) -> GroupPlan:
    if type(group) is not dict or set(group) != {"id", "size", "keep"}:
        raise TypeError("each group must be {id, size, keep}")
    gid, size, keep = group["id"], group["size"], group["keep"]
    if type(gid) is not str or type(size) is not int or size < 1 or type(keep) is not list:
        raise TypeError(f"group {gid!r:.60}: id must be a string, size a positive integer")
    if not all(type(i) is int for i in keep):
        raise TypeError(f"group {gid}: keep must list integer channel indices")
    if keep != sorted(set(keep)) or (keep and not 0 <= keep[0] <= keep[-1] < size):
        raise ValueError(f"group {gid}: keep must be distinct ascending indices in [0, {size})")
    return GroupPlan(gid, size, tuple(keep))
