"""Stop DataLoader workers that are still running when the interpreter exits.

The loader's workers ignore the job signals (SIGTERM, SIGINT, ...) so that a SLURM preemption,
which signals every process of the job, leaves them reading while the main process saves its
checkpoint (`pipeline.ignore_job_signals`).  The price: multiprocessing's own exit handler stops
daemon children with SIGTERM and then joins them, so a process that exits while a loader iterator
is still alive (an exception in a training script, a failed test holding the traceback) would wait
forever.  This handler, registered after multiprocessing's and so run before it, asks each live
iterator's workers to finish and kills any that do not.
"""

from __future__ import annotations

import atexit
import weakref

_live_iterators: weakref.WeakSet = weakref.WeakSet()


def track_workers(iterator) -> None:
    """Remember a DataLoader iterator that runs worker processes."""
    if getattr(iterator, "_workers", None):
        _live_iterators.add(iterator)


def stop_live_workers() -> None:
    for iterator in list(_live_iterators):
        try:
            iterator._shutdown_workers()  # done event + None on each index queue: workers exit cleanly
        except Exception:  # noqa: BLE001 - at exit, a half-torn-down iterator must not stop the others
            pass
        for worker in getattr(iterator, "_workers", []):
            if worker.is_alive():  # busy in a long read: SIGTERM is ignored, so kill
                worker.kill()
                worker.join(5)


atexit.register(stop_live_workers)
