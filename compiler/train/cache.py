"""Work kept between fine-tuning epochs, within a memory budget.

Without augmentation every epoch feeds the same letterboxed images and asks the (frozen, eval
mode) teacher the same question, so after the first epoch both are looked up instead of decoded
and recomputed. Images come back bit for bit; the teacher's targets are the values of the batch
the sample was first seen in (batch composition changes float rounding only: eval-mode
BatchNorm makes each sample's output independent of its batch), and the teacher runs on the
rows of a batch that are not kept, only. Samples that do not fit the budget are recomputed each
epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator

import torch
from torch import nn


class SampleMemo:
    """Per-sample tensors by key, admitted while their bytes fit the budget."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._refused: set[Hashable] = set()
        self._items: dict[Hashable, tuple] = {}

    def get(self, key: Hashable) -> tuple | None:
        return self._items.get(key)

    def put(self, key: Hashable, item: tuple) -> bool:
        """Keep ``item`` (a tuple whose tensors count against the budget) unless it is
        already kept or does not fit."""
        if key in self._items:
            return True
        size = sum(t.numel() * t.element_size() for t in _leaves(item))
        if self.used_bytes + size > self.budget_bytes:
            self._refused.add(key)
            return False
        self._items[key] = item
        self.used_bytes += size
        return True

    def count(self, kind: str) -> int:
        return sum(1 for key in self._items if key[0] == kind)

    def summary(self) -> dict:
        return {
            "budget_mib": round(self.budget_bytes / 2**20, 1),
            "used_mib": round(self.used_bytes / 2**20, 1),
            "images": self.count("train"),
            "val_images": self.count("val"),
            "teacher_outputs": self.count("teacher"),
            "refused": len(self._refused),  # samples (not attempts) that did not fit
        }


class TeacherTargets:
    """The teacher's distillation targets for a batch of samples: the kept rows looked up in
    ``memo``, the teacher run on the others only (None: it runs on every batch)."""

    def __init__(
        self,
        teacher: nn.Module,
        targets_of: Callable[[object], object],
        memo: SampleMemo | None,
    ):
        self.teacher, self.targets_of, self.memo = teacher, targets_of, memo
        self._template = None

    def __call__(self, images: torch.Tensor, indices: list[int]):
        if self.memo is None:
            with torch.no_grad():
                return self.targets_of(self.teacher(images))
        rows = [self.memo.get(("teacher", i)) for i in indices]
        missing = [r for r, row in enumerate(rows) if row is None]
        if missing:
            with torch.no_grad():
                fresh = self.targets_of(self.teacher(images[missing]))
            self._template, leaves = fresh, _leaves(fresh)
            for k, r in enumerate(missing):
                rows[r] = tuple(t[k].clone() for t in leaves)
                self.memo.put(("teacher", indices[r]), rows[r])
        stacked = [torch.stack(parts) for parts in zip(*rows, strict=True)]
        return _rebuild(self._template, iter(stacked))


def _leaves(tree) -> list[torch.Tensor]:
    """The tensors of nested tuples, lists and dicts, in a fixed order."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [leaf for key in tree for leaf in _leaves(tree[key])]
    if isinstance(tree, (list, tuple)):
        return [leaf for item in tree for leaf in _leaves(item)]
    return []


def _rebuild(template, leaves: Iterator[torch.Tensor]):
    """``template``'s structure with its tensors replaced, in ``_leaves`` order."""
    if isinstance(template, torch.Tensor):
        return next(leaves)
    if isinstance(template, dict):
        return {key: _rebuild(value, leaves) for key, value in template.items()}
    if isinstance(template, (list, tuple)):
        return type(template)(_rebuild(item, leaves) for item in template)
    return template


def map_tensors(function: Callable[[torch.Tensor], torch.Tensor], tree):
    """``tree`` (nested tuples, lists and dicts) with ``function`` applied to each tensor."""
    return _rebuild(tree, iter([function(leaf) for leaf in _leaves(tree)]))
