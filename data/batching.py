"""Endless, resumable batches over a resumable sample stream (for trainers).

Wraps a dataset from :func:`mmfm.data.shards.read_shards` (anything with ``set_epoch(e)``,
``state_dict()`` and ``load_state_dict()``): yields lists of ``batch_size`` samples across epoch
boundaries, and its own ``state_dict()`` (epoch + the dataset's position) lets a restarted job continue
with exactly the next batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


class EpochBatcher:
    """``next(batcher) -> list of batch_size samples``; epochs advance automatically.

    A batch never mixes epochs: the tail of an epoch that cannot fill a batch is dropped
    (``drop_last``), so every batch has the same size.
    """

    def __init__(self, dataset, batch_size: int, max_empty_epochs: int = 2) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.epoch = 0
        self.max_empty_epochs = max_empty_epochs
        self._it: Iterator | None = None

    def __iter__(self) -> EpochBatcher:
        return self

    def _start_epoch(self) -> None:
        if self.dataset.epoch != self.epoch:
            self.dataset.set_epoch(self.epoch)
        self._it = iter(self.dataset)

    def __next__(self) -> list:
        empty = 0
        while True:
            if self._it is None:
                self._start_epoch()
            batch = []
            for sample in self._it:
                batch.append(sample)
                if len(batch) == self.batch_size:
                    return batch
            # epoch exhausted: drop the partial tail and start the next epoch from its beginning
            empty += 1  # an epoch (or its rest) ended without filling a batch
            if empty >= self.max_empty_epochs:
                raise RuntimeError(f"the data stream yielded no full batch of {self.batch_size} in "
                                   f"{empty} epochs: too few samples (or every sample was skipped as corrupt)")
            self.epoch += 1  # set_epoch() in _start_epoch resets the dataset's position
            self._it = None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "dataset": self.dataset.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.dataset.load_state_dict(state["dataset"])
        self._it = None
