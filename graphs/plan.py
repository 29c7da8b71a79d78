"""A pruning plan: plain data, JSON round-trip, replayable on the same model."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from graphs.errors import PlanError

PLAN_FORMAT = "yoloprune.plan.v1"


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
    allocation: str  # "uniform" | "global" | "latency"
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
    format: str = field(default=PLAN_FORMAT)

    @property
    def macs_ratio(self) -> float:
        return self.macs_after / self.macs_before

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> PruningPlan:
        try:
            data = json.loads(text)
            if data.get("format") != PLAN_FORMAT:
                raise PlanError(f"{source}: not a yoloprune plan (format {data.get('format')!r})")
            data["groups"] = tuple(
                GroupPlan(g["id"], int(g["size"]), tuple(int(i) for i in g["keep"]))
                for g in data["groups"]
            )
            data["drop_blocks"] = tuple(str(b) for b in data.get("drop_blocks", ()))
            return cls(**data)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise PlanError(
                f"{source}: malformed plan JSON ({exc}); regenerate it with `plan`"
            ) from exc

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
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> PruningPlan:
        return cls.from_json(Path(path).read_text(), str(path))
