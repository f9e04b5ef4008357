"""Training metrics: TensorBoard + a jsonl file + a tqdm bar, written by the main process only.

``MetricLogger.log(step, loss=..., lr=...)`` appends one JSON line ``{"step": s, "loss": ..., ...}``,
adds every scalar to TensorBoard under its name, and shows the latest values on the progress bar.
When a run resumes from step ``k``, ``MetricLogger(..., start_step=k)`` drops the jsonl lines with
``step >= k`` written after that checkpoint, so the file holds one line per step as if never interrupted.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mmfm.distributed import is_main_process

__all__ = ["MetricLogger", "plot_loss_curves", "read_jsonl"]


def _scalar(name: str, value: Any) -> float | int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"MetricLogger: metric {name!r} must be a scalar, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"MetricLogger: metric {name!r} must be a number, got {type(value).__name__}")
    return value


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a jsonl metrics file (a torn last line from a crash is ignored)."""
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class MetricLogger:
    """Scalars to TensorBoard (``out_dir/tb``), ``out_dir/<jsonl_name>`` and a tqdm bar.

    Args:
        out_dir: run directory.
        total_steps: length of the progress bar (None: no bar total).
        start_step: first step this process will log (a resume point; see module doc).
        tensorboard / progress: switch the writer / the bar off.
        jsonl_name: file name of the jsonl log.
    Non-main ranks do nothing, so every rank may call ``log``.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        total_steps: int | None = None,
        start_step: int = 0,
        tensorboard: bool = True,
        progress: bool = True,
        jsonl_name: str = "metrics.jsonl",
        desc: str = "train",
    ) -> None:
        self.enabled = is_main_process()
        self.out_dir = Path(out_dir)
        self.jsonl_path = self.out_dir / jsonl_name
        self.latest: dict[str, float | int] = {}
        self._writer = None
        self._bar = None
        self._file = None
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.jsonl_path.exists():
            kept = [r for r in read_jsonl(self.jsonl_path) if int(r.get("step", -1)) < start_step]
            tmp = self.jsonl_path.with_name(f".{jsonl_name}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.jsonl_path)
        self._file = open(self.jsonl_path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.out_dir / "tb"), purge_step=start_step or None)
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True)

    def log(self, step: int, **metrics: Any) -> None:
        """Record scalars (tensors with one element or numbers) for ``step``."""
        values = {k: _scalar(k, v) for k, v in metrics.items()}
        self.latest.update(values)
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": int(step), **values}) + "\n")
        self._file.flush()
        if self._writer is not None:
            for k, v in values.items():
                self._writer.add_scalar(k, v, global_step=int(step))
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in self.latest.items()}, refresh=False)

    def advance(self, n: int = 1) -> None:
        """Move the progress bar by ``n`` steps."""
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plot_loss_curves(
    jsonl: str | Path | Sequence[str | Path],
    out_png: str | Path,
    keys: Sequence[str] = ("loss",),
    *,
    logy: bool = False,
    title: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> Path:
    """Plot ``keys`` against ``step`` from one or more jsonl logs into ``out_png`` (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [jsonl] if isinstance(jsonl, (str, Path)) else list(jsonl)
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = 0
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"plot_loss_curves: metrics file not found: {path}")
        records = read_jsonl(path)
        for key in keys:
            pts = [
                (r["step"], r[key])
                for r in records
                if key in r and isinstance(r[key], (int, float)) and math.isfinite(r[key])
            ]
            if not pts:
                continue
            label = (labels or {}).get(str(path), path.parent.name if len(paths) > 1 else "")
            ax.plot(*zip(*pts), label=f"{label} {key}".strip())
            drawn += 1
    if drawn == 0:
        plt.close(fig)
        raise ValueError(f"plot_loss_curves: none of the keys {list(keys)} found in {[str(p) for p in paths]}")
    ax.set_xlabel("step")
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
