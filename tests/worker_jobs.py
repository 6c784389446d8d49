"""Module-level job functions for tests/test_workers.py (a spawned worker imports them by name)."""
from __future__ import annotations

import os
import time
from pathlib import Path


def square(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


def sleep_or_fail(job: tuple[str, str]) -> str:
    """('fail', _) raises at once; ('sleep', folder) writes its pid to the folder and sleeps a minute."""
    kind, folder = job
    if kind == "fail":
        time.sleep(1.0)
        raise ValueError("job failed on purpose")
    (Path(folder) / str(os.getpid())).write_text("")
    time.sleep(60)
    return "slept"


def torch_threads(_: int) -> int:
    import torch

    return torch.get_num_threads()
