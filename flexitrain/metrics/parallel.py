"""A process pool for the expensive CPU metrics (PESQ, STOI, mel distance).

PESQ and STOI are single-threaded C/numpy code, so processes give a near-linear speed-up.
Workers are started with ``forkserver`` by default: a fresh single-threaded server process
imports the metric modules once and forks the workers, which is safe inside a multi-threaded
parent (torch/OpenMP/gloo threads of a Lightning run), unlike plain ``fork``. As with ``spawn``,
the parent's ``__main__`` must be importable and guarded by ``if __name__ == "__main__":``
(scripts and pytest are; stdin/REPL code is not) and ``fn`` must live in an importable module.
Workers are pinned to one torch/BLAS thread each so they do not oversubscribe the cores.
The pool is persistent: create it once (per rank) and reuse it.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
from functools import partial
from typing import Any, Callable, Iterable, Sequence

from .quality import QUALITY_METRICS, compute_quality

__all__ = ["MetricPool", "parallel_map", "compute_quality_batch", "default_num_workers"]

_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")


def default_num_workers() -> int:
    """Cores available to this process (respects CPU affinity / cgroup pinning where visible)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


class MetricPool:
    """Order-preserving ``map`` over worker processes; ``num_workers <= 1`` runs serially in-process.

    >>> with MetricPool(2) as pool:
    ...     rows = pool.map(partial(compute_quality, sample_rate=16000), refs, degs)
    """

    def __init__(self, num_workers: int | None = None, mp_context: str = "forkserver") -> None:
        self.num_workers = default_num_workers() if num_workers is None else int(num_workers)
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self._mp_context = mp_context
        self._executor: cf.ProcessPoolExecutor | None = None

    def _pool(self) -> cf.ProcessPoolExecutor:
        if self._executor is None:
            # Child processes inherit the environment at spawn time: one BLAS/OpenMP thread each.
            saved = {k: os.environ.get(k) for k in _THREAD_ENV}
            os.environ.update({k: "1" for k in _THREAD_ENV})
            try:
                ctx = mp.get_context(self._mp_context)
                if self._mp_context == "forkserver":
                    ctx.set_forkserver_preload(["flexitrain.metrics.quality"])
                self._executor = cf.ProcessPoolExecutor(self.num_workers, ctx, initializer=_init_worker)
                # Start the workers now, while the environment is patched.
                list(self._executor.map(int, range(self.num_workers)))
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        return self._executor

    def map(self, fn: Callable[..., Any], *iterables: Iterable, chunksize: int = 1) -> list:
        """``[fn(*args) for args in zip(*iterables)]``; ``fn`` must be picklable (module level / partial)."""
        if self.num_workers <= 1:
            return [fn(*args) for args in zip(*iterables)]
        return list(self._pool().map(fn, *iterables, chunksize=chunksize))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> "MetricPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; prefer close() / the context manager
        try:
            self.close()
        except Exception:
            pass


def parallel_map(fn: Callable[..., Any], *iterables: Iterable, num_workers: int | None = None,
                 chunksize: int = 1) -> list:
    """One-shot :meth:`MetricPool.map` (starts and stops a pool; reuse a MetricPool in loops)."""
    with MetricPool(num_workers) as pool:
        return pool.map(fn, *iterables, chunksize=chunksize)


def compute_quality_batch(references: Sequence, degraded: Sequence, sample_rate: int,
                          metrics: Sequence[str] = QUALITY_METRICS, pool: MetricPool | None = None,
                          num_workers: int | None = None) -> list[dict[str, float]]:
    """:func:`compute_quality` for each pair, in parallel; returns one dict per pair, in order.

    Tensors are converted to numpy first (cheaper to pickle, no torch shared-memory handles).
    """
    if len(references) != len(degraded):
        raise ValueError(f"got {len(references)} references but {len(degraded)} degraded waveforms")
    import numpy as np
    import torch

    def as_np(x):
        return x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

    refs, degs = [as_np(r) for r in references], [as_np(d) for d in degraded]
    fn = partial(compute_quality, sample_rate=sample_rate, metrics=tuple(metrics))
    if pool is not None:
        return pool.map(fn, refs, degs)
    return parallel_map(fn, refs, degs, num_workers=num_workers)
