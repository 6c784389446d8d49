"""What one training step costs in memory, named for what was counted.

- ``autograd_saved_bytes`` (any device, deterministic): the bytes of the distinct tensor storages that
  autograd saves for backward during the step's forward part (the loss, including the graph-recording
  derivative passes inside score-matching losses), counted with saved-tensor hooks and read when the
  loss is computed, just before ``backward`` — the moment the most is held. Parameters are not counted:
  they are alive anyway. This is the activation memory that grows with depth × derivative order.
- ``cuda_peak_bytes`` (CUDA): ``torch.cuda.max_memory_allocated`` over the step, peak statistics reset
  right before it, minus what was allocated when the step began.
- ``process_peak_rss_bytes`` (CPU): the process's peak resident set size since it started
  (``getrusage``); an upper bound that cannot be reset per step.

``peak_bytes``/``memory_kind`` pick the headline figure: CUDA peak on CUDA, else the saved bytes.
"""
from __future__ import annotations

import resource
import sys
import time
import weakref
from dataclasses import asdict, dataclass
from typing import Callable

import torch

Tensor = torch.Tensor


@dataclass
class StepMemory:
    autograd_saved_bytes: int
    process_peak_rss_bytes: int
    cuda_peak_bytes: int | None
    step_seconds: float

    @property
    def memory_kind(self) -> str:
        return "cuda_max_memory_allocated" if self.cuda_peak_bytes is not None else "autograd_saved_bytes"

    @property
    def peak_bytes(self) -> int:
        return self.cuda_peak_bytes if self.cuda_peak_bytes is not None else self.autograd_saved_bytes

    def as_dict(self) -> dict[str, float | int | str | None]:
        return {**asdict(self), "memory_kind": self.memory_kind, "peak_bytes": self.peak_bytes}


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


class SavedTensorCounter:
    """Context manager counting the distinct storages saved for backward that are still held when
    :attr:`bytes` is read (parameters excluded).

    Tensors are tracked through weak references: a graph built and freed inside the step (e.g. the
    temporary graphs of an implicit adjoint solve) does not count, only what autograd still keeps.
    """

    def __init__(self, exclude: list[Tensor] | None = None) -> None:
        self._exclude = {self._key(t) for t in (exclude or [])}
        self._saved: list[tuple[weakref.ref, tuple, int]] = []

    @staticmethod
    def _key(t: Tensor) -> tuple:
        return (t.device.type, t.device.index, t.untyped_storage().data_ptr())

    def _pack(self, t: Tensor) -> Tensor:
        # Hand autograd a detached alias: returning ``t`` itself would make a saved output reference its
        # own grad_fn, a cycle the garbage collector cannot free (autograd restores the metadata itself).
        packed = t.detach()
        if t.layout == torch.strided and not t.is_meta:
            key = self._key(t)
            if key not in self._exclude:
                self._saved.append((weakref.ref(packed), key, t.untyped_storage().nbytes()))
        return packed

    @staticmethod
    def _unpack(t: Tensor) -> Tensor:
        return t

    @property
    def bytes(self) -> int:
        alive = {key: nbytes for ref, key, nbytes in self._saved if ref() is not None}
        return sum(alive.values())

    def __enter__(self) -> "SavedTensorCounter":
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)


def measure_step(
    loss_closure: Callable[[], Tensor],
    parameters: list[Tensor],
    device: torch.device | str = "cpu",
    backward: Callable[[Tensor], None] | None = None,
) -> tuple[Tensor, StepMemory]:
    """Run one step: ``loss = loss_closure()`` then ``loss.backward()`` (or ``backward(loss)``), measuring it.

    The optimiser update is left to the caller (it does not change peak activation memory).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    with SavedTensorCounter(exclude=list(parameters)) as counter:
        loss = loss_closure()
        saved = counter.bytes
    (backward or (lambda l: l.backward()))(loss)
    cuda_peak = None
    if cuda:
        torch.cuda.synchronize(device)
        cuda_peak = int(torch.cuda.max_memory_allocated(device) - base)
    elapsed = time.perf_counter() - start
    return loss.detach(), StepMemory(saved, peak_rss_bytes(), cuda_peak, elapsed)
