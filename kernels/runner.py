"""One interface for every runtime that runs a model: :class:`Runner`, and :func:`time_runners`.

A runner is made cheaply, acquires what it runs on in :meth:`Runner.activate` (an ONNX Runtime
session, a model copy on a device, a TensorRT engine) and releases it in
:meth:`Runner.deactivate`; ``with runner:`` does both. :meth:`Runner.infer` runs the model.
The timing hooks (:meth:`~Runner.sync`, :meth:`~Runner.clock`, :meth:`~Runner.timing_order`)
say how :func:`time_runners` times it, and :meth:`~Runner.describe` what a report must state
about it. The shape is Polygraphy's ``BaseRunner``: subclasses implement ``activate_impl``,
``deactivate_impl`` and ``infer_impl``; the base class keeps the active state.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from functools import partial
from typing import Any

from yoloprune.kernels.timing import Clock, Timing, interleaved

DEFAULT_ORDER = {"block": 1, "rewarm": 0}


class RunnerStateError(RuntimeError):
    """A runner used out of order: activated twice, or run while inactive (a caller's bug)."""


class Runner(abc.ABC):
    """A model on one runtime. Subclasses set :attr:`name` and implement the ``*_impl``
    methods; errors while activating are one-line :class:`RuntimeSetupError` (or a subclass)."""

    name = "runner"
    _active = False

    @property
    def is_active(self) -> bool:
        return self._active

    def activate(self) -> Runner:
        """Acquire what the runner runs on; returns the runner."""
        if self._active:
            raise RunnerStateError(f"{self.name} runner is already active; deactivate it first")
        self.activate_impl()
        self._active = True
        return self

    def deactivate(self) -> None:
        """Release what :meth:`activate` acquired (nothing to do if inactive)."""
        if not self._active:
            return
        try:
            self.deactivate_impl()
        finally:
            self._active = False

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def infer(self, inputs: Any = None) -> Any:
        """Run the model on ``inputs``; returns its outputs (see the subclass)."""
        self.require_active()
        return self.infer_impl(inputs)

    def require_active(self) -> None:
        """Raise :class:`RunnerStateError` unless the runner is active."""
        if not self._active:
            raise RunnerStateError(
                f"{self.name} runner is not active: use `with runner:` or call activate() first"
            )

    @abc.abstractmethod
    def activate_impl(self) -> None: ...

    @abc.abstractmethod
    def deactivate_impl(self) -> None: ...

    @abc.abstractmethod
    def infer_impl(self, inputs: Any) -> Any: ...

    # Timing hooks (defaults: synchronous work, wall clock, plain A B A B turns).

    def sync(self) -> None:
        """Wait until the work :meth:`infer` queued is done (asynchronous devices)."""
        return None

    def clock(self) -> Clock | None:
        """The clock timing this runner's calls; None: the host's wall clock."""
        return None

    def timing_order(self) -> dict:
        """``block`` / ``rewarm`` arguments of :func:`kernels.timing.interleaved`."""
        return dict(DEFAULT_ORDER)

    def describe(self) -> dict:
        """What a report of this runner's timings must state (settings, versions)."""
        return {}


def time_runners(
    runners: Mapping[str, Runner],
    inputs: Any = None,
    runs: int = 20,
    warmup: int = 3,
    seconds: float = 0.0,
) -> dict[str, Timing]:
    """Time active runners of one kind against each other on the same ``inputs`` (None: each
    runner's own fixed input, where it has one), interleaved in the order they need, each
    synchronised and clocked by its own hooks: {name: Timing}. ``seconds``: more runs within
    that budget (:func:`kernels.timing.interleaved`)."""
    if not runners:
        raise ValueError("time_runners needs at least one runner")
    inactive = [name for name, r in runners.items() if not r.is_active]
    if inactive:
        raise RunnerStateError(f"activate the runners before timing them: {', '.join(inactive)}")
    kinds = sorted({r.name for r in runners.values()})
    if len(kinds) != 1:
        raise ValueError(f"time runners of one kind together, not {' and '.join(kinds)}")
    orders = [r.timing_order() for r in runners.values()]
    if any(order != orders[0] for order in orders):
        raise ValueError(f"time runners with the same timing order together, not {orders}")
    return interleaved(
        {name: partial(r.infer, inputs) for name, r in runners.items()},
        runs=runs,
        warmup=warmup,
        seconds=seconds,
        sync={name: r.sync for name, r in runners.items()},
        clock={name: r.clock() for name, r in runners.items()},
        **orders[0],
    )
