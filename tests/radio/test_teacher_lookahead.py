"""mmfm.radio.teacher_lookahead: the teachers run one batch ahead, the (batch, outputs) pairs and the training
losses stay those of the sequential loop."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mmfm.radio.teacher_lookahead import TeacherLookahead


class _RecordingMaker:
    """Stands in for TargetMaker: 'teacher outputs' are a function of the units; records the call order."""

    def __init__(self, log: list) -> None:
        self.log = log

    def teacher_outputs(self, plan, units):
        self.log.append(("teachers", plan))
        return {"t": (units.sum(dim=(1, 2, 3)), units * 2)}


def _batches(n: int, log: list, device: str):
    for i in range(n):
        log.append(("batch", i))
        yield SimpleNamespace(index=i, plan=i, units=torch.full((2, 3, 4, 4), float(i), device=device))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_lookahead_runs_one_batch_ahead_with_the_same_pairs(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    n = 4
    seq_log, ahead_log = [], []
    seq = list(TeacherLookahead(_batches(n, seq_log, device), _RecordingMaker(seq_log), device, enabled=False))
    ahead = []
    for batch, raw in TeacherLookahead(_batches(n, ahead_log, device), _RecordingMaker(ahead_log), device, enabled=True):
        ahead_log.append(("consumed", batch.index))
        ahead.append((batch, raw))
    assert [b.index for b, _ in seq] == [b.index for b, _ in ahead] == list(range(n))
    for (_, r1), (_, r2) in zip(seq, ahead):
        for x, y in zip(r1["t"], r2["t"]):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    # batch i + 1's teachers are queued before batch i is handed out (so its student work queues after them)
    consumed = [i for i, e in enumerate(ahead_log) if e[0] == "consumed"]
    launched = [i for i, e in enumerate(ahead_log) if e[0] == "teachers"]
    assert len(launched) == n
    for i in range(n - 1):
        assert launched[i + 1] < consumed[i]
