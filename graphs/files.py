"""Nothing partial: atomic file writes (every file appears whole or not at all), and holding
SIGINT/SIGTERM over steps an interrupt must not cut in two."""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from yoloprune.graphs.errors import YoloPruneError


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block
    succeeds, removed when it fails (an exception, Ctrl-C, SIGTERM unwound as an exception)."""
    path = Path(path)
    # Named per process (not mkstemp, whose files are private to the owner): the writer creates
    # it with the usual permissions.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def save_png_atomic(figure, path: Path, dpi: int = 120) -> None:
    """Lay out a matplotlib ``figure``, write it to ``path`` as PNG through
    :func:`atomic_path`, and close it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=dpi, format="png")
    plt.close(figure)


def missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    return missing


def remove_if_empty(folders: list[Path]) -> None:
    """Remove each folder (deepest first) that is still empty; leave the others."""
    for folder in folders:
        with contextlib.suppress(OSError):  # not empty, or gone: leave it
            folder.rmdir()


@contextlib.contextmanager
def parent_made(path: Path) -> Iterator[None]:
    """``path``'s missing parent folders are made for the block, and removed again (those
    still empty) if it fails: a refused or failed write leaves no folder behind."""
    missing = missing_folders(path.parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        remove_if_empty(missing)
        raise YoloPruneError(f"{path}: cannot write there ({exc.strerror or exc})") from exc
    try:
        yield
    except BaseException:
        remove_if_empty(missing)
        raise


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Defer SIGINT and SIGTERM until the block ends (main thread only; elsewhere a no-op): for
    a few renames that must happen together, and for native code that is not safe to unwind
    through (the TorchScript exporter's tracer). A signal that arrives meanwhile is delivered,
    and raises, as the block ends. Both layers are held: the signals are blocked, and the
    Python handlers are replaced by a recorder for the block, since a signal that arrived just
    before the block has already tripped Python's flag and would run its handler inside it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    handlers = {s: signal.signal(s, lambda signum, frame: arrived.append(signum)) for s in held}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, set(held))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # pending ones reach the recorder
        for number, handler in handlers.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        if arrived:
            signal.raise_signal(arrived[0])  # now to the real handler, which raises here


def import_native(name: str):
    """Import a module with a native extension (onnx, onnxruntime, onnxsim; a fixed name, never
    one read from a file) with SIGINT/SIGTERM held: a signal raised as an exception while an
    extension initialises its types aborts the process (seen: ``terminate called after throwing
    an instance of 'nanobind::python_error'`` when SIGTERM landed in ``import onnx``)."""
    with signals_held():
        return importlib.import_module(name)
