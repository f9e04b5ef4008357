"""Each distillation micro-step's input batch, built ahead of time on a background thread.

The trainer's batch for micro-step ``i`` is a pure function of the config and the data stream's position:
``plan_step(cfg, i)`` picks the partition, resolution and mosaic; ``samples_needed`` samples are taken from the
stream and cropped / resized / tiled by ``build_batch``. Built on the main thread, that CPU work (image resizes
and float conversion of 64 images at 432 px: hundreds of ms on one core) runs while the GPU waits. Here one
producer thread builds batches ``prefetch`` steps ahead, with ``workers`` threads resizing the images of a batch
in parallel (PIL and torch release the GIL), while the main thread runs the GPU step.

Exactness: the producer is the only reader of the stream once started, takes the micro-steps in order and
records, with each batch, a copy of the stream position right after that batch's samples and the skipped-sample
count. A checkpoint saves the position of the last batch the trainer consumed, not the stream's current
(prefetched) one, so ``--resume`` continues with exactly the next batch. ``prefetch=0`` builds each batch in the
calling thread when it is asked for (the behaviour before this module). The batches are identical either way.
"""

from __future__ import annotations

import copy
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from mmfm.radio.distill import RadioTrainConfig, SampleStream, StepPlan

__all__ = ["StepBatch", "StepBatches"]


@dataclass
class StepBatch:
    """One micro-step's inputs: ``student`` (B, 3, R, R) and ``units`` (B*k*k, 3, T, T) images in [0, 1] (the
    same tensor without mosaic), with the stream position after its samples and the skipped-sample count."""

    index: int
    plan: StepPlan
    student: torch.Tensor
    units: torch.Tensor
    stream_state: dict[str, Any]
    skipped: int


class StepBatches:
    """Iterator over the ``StepBatch`` of micro-steps ``start, start + 1, ..., end - 1`` (module docstring).

    Args:
        cfg: the run's config (plans, batch sizes, student patch).
        stream: the sample stream, already at micro-step ``start``'s position; owned by this object until
            ``close()``.
        prefetch: batches built ahead on a background thread (0: built on demand in the calling thread).
        workers: threads resizing one batch's images (1: one after another).
        pin_memory: page-lock the batches (faster, asynchronous host-to-GPU copies).
    """

    def __init__(self, cfg: RadioTrainConfig, stream: SampleStream, start: int, end: int, prefetch: int = 2,
                 workers: int = 4, pin_memory: bool = False) -> None:
        if prefetch < 0 or workers < 1:
            raise ValueError(f"StepBatches: need prefetch >= 0 and workers >= 1, got {prefetch}, {workers}")
        self.cfg, self.stream = cfg, stream
        self.next_index, self.end = start, end
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="radio-batch") if workers > 1 else None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if prefetch > 0:
            self._queue = queue.Queue(maxsize=prefetch)
            self._thread = threading.Thread(target=self._produce, args=(start,), name="radio-batches", daemon=True)
            self._thread.start()

    def build(self, index: int) -> StepBatch:
        """Take micro-step ``index``'s samples from the stream and build its batch (in the calling thread)."""
        from mmfm.radio.distill import build_batch, plan_step, samples_needed

        plan = plan_step(self.cfg, index)
        samples = self.stream.take(samples_needed(self.cfg, plan))
        state, skipped = copy.deepcopy(self.stream.state_dict()), self.stream.skipped
        student, units = build_batch(samples, plan, self.cfg.student.patch_size, self.pool)
        if self.pin_memory:
            pinned = student.pin_memory()
            units = pinned if units is student else units.pin_memory()
            student = pinned
        return StepBatch(index, plan, student, units, state, skipped)

    def _produce(self, start: int) -> None:
        try:
            for index in range(start, self.end):
                if not self._put(self.build(index)):
                    return
        except BaseException as err:  # handed to the trainer, which re-raises it on its thread
            self._put(err)

    def _put(self, item: StepBatch | BaseException) -> bool:
        """Queue ``item``, waiting for room unless ``close()`` was called; returns whether it was queued."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> StepBatches:
        return self

    def __next__(self) -> StepBatch:
        if self.next_index >= self.end:
            raise StopIteration
        if self._queue is None:
            item = self.build(self.next_index)
        else:
            item = self._queue.get()
            if isinstance(item, BaseException):
                self.close()
                raise RuntimeError(f"building the batch of micro-step {self.next_index} failed: {item}") from item
        self.next_index += 1
        return item

    def close(self) -> None:
        """Stop the producer thread and the resize threads (batches built ahead are dropped)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def __enter__(self) -> StepBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
