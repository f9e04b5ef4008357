"""The frozen teachers of micro-step ``i + 1`` run on a side CUDA stream while micro-step ``i``'s student runs.

A distillation step is teachers -> targets -> student forward + backward -> optimizer, each phase waiting for
the one before. The teachers of the *next* batch depend on nothing of this step (frozen weights, no RNG, the
normalisers are applied later, in ``TargetMaker.targets``), so they can be queued on a second stream before
the student's kernels: the GPU then fills the student's memory-bound and attention kernels' idle units with
teacher work, and the other way round.

Exactness: the teachers' raw outputs are the same tensors in the same order as without lookahead, and every
later step (normaliser moments, refits, targets, losses) runs on the main stream in the same order, so the
loss sequence is unchanged; checkpoints still save the stream position of the last batch *consumed*
(``StepBatch.stream_state``), which the lookahead does not touch. Off CUDA the lookahead keeps its order (one
batch ahead, which the CPU tests check) without a second stream; disabled, the teachers run when their batch
is asked for.

Memory: one more batch's teacher outputs are alive, and the teachers' activations overlap the student's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mmfm.radio.distill import TargetMaker
    from mmfm.radio.step_batches import StepBatch

__all__ = ["TeacherLookahead"]

RawOutputs = dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]


class TeacherLookahead:
    """Iterator of ``(StepBatch, raw teacher outputs)`` over ``batches`` (module docstring).

    Args:
        batches: the micro-step batches, in order (``StepBatches``).
        maker: runs the teachers (``TargetMaker.teacher_outputs``).
        device: where the teachers run; the lookahead needs a CUDA device.
        enabled: run one batch ahead on a side stream (``RadioTrainConfig.overlap_teachers``).
    """

    def __init__(self, batches: Iterator[StepBatch], maker: TargetMaker, device: torch.device | str,
                 enabled: bool = True) -> None:
        self.batches = batches
        self.maker = maker
        self.enabled = enabled
        device = torch.device(device)
        # off CUDA the order is kept (one batch ahead) but there is no second stream to overlap on
        self.side = torch.cuda.Stream(device) if enabled and device.type == "cuda" else None
        self.device = device
        self._ahead: tuple[StepBatch, RawOutputs] | None = None

    def __iter__(self) -> TeacherLookahead:
        return self

    def _launch(self) -> tuple[StepBatch, RawOutputs] | None:
        batch = next(self.batches, None)
        if batch is None:
            return None
        with torch.cuda.stream(self.side):  # side None (disabled, or off CUDA): a no-op
            return batch, self.maker.teacher_outputs(batch.plan, batch.units)

    def __next__(self) -> tuple[StepBatch, RawOutputs]:
        current = self._ahead if self._ahead is not None else self._launch()
        if current is None:
            raise StopIteration
        if self.side is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(self.side)  # this batch's teacher outputs are complete before the main stream reads
            for out in current[1].values():
                for t in out:
                    if t is not None and t.is_cuda:
                        t.record_stream(main)  # allocated on the side stream, read (and freed) on the main one
        # queued before the caller queues this batch's student work, so the two overlap on the GPU
        self._ahead = self._launch() if self.enabled else None
        return current
