"""Ctrl-C answered within a second at any point of a command, even inside a long kernel.

Python runs its SIGINT handler (the ``KeyboardInterrupt``) in the main thread between two bytecodes only: while the
main thread is inside one long C call (a float64 ``eigh`` of a 4096-wide Gram, a read of a 500 MB tensor) it
waits for that call to return, seconds to minutes. :func:`answer_interrupts` adds a watchdog: the C-level signal
handler writes the signal to a pipe at once (``signal.set_wakeup_fd``), a thread waiting on it starts a clock, and
if the process has not exited ``within_s`` later it prints the message and ends the process (``os._exit``, status
130). Nothing is left half-written by that: every output and cache entry is written to a temporary name and
renamed into place (a killed writer leaves only a temporary file, which ``cache prune`` removes). When the main
thread answers first, the ``KeyboardInterrupt`` unwinds as usual and the same message is printed once.

>>> with answer_interrupts(lambda: "stopped"):
...     pass
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

__all__ = ["answer_interrupts", "say_interrupted", "WITHIN_S"]

#: seconds the main thread gets to answer Ctrl-C itself before the watchdog ends the process (the contract is 2)
WITHIN_S = 1.0

_said = threading.Event()
_lock = threading.Lock()


def say_interrupted(message: str, *, raw: bool = False) -> None:
    """Print the interrupt message to stderr once per command (the main thread or the watchdog, whichever is
    first). ``raw``: straight to file descriptor 2, past Python's buffers and their locks (the watchdog must not wait
    for a main thread stuck mid-write)."""
    with _lock:
        if _said.is_set():
            return
        _said.set()
    text = f"weightgeo: interrupted; {message}\n"
    try:
        if raw:  # a progress bar may still be drawn on the line: start a new one
            os.write(2, ("\n" + text).encode("utf-8", "replace"))
        else:
            sys.stderr.write(text)
            sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed
        pass


@contextlib.contextmanager
def answer_interrupts(message: Callable[[], str], *, within_s: float = WITHIN_S, status: int = 130) -> Iterator[None]:
    """Inside this context a SIGINT ends the process within ``within_s`` seconds with ``status``, printing
    ``message()`` (see the module doc). Outside the main thread, or where signals cannot be watched, it does
    nothing."""
    _said.clear()  # one message per command (a process may run several: tests, notebooks)
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "set_wakeup_fd"):
        yield
        return
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except (ValueError, OSError):  # not the main interpreter, or an fd that cannot be used
        os.close(r)
        os.close(w)
        yield
        return
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                got = os.read(r, 64)
            except OSError:
                return
            if not got:  # the write end was closed: the context is over
                return
            if signal.SIGINT in got and not done.wait(within_s):
                say_interrupted(message(), raw=True)
                os._exit(status)

    thread = threading.Thread(target=watch, name="weightgeo-interrupt-watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        signal.set_wakeup_fd(previous)
        os.close(w)  # wakes the watchdog (end of file)
        thread.join(timeout=1.0)
        os.close(r)
