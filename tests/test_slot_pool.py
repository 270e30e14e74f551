"""SlotPool: a worker takes slots while the main process frees others, across processes."""

from __future__ import annotations

import multiprocessing as mp
import time

from flexitrain.data.batching import SlotPool


def _free_and_take_back(free, stop):
    """The main process's role: slots 1.. are freed and (here) taken again as fast as possible."""
    flags = free.numpy()
    while not stop.is_set():
        flags[0, 1:] = 1
        flags[0, 1:] = 0


def test_acquire_while_another_process_frees_slots():
    # numpy's nonzero raises "number of non-zero array elements changed" if the flags change while
    # it scans them; this failed a CI run (a worker's acquire against the main process's release).
    pool = SlotPool(workers=1, slots=64, capacity=4)
    ctx = mp.get_context("fork")
    stop = ctx.Event()
    other = ctx.Process(target=_free_and_take_back, args=(pool.free, stop), daemon=True)
    other.start()
    try:
        calls, end = 0, time.monotonic() + 1.0
        while time.monotonic() < end:
            pool.free[0, 0] = 1  # slot 0 belongs to this test: always free when acquire runs
            got = pool.acquire(0, 4)
            assert got is not None and got[1].shape == (4,)
            calls += 1
    finally:
        stop.set()
        other.join(5)
    assert calls > 1000


def test_slots_are_taken_in_turn_and_released():
    pool = SlotPool(workers=2, slots=2, capacity=8)
    a, b = pool.acquire(1, 8), pool.acquire(1, 3)
    assert (a[0], b[0]) == (0, 1) and pool.acquire(1, 1) is None  # both slots of worker 1 in use
    assert pool.acquire(1, 9) is None and pool.acquire(5, 1) is None  # too large; no such worker
    b[1][:] = [1.0, 2.0, 3.0]
    batch = {"_slot": [1, 1, 1, 3]}
    pool.release(batch)
    assert batch["audio"].tolist() == [[[1.0, 2.0, 3.0]]] and pool.acquire(1, 1)[0] == 1
