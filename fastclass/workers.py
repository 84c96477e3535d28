"""Worker processes for CPU-bound per-file work: hashing (`map_in_workers`) and decoding untrusted files
(`IsolatedPool`), shared by import, crawl, verify and check."""
from __future__ import annotations

import collections
import concurrent.futures as cf
import ctypes
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

from fastclass.errors import FastclassError, first_line

T = TypeVar("T")
R = TypeVar("R")

CRASH_HOOK_ENV = "FASTCLASS_TEST_CRASH_ON"
"""Tests only: a worker whose task key contains this text exits at once, as a crashing decoder would."""
HANG_HOOK_ENV = "FASTCLASS_TEST_HANG_ON"
"""Tests only: a worker whose task key contains this text never returns, as a hanging decoder would."""


def _worker_init() -> None:
    # Only the parent handles Ctrl-C; a worker must also die when its parent is killed (no orphan writers).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A parent running an asyncio loop (`fastclass worker`) has its SIGTERM handled through a wakeup fd that
    # a forked worker inherits: the SIGTERM that stops this worker would otherwise reach the parent's loop
    # as its own and stop it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:  # not the main thread of the interpreter: no wakeup fd was inherited here
        pass
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool whose workers ignore Ctrl-C and die with their parent."""
    return ProcessPoolExecutor(max_workers=workers, initializer=_worker_init)


def map_in_workers(fn: Callable[[T], R], tasks: Sequence[T], workers: int, chunksize: int = 8) -> Iterator[R]:
    """fn over tasks, in order; in a process pool when it pays (several workers, more than a handful of tasks).
    For trusted work only (hashing bytes); anything that decodes untrusted files runs in an IsolatedPool."""
    if workers <= 1 or len(tasks) < 8:
        yield from map(fn, tasks)
        return
    pool = worker_pool(workers)
    try:
        yield from pool.map(fn, tasks, chunksize=chunksize)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class Budget:
    """What decoding one file may take before it is rejected instead."""

    seconds: float = 30.0
    memory_mb: int = 2048
    """Memory a worker may allocate beyond what it holds when it starts."""


def _data_bytes() -> int:
    """This process's data segment (what RLIMIT_DATA counts), from /proc; 0 where there is none."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


_MEMORY_BUDGET: list[int] = []


def memory_budget() -> int | None:
    """Bytes one task may allocate in this isolated worker (None outside one). A decoder checks what an
    image will need against it before decoding: the RLIMIT_DATA budget below is only a backstop, since a
    worker forked from a big parent inherits its free heap, which allocations reuse unseen."""
    return _MEMORY_BUDGET[0] if _MEMORY_BUDGET else None


def _isolated_init(memory_mb: int) -> None:
    _worker_init()
    _MEMORY_BUDGET[:] = [memory_mb * 1024 * 1024]
    # C libraries (libtiff, libjpeg) write their complaints straight to fd 2: keep them off the terminal.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        import resource

        limit = _data_bytes() + memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.getrlimit(resource.RLIMIT_DATA)[1]))
    except (ImportError, ValueError, OSError):
        pass  # no memory budget where the platform has no RLIMIT_DATA; the time budget still holds


def _run(fn: Callable[[T], R], task: T, key: str) -> R:
    crash, hang = os.environ.get(CRASH_HOOK_ENV), os.environ.get(HANG_HOOK_ENV)
    if crash and crash in key:
        os._exit(70)
    if hang and hang in key:
        while True:
            time.sleep(60)
    return fn(task)


class IsolatedPool:
    """Worker processes in which each task (one untrusted file) runs alone under a time and memory budget.

    A task that raises, runs past its time, exhausts its memory or kills its worker (a segfault in a C
    decoder, the kernel's OOM killer) fails alone, with a reason; the worker is replaced and the batch
    goes on. Built on pebble, which kills and replaces a worker per task timeout or crash.
    """

    def __init__(self, workers: int, budget: Budget = Budget()) -> None:
        import pebble

        self.workers = max(1, workers)
        self.budget = budget
        self.pool = pebble.ProcessPool(max_workers=self.workers, initializer=_isolated_init,
                                       initargs=(budget.memory_mb,))

    def submit(self, fn: Callable[[T], R], task: T, key: str) -> cf.Future:
        """Run fn(task) in a worker; key names the task (its file or URL) for the crash hook."""
        return self.pool.schedule(_run, (fn, task, key), timeout=self.budget.seconds)

    def outcome(self, future: cf.Future) -> tuple[object, str | None]:
        """(result, None), or (None, why the task failed) for a task that did not return."""
        import pebble

        try:
            return future.result(), None
        except cf.TimeoutError:
            return None, f"decoding took longer than {self.budget.seconds:g} s (the per-file limit)"
        except pebble.ProcessExpired as exc:
            return None, crash_reason(exc.exitcode)
        except MemoryError:
            return None, f"decoding needs more than {self.budget.memory_mb} MB (the per-file limit)"
        except (cf.CancelledError, FastclassError):
            raise  # not the file's fault (the run stops, the store cannot be written): the batch stops
        except Exception as exc:  # a bug in a decoder: reported for this file, the batch goes on
            return None, f"cannot decode ({type(exc).__name__}: {first_line(exc)[:120]})"

    def map(self, fn: Callable[[T], R], tasks: Iterable[T], key: Callable[[T], str],
            failed: Callable[[T, str], R]) -> Iterator[R]:
        """fn over tasks in order; a task that fails gives failed(task, reason) instead."""
        window: collections.deque = collections.deque()
        for task in tasks:
            window.append((task, self.submit(fn, task, key(task))))
            if len(window) >= self.workers * 16:
                yield self._take(window.popleft(), failed)
        while window:
            yield self._take(window.popleft(), failed)

    def _take(self, item: tuple, failed: Callable) -> R:
        task, future = item
        result, reason = self.outcome(future)
        return failed(task, reason) if reason is not None else result

    def close(self) -> None:
        """Stop every worker now (tasks still queued are dropped)."""
        self.pool.stop()
        self.pool.join()

    def __enter__(self) -> "IsolatedPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def crash_reason(exitcode: int | None) -> str:
    """Why a decoding worker died, from its exit code."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        if name == "SIGKILL":
            return "the decoder was killed (SIGKILL: out of memory?)"
        return f"the decoder crashed ({name})"
    return f"the decoder crashed (exit code {exitcode})"
