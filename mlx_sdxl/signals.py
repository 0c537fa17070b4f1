"""SIGTERM and SIGHUP handled like Ctrl-C, so every `try/finally` cleans up.

Python turns SIGINT into KeyboardInterrupt, which unwinds the stack and runs the
cleanup of temporary files. SIGTERM (a `kill`, a service manager, a CI timeout)
and SIGHUP (the terminal closed) kill the process by default, leaving whatever
was half written. Inside `terminate_as_interrupt()` both raise `Terminated`, a
KeyboardInterrupt subclass, so the same cleanup runs; `exit_status` gives the
shell's 128 + signal number (130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP).

`deferred()` holds these signals (and SIGINT) back for a few lines that must not
be cut in half (creating a temporary and remembering its name, swapping two
folders); the first one is acted on as soon as the block ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

TERMINATING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
_DEFERRED = tuple(s for s in (signal.SIGINT, *TERMINATING))


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process gets SIGTERM or SIGHUP."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def exit_status(exc: BaseException) -> int:
    """The shell's status for a process ended by `exc`: 128 + the signal number."""
    if isinstance(exc, Terminated):
        return 128 + exc.signum
    return 128 + signal.SIGINT


def describe(exc: BaseException) -> str:
    """'terminated' (SIGTERM), 'terminated (hang-up)' (SIGHUP) or 'interrupted' (Ctrl-C)."""
    if isinstance(exc, Terminated):
        return "terminated (hang-up)" if exc.signum == getattr(signal, "SIGHUP", None) else "terminated"
    return "interrupted"


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM and SIGHUP raise `Terminated`; the previous handlers come back after.

    A no-op outside the main thread (Python only lets the main thread set handlers). A signal
    the caller had set to be ignored (`nohup` ignores SIGHUP) stays ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    try:
        for signum in TERMINATING:
            old = signal.getsignal(signum)
            if old is signal.SIG_IGN:
                continue
            previous[signum] = old
            signal.signal(signum, _raise_terminated)
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back inside the block; the first one that came is acted on
    (its handler runs, or its default action) as soon as the block ends.

    Python runs signal handlers in the main thread only, so elsewhere there is nothing to hold back.
    (A thread signal mask would not do: MLX's own threads would still take the signal.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = {}
    try:
        for signum in _DEFERRED:
            old = signal.getsignal(signum)
            if old is signal.SIG_IGN or old is None:
                continue
            previous[signum] = old
            signal.signal(signum, lambda n, frame: pending.append(n))
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
        if pending:
            _deliver(pending[0], previous[pending[0]])


def _deliver(signum: int, handler) -> None:
    """Act on a held signal as if it had just arrived."""
    if callable(handler):
        handler(signum, None)
    else:  # SIG_DFL: let the default action (usually the end of the process) happen now
        os.kill(os.getpid(), signum)


def report(prog: str, exc: BaseException) -> int:
    """Print one `PROG: terminated` / `PROG: interrupted` line and return the exit status.

    After SIGHUP the terminal may be gone; a failed write to it is not an error.
    """
    try:
        print(f"{prog}: {describe(exc)}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
    return exit_status(exc)
