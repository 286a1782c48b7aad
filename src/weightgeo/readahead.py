"""Reading ahead: a background thread produces items (tensors read from disk) a bounded number of bytes ahead
of the consumer, so that reading the next tensors overlaps the linear algebra on the current ones.

Reads release the GIL (``readinto``), as do NumPy/torch kernels, so on two cores the read of the next shape
group and the decomposition of this one run side by side.

>>> ra = ReadAhead(((8, lambda i=i: i * i) for i in range(5)), budget=16)
>>> list(ra)
[0, 1, 4, 9, 16]
"""

from __future__ import annotations

import collections
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

__all__ = ["ReadAhead"]

T = TypeVar("T")
_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class ReadAhead(Generic[T]):
    """Produce ``items`` in a background thread, at most ``budget`` bytes ahead of the consumer.

    ``items`` yields ``(nbytes, read)``: the size is known up front (from headers), and ``read()`` is
    called only once the budget admits it, so memory stays bounded by what is announced. An item counts
    against the budget from then until the consumer asks for the next one (it is then done with it). A single item larger than the budget is still produced, alone. An
    exception in the producer is raised in the consumer, at the item where it happened; leaving the loop
    early (an exception, ``break``) stops the producer after its current item (call :meth:`close`, or use
    the object as a context manager).

    Args:
        items: an iterable of ``(nbytes, read)``, consumed in the background thread; ``read()`` returns the
            item handed to the consumer.
        budget: bytes the producer may run ahead (≥ 0; 0 means one item at a time, no overlap).
        background: ``False`` reads each item in the consumer's thread when it asks for it (no thread):
            for sources whose reads run torch kernels (see ``Checkpoint.pure_io``).
        ahead: also at most this many bytes read and not yet handed out (``None``: no such bound). With items of
            very different sizes, ``budget`` must hold the largest with something read behind it, but behind a
            small item that would let a whole budget of further items be read ahead: this bounds them.
    """

    def __init__(
        self,
        items: Iterable[tuple[int, Callable[[], T]]],
        *,
        budget: int,
        background: bool = True,
        ahead: int | None = None,
    ):
        self._items = items
        self._background = background
        self._budget = max(0, int(budget))
        self._ahead = None if ahead is None else max(0, int(ahead))
        self._queue: collections.deque = collections.deque()
        self._inflight = 0
        self._held = 0  # bytes of the item the consumer holds (in _inflight until it asks for the next)
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._produce, name="weightgeo-readahead", daemon=True)
        if background:
            self._thread.start()

    def _produce(self) -> None:
        try:
            for nbytes, read in self._items:
                with self._cond:
                    while not self._stop and self._wait(nbytes):
                        self._cond.wait()
                    if self._stop:
                        return
                    self._inflight += nbytes
                item = read()
                with self._cond:
                    self._queue.append((nbytes, item))
                    self._cond.notify_all()
                del item  # the queue, then the consumer, hold it: not this thread while it waits to read the next
            last: object = _END
        except BaseException as exc:  # handed to the consumer, which raises it in its own thread
            last = _Failure(exc)
        with self._cond:
            self._queue.append((0, last))
            self._cond.notify_all()

    def _wait(self, nbytes: int) -> bool:
        """Whether reading an item of ``nbytes`` now would exceed a bound (called holding the lock)."""
        if self._inflight > 0 and self._inflight + nbytes > self._budget:
            return True
        read = self._inflight - self._held  # read ahead, not handed out yet
        return self._ahead is not None and read > 0 and read + nbytes > self._ahead

    def __iter__(self) -> Iterator[T]:
        if not self._background:
            for _, read in self._items:
                yield read()
            return
        done = 0
        try:
            while True:
                with self._cond:
                    self._inflight -= done
                    self._held = 0
                    self._cond.notify_all()
                    while not self._queue:
                        self._cond.wait()
                    done, item = self._queue.popleft()
                    self._held = done
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
                del item  # not held here while the next one is read: its bytes no longer count
        finally:
            self.close(wait=sys.exc_info()[0] is None)

    def peek(self, match: Callable[[T], bool] | None = None) -> T | None:
        """The next item if it has already been read, without taking it (the next iteration still returns it);
        with ``match``, the first item already read for which it is true. ``None`` when there is none (this never
        waits), at the end, or without a background thread."""
        with self._cond:
            items = [entry[1] for entry in self._queue]
        for item in items:
            if item is _END or isinstance(item, _Failure):
                return None
            if match is None or match(item):
                return item
        return None

    def close(self, *, wait: bool = True) -> None:
        """Stop the producer (after the item it is reading) and, with ``wait``, wait for its thread. Leaving on an
        exception (Ctrl-C) does not wait: the daemon thread ends after its read, which may take seconds."""
        with self._cond:
            self._stop = True
            self._queue.clear()
            self._cond.notify_all()
        if wait and self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> ReadAhead[T]:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close(wait=exc_type is None)
