"""ReadAhead: order, the byte budget, producer errors raised in the consumer, early stop."""

import threading
import time

import pytest

from weightgeo.readahead import ReadAhead


def test_order_and_values():
    assert list(ReadAhead(((1, lambda i=i: i) for i in range(50)), budget=3)) == list(range(50))


def test_budget_bounds_what_is_read_ahead():
    lock = threading.Lock()
    state = {"read": 0, "done": 0, "max_ahead": 0}

    def read(i):
        with lock:
            state["read"] += 1
            state["max_ahead"] = max(state["max_ahead"], state["read"] - state["done"])
        return i

    items = ((10, lambda i=i: read(i)) for i in range(30))
    for _ in ReadAhead(items, budget=25):
        time.sleep(0.002)  # a slow consumer: the producer would run far ahead without the budget
        with lock:
            state["done"] += 1
    # two items of 10 bytes fit in 25: the one being consumed plus at most one more read ahead
    assert state["max_ahead"] <= 2


@pytest.mark.parametrize("ahead, most", [(None, 4), (15, 1)])
def test_ahead_bounds_what_is_read_behind_a_small_item(ahead, most):
    """A budget that holds a large item lets a whole budget of small items be read behind a small one; ``ahead``
    bounds those (the large item is still read, with nothing else ahead)."""
    lock = threading.Lock()
    state = {"read": 0, "done": 0, "max_ahead": 0}

    def read(i):
        with lock:
            state["read"] += 1
            state["max_ahead"] = max(state["max_ahead"], state["read"] - state["done"] - 1)
        return i

    sizes = [10, 10, 10, 10, 10, 100, 10, 10, 10, 10, 10]
    items = ((n, lambda i=i: read(i)) for i, n in enumerate(sizes))
    got = []
    for i in ReadAhead(items, budget=110, ahead=ahead):
        time.sleep(0.05)  # a slow consumer: the producer runs as far ahead as it may
        with lock:
            state["done"] += 1
        got.append(i)
    assert got == list(range(len(sizes)))
    assert state["max_ahead"] == most  # items read and not yet handed out, beside the one held


def test_oversized_item_is_still_produced():
    assert list(ReadAhead(((100, lambda: "big"), (1, lambda: "small")), budget=10)) == ["big", "small"]


def test_producer_error_is_raised_in_the_consumer_at_its_item():
    def items():
        yield 1, lambda: "a"
        yield 1, lambda: 1 / 0

    got = []
    with pytest.raises(ZeroDivisionError):
        for x in ReadAhead(items(), budget=100):
            got.append(x)
    assert got == ["a"]


def test_leaving_early_stops_the_producer():
    read = []
    ra = ReadAhead(((1, lambda i=i: read.append(i) or i) for i in range(10_000)), budget=2)
    for x in ra:
        if x == 3:
            break
    ra.close()
    assert not ra._thread.is_alive()
    assert len(read) < 10


def test_foreground_mode_reads_in_the_callers_thread():
    seen = []
    ra = ReadAhead(
        ((1, lambda i=i: seen.append(threading.current_thread()) or i) for i in range(3)), budget=10, background=False
    )
    assert list(ra) == [0, 1, 2]
    assert all(t is threading.main_thread() for t in seen)


def test_peek_shows_the_next_item_without_taking_it_and_never_waits():
    gate = threading.Event()

    def items():
        yield 1, lambda: "a"
        yield 1, lambda: "b"
        yield 1, lambda: gate.wait() and "c"

    ra = ReadAhead(items(), budget=10)
    it = iter(ra)
    assert next(it) == "a"
    deadline = time.monotonic() + 5
    while ra.peek() is None and time.monotonic() < deadline:  # "b" is read in the background
        time.sleep(0.001)
    assert ra.peek() == "b" and next(it) == "b"
    assert ra.peek() is None  # "c" is not read yet: peek does not wait for it
    gate.set()
    assert next(it) == "c" and ra.peek() is None
    assert list(it) == []
    assert ReadAhead(((1, lambda: "x"),), budget=1, background=False).peek() is None


def test_peek_with_a_match_looks_past_items_it_does_not_want():
    """The engine's next shape group, past the elementwise chunks read between groups: the first item already
    read that matches, never an item not yet read, nothing taken."""
    gate = threading.Event()

    def items():
        yield 1, lambda: ("chunk", 1)
        yield 1, lambda: ("chunk", 2)
        yield 1, lambda: ("group", 3)
        yield 1, lambda: gate.wait() and ("group", 4)

    ra = ReadAhead(items(), budget=10)
    it = iter(ra)
    assert next(it) == ("chunk", 1)
    is_group = lambda item: item[0] == "group"
    deadline = time.monotonic() + 5
    while ra.peek(is_group) is None and time.monotonic() < deadline:
        time.sleep(0.001)
    assert ra.peek(is_group) == ("group", 3) and ra.peek() == ("chunk", 2)  # nothing taken
    assert next(it) == ("chunk", 2) and next(it) == ("group", 3)
    assert ra.peek(is_group) is None  # ("group", 4) is not read yet
    gate.set()
    assert list(it) == [("group", 4)]


def test_an_item_is_let_go_before_the_next_is_read():
    """With a budget of one item, the next is read once the consumer asks for it; by then nothing of the read-ahead
    still holds the previous one (a 2.5 GB vocabulary pair must not stay alive beside the next)."""
    import weakref

    class Tensor:
        pass

    refs: list = []
    alive_at_read: list = []

    def make():
        alive_at_read.append([r() is not None for r in refs])
        t = Tensor()
        refs.append(weakref.ref(t))
        return t

    ra = ReadAhead(((10, make) for _ in range(3)), budget=10)
    for item in ra:
        del item  # the consumer lets go of each before asking for the next
    assert alive_at_read == [[], [False], [False, False]]
