"""graphs.files: signals held over steps an interrupt must not cut in two."""

import signal

import pytest

from yoloprune.graphs.files import signals_held


class Stopped(Exception):
    pass


def test_a_signal_inside_the_block_raises_as_it_ends_and_the_handlers_come_back():
    def stop(signum, frame):
        raise Stopped(signum)

    before = signal.signal(signal.SIGTERM, stop)
    interrupt = signal.getsignal(signal.SIGINT)  # ignored where the run started under nohup
    try:
        reached = []
        with pytest.raises(Stopped), signals_held():
            signal.raise_signal(signal.SIGTERM)  # held: the block goes on
            for _ in range(1000):  # bytecode boundaries, where Python runs its handlers
                reached.append(1)
        assert len(reached) == 1000
        assert signal.getsignal(signal.SIGTERM) is stop
        assert signal.getsignal(signal.SIGINT) is interrupt
        with signals_held():  # nothing arrived: nothing raised
            pass
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_handler_already_due_runs_after_the_block_not_inside_it():
    """A signal whose Python handler is pending as the block starts (tripped just before) is
    recorded by the block's stand-in handler and delivered as the block ends."""
    calls = []

    def stop(signum, frame):
        calls.append(signum)
        raise Stopped(signum)

    before = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(Stopped), signals_held():
            handler = signal.getsignal(signal.SIGTERM)
            assert handler is not stop
            handler(signal.SIGTERM, None)  # what Python runs for a signal tripped before
            assert calls == []
        assert calls == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, before)
