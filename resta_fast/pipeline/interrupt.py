"""Signals during a run: SIGINT and SIGTERM stop at the next tensor boundary; SIGXFSZ is ignored.

Inside ``tensor_boundary_signals()`` the first Ctrl-C (or SIGTERM: Slurm at a
time limit or on preemption, a CI runner cancelling a job, Kubernetes stopping
a pod) only sets a flag; the pipelines call ``raise_if_interrupted()`` between
tensors, so the run unwinds from a known point (writer thread drained, files
closed) and the temporary output is removed; in a batch, finished jobs stay
committed. A second signal raises at once, for a user who will not wait.
``stop_signal()`` says which signal it was, so the CLI exits 128 + its number
(130 for SIGINT, 143 for SIGTERM), as a process killed by it would report.
SIGTERM is taken over only while it has its default action, so a host that
installed its own handler (Ray's workers, say) keeps it. SIGXFSZ (file-size
limit, ``ulimit -f``) would otherwise kill the process with a core dump;
ignored, the write fails with EFBIG and the run ends with a clean error instead.

Signal handlers can only be installed from the main thread; elsewhere the
context manager changes nothing and Ctrl-C keeps Python's default behaviour.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

_requested = threading.Event()
_signal = [signal.SIGINT]  # the signal behind the last stop request
_depth = [0]  # nesting of tensor_boundary_signals() in the main thread


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if SIGINT or SIGTERM arrived since the run started."""
    if _requested.is_set():
        raise KeyboardInterrupt


def interrupt_requested() -> bool:
    return _requested.is_set()


def stop_signal() -> int:
    """The signal that stopped the last run: SIGINT (also for a plain KeyboardInterrupt) or SIGTERM."""
    return _signal[0]


def _on_stop_signal(signum, frame):
    _signal[0] = signum
    if _requested.is_set():
        raise KeyboardInterrupt  # second signal: stop now
    _requested.set()


@contextmanager
def tensor_boundary_signals():
    """Defer SIGINT and SIGTERM to tensor boundaries and ignore SIGXFSZ for the duration.

    Example:
        >>> with tensor_boundary_signals():  # doctest: +SKIP
        ...     for t in tensors:
        ...         write(t)
        ...         raise_if_interrupted()
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _depth[0]:
        # Nested (a GPU batch group runs each job through api.patch): the outer
        # context owns the handlers and the flag, so a signal that arrives
        # between two jobs is not cleared by the next one.
        _depth[0] += 1
        try:
            yield
        finally:
            _depth[0] -= 1
        return
    _depth[0] = 1
    _requested.clear()
    _signal[0] = signal.SIGINT
    # A process started with SIGINT ignored (nohup, `cmd &` in some shells) keeps ignoring it.
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    old_int = signal.getsignal(signal.SIGINT) if ignored else signal.signal(signal.SIGINT, _on_stop_signal)
    # SIGTERM only while it would kill us: another handler belongs to whoever embeds us.
    own_term = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    if own_term:
        signal.signal(signal.SIGTERM, _on_stop_signal)
    old_xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN) if hasattr(signal, "SIGXFSZ") else None
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_int)
        if own_term:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if old_xfsz is not None:
            signal.signal(signal.SIGXFSZ, old_xfsz)
        _requested.clear()
        _depth[0] = 0
