"""A guest repair's clean-up holds the stop signals until it is over (offline_fix.commands.uninterrupted)."""

from __future__ import annotations

import os
import signal

from h2kd.operations.offline_fix.commands import uninterrupted


def test_a_stop_during_the_clean_up_is_handled_once_right_after_it():
    handled: list[tuple[int, bool]] = []
    inside = [False]
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: handled.append((signum, inside[0])))
    try:
        with uninterrupted():
            inside[0] = True
            with uninterrupted():                  # nested: held until the outermost block ends
                os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)   # the same stop twice: handled once
            assert handled == []
            inside[0] = False
        assert handled == [(signal.SIGTERM, False)]
        os.kill(os.getpid(), signal.SIGTERM)       # and the real handler is back
        assert handled == [(signal.SIGTERM, False)] * 2
        assert not signal.pthread_sigmask(signal.SIG_BLOCK, []) & {signal.SIGTERM, signal.SIGINT, signal.SIGALRM}
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_handler_that_raises_leaves_the_others_restored():
    """The worker's handler raises to stop the attempt: when it does, right after the block, every stop signal
    has its own handler back, and a later block holds them again."""
    class Stopped(Exception):
        pass

    def stop(signum, frame):
        raise Stopped

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)}
    try:
        for s in saved:
            signal.signal(s, stop)
        try:
            with uninterrupted():
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGTERM)
        except Stopped:
            pass
        else:
            raise AssertionError("the held stop was never handled")
        assert all(signal.getsignal(s) is stop for s in saved)
        reached = []
        try:
            with uninterrupted():
                os.kill(os.getpid(), signal.SIGALRM)
                reached.append(True)
        except Stopped:
            pass
        assert reached == [True]
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
