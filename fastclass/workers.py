"""Worker processes for CPU-bound per-file work (hashing, decoding), shared by import and verify."""
from __future__ import annotations

import ctypes
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def _worker_init() -> None:
    # Only the parent handles Ctrl-C; a worker must also die when its parent is killed (no orphan writers).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool whose workers ignore Ctrl-C and die with their parent."""
    return ProcessPoolExecutor(max_workers=workers, initializer=_worker_init)


def map_in_workers(fn: Callable[[T], R], tasks: Sequence[T], workers: int, chunksize: int = 8) -> Iterator[R]:
    """fn over tasks, in order; in a process pool when it pays (several workers, more than a handful of tasks)."""
    if workers <= 1 or len(tasks) < 8:
        yield from map(fn, tasks)
        return
    pool = worker_pool(workers)
    try:
        yield from pool.map(fn, tasks, chunksize=chunksize)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
