"""Signals during a run: SIGINT stops at the next tensor boundary; SIGXFSZ is ignored.

Inside ``tensor_boundary_signals()`` the first Ctrl-C only sets a flag; the
pipelines call ``raise_if_interrupted()`` between tensors, so the run unwinds
from a known point (writer thread drained, files closed) and the temporary
output is removed. A second Ctrl-C raises at once, for a user who will not
wait. SIGXFSZ (file-size limit, ``ulimit -f``) would otherwise kill the
process with a core dump; ignored, the write fails with EFBIG and the run ends
with a clean error instead.

Signal handlers can only be installed from the main thread; elsewhere the
context manager changes nothing and Ctrl-C keeps Python's default behaviour.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

_requested = threading.Event()


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed since the run started."""
    if _requested.is_set():
        raise KeyboardInterrupt


def interrupt_requested() -> bool:
    return _requested.is_set()


def _on_sigint(signum, frame):
    if _requested.is_set():
        raise KeyboardInterrupt  # second Ctrl-C: stop now
    _requested.set()


@contextmanager
def tensor_boundary_signals():
    """Defer SIGINT to tensor boundaries and ignore SIGXFSZ for the duration.

    Example:
        >>> with tensor_boundary_signals():  # doctest: +SKIP
        ...     for t in tensors:
        ...         write(t)
        ...         raise_if_interrupted()
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested.clear()
    # A process started with SIGINT ignored (nohup, `cmd &` in some shells) keeps ignoring it.
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    old_int = signal.getsignal(signal.SIGINT) if ignored else signal.signal(signal.SIGINT, _on_sigint)
    old_xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN) if hasattr(signal, "SIGXFSZ") else None
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old_int)
        if old_xfsz is not None:
            signal.signal(signal.SIGXFSZ, old_xfsz)
        _requested.clear()
