"""Jobs of a stage (one variant and seed each) run side by side in spawned worker processes.

Each job is plain data and its function a module-level one, so both cross to a worker; results come back to
the stage's own process, which alone writes the MLflow store and the stage's files. One worker runs the jobs
in the stage's process (their own progress bars show); more show one bar over the jobs.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Any, Callable, Iterator, TypeVar

J = TypeVar("J")


def worker_count(workers: int | None, threads: int | None, jobs: int) -> int:
    """``workers``, or as many as the CPUs this process may use hold ``threads`` each; at most ``jobs``."""
    if workers is not None:
        return max(1, min(workers, jobs))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus // (threads or 1), jobs))


@functools.lru_cache(maxsize=2)
def cached_splits(data_root: str, dataset: str) -> dict:
    """A prepared dataset's splits, read once per process (a worker runs several jobs on the same data)."""
    from deqsm.data import load_splits

    return load_splits(data_root, dataset)


@functools.lru_cache(maxsize=2)
def cached_floor(data_root: str, dataset: str) -> tuple[float, float] | None:
    """A generated dataset's score-matching floor (:func:`deqsm.floor.data_floor`), None for real data; computed
    once per process."""
    from deqsm.data import true_density
    from deqsm.floor import data_floor

    return data_floor(true_density(data_root, dataset), cached_splits(data_root, dataset)["train"])


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _warm_up() -> int:
    """A worker's first task: import what every job needs (torch, the models), so the first real job does not."""
    importlib.import_module("deqsm.experiments")

    return os.getpid()


_STARTED: dict[tuple[int, int | None], Any] = {}  # (workers, threads) → the pool start_workers started


def start_workers(workers: int, threads: int | None = None) -> None:
    """Start ``workers`` worker processes now, each importing torch and the models, for the stage's later
    :func:`run_jobs` with the same ``workers`` and ``threads``: spawning and importing (seconds per process)
    then overlaps the stage's own setup (MLflow runs, reading its inputs) instead of following it. Nothing
    is started for one worker (run_jobs runs the jobs in this process)."""
    if workers <= 1 or (workers, threads) in _STARTED:
        return
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_set_threads,
                               initargs=(threads,))
    for _ in range(workers):  # a pool spawns a process per submitted task while it has fewer than max_workers
        pool.submit(_warm_up)
    _STARTED[workers, threads] = pool


def run_jobs(fn: Callable[[J], Any], jobs: list[J], workers: int, progress: bool, desc: str,
             threads: int | None = None) -> Iterator[tuple[J, Any]]:
    """``(job, fn(job))`` as the jobs finish: in this process for one worker, else in ``workers`` spawned
    processes, each with ``threads`` torch threads (base.threads; this process has them set already). A failed
    job stops the others (the pending ones are cancelled) and its error is raised here."""
    if workers <= 1:
        for job in jobs:
            yield job, fn(job)
        return
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from multiprocessing import get_context

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc=f"{desc} ({workers} processes)", unit="job", dynamic_ncols=True, leave=False)
    pool = _STARTED.pop((workers, threads), None) or ProcessPoolExecutor(
        max_workers=workers, mp_context=get_context("spawn"), initializer=_set_threads, initargs=(threads,))
    for other in _STARTED.values():  # started for another worker count: not used
        other.shutdown(wait=False, cancel_futures=True)
    _STARTED.clear()
    try:
        pending = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=pending.get):
                job = jobs[pending.pop(future)]
                try:
                    result = future.result()
                except BaseException:
                    print(f"{desc}: {job} failed", flush=True)
                    raise
                if bar is not None:
                    bar.update(1)
                yield job, result
    except BaseException:  # a failed job, Ctrl-C or SIGTERM: end the workers now, not after their running jobs
        for proc in list(getattr(pool, "_processes", {}).values()):  # (3.14 has pool.terminate_workers())
            proc.terminate()
        raise
    finally:
        if bar is not None:
            bar.close()
        pool.shutdown(wait=True, cancel_futures=True)
