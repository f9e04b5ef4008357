"""Evaluation of a distilled RADIO student: teacher fidelity, kNN classification, mode switching.

- **Fidelity** (``evaluate_fidelity``), per resolution ``R`` and teacher, on held-out images center-cropped to
  ``R x R``: the teacher sees each image at its native size (the trainer's rule,
  ``mmfm.radio.distill.teacher_input_size``); its feature map is interpolated (bilinear) to the student
  adaptor's grid, as in RADIO's mode-switching evaluation. Reported, in the teacher's own feature space:

  - ``summary_cos``: mean cosine similarity of adaptor summary and teacher summary; ``summary_cos_centered``
    the same after subtracting the teacher's mean summary over the evaluation set from both;
  - ``feature_cos``: mean per-token cosine similarity of the feature maps;
  - ``feature_cos_centered``: the same after subtracting the teacher's per-channel mean over the evaluation
    set from both maps (a large shared mean otherwise makes even an untrained predictor look similar);
  - ``fidelity = Var(teacher) / MSE(student, teacher)`` (per-channel variance over all tokens, averaged over
    channels; MSE averaged over all elements); ``cos_error = 1 - feature_cos``.
- **kNN classification** (``knn_accuracy``): cosine similarity between L2-normalised backbone summaries of a
  labelled bank and the queries, top-``k`` neighbours vote with weight ``exp(sim / T)``, ``T = 0.07``.
- **Mode switching** (``mode_switching``): for every resolution, the mean cosine similarity between the
  student's summary (backbone and each adaptor's) at that resolution and at a reference resolution (the
  largest). A student without mode switching gives values near 1 at every resolution.

``mmfm radio eval`` (``mmfm.radio.train_cli``) runs all three on a trained run (``--run OUT``: its
``config.yaml`` rebuilds the same teachers, ``OUT/model`` is the student) and prints tables.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "evaluate_fidelity",
    "format_fidelity",
    "knn_accuracy",
    "knn_predict",
    "load_samples",
    "mode_switching",
]

Predictor = Callable[[torch.Tensor], Mapping[str, tuple[torch.Tensor | None, torch.Tensor | None]]]


def load_samples(shards: str, n: int, labelled: bool = False) -> list[Any]:
    """The first ``n`` samples of ``shards`` in file order (``ImageSample``s; with ``labelled`` only those
    with a label). The same list on every process."""
    from mmfm.data.shards import read_shards

    if n < 1:
        raise ValueError(f"number of evaluation images must be >= 1, got {n}")
    out = []
    for s in read_shards(shards, schema="image", shuffle_buffer=0, rank=0, world_size=1):
        if labelled and getattr(s, "label", None) is None:
            continue
        out.append(s)
        if len(out) == n:
            break
    if not out:
        raise ValueError(f"no {'labelled ' if labelled else ''}image samples in {shards}")
    return out


def _images(samples: Sequence[Any], res: int, patch: int) -> torch.Tensor:
    from mmfm.data.transforms import center_crop_to_multiple, to_tensor

    return torch.stack([to_tensor(center_crop_to_multiple(s.image, patch, (res, res))) for s in samples])


@torch.no_grad()
def evaluate_fidelity(predict: Predictor, teachers: Mapping[str, nn.Module], specs: Sequence[Any],
                      infos: Mapping[str, Any], samples: Sequence[Any], resolutions: Sequence[int], patch: int,
                      batch_size: int = 16) -> dict[str, dict[str, dict[str, float]]]:
    """Per-resolution, per-teacher fidelity table (module docstring).

    Args:
        predict: ``images (B, 3, R, R) in [0, 1] -> {teacher: (summary (B, C), features (B, C, h, w))}`` in the
            teacher's space (a folded export, or ``distill.teacher_space_predictor``).
        teachers, specs, infos: frozen teachers, their ``TeacherSpec``s and probed ``TeacherInfo``s.
        samples: ``ImageSample``s; resolutions: student sizes; patch: student patch size.

    Returns:
        ``{str(R): {teacher: {"summary_cos", "feature_cos", "feature_cos_centered", "cos_error", "fidelity",
        "mse", "teacher_var"}}}`` (keys only for the outputs the teacher has).
    """
    from mmfm.radio.distill import resize, run_teacher, teacher_input_size

    spec_by = {s.name: s for s in specs}
    table: dict[str, dict[str, dict[str, float]]] = {}
    for res in resolutions:
        per: dict[str, dict[str, list[torch.Tensor]]] = {}
        for i in range(0, len(samples), batch_size):
            x = _images(samples[i:i + batch_size], res, patch)
            pred = predict(x)
            for name, teacher in teachers.items():
                spec, info = spec_by[name], infos[name]
                ps, pf = pred[name]
                dev = next(iter(teacher.parameters()), torch.empty(0)).device
                ts, tf = run_teacher(teacher, resize(x, teacher_input_size(spec, info, (res, res), patch)).to(dev))
                acc = per.setdefault(name, {"s": [], "ts": [], "f": [], "tf": []})
                if ps is not None and ts is not None and info.summary_dim:
                    acc["s"].append(ps.float().cpu())
                    acc["ts"].append(ts.float().cpu())
                if pf is not None and tf is not None and info.feature_dim:
                    tf = F.interpolate(tf.float().cpu(), size=pf.shape[-2:], mode="bilinear", align_corners=False)
                    acc["f"].append(pf.float().cpu().permute(0, 2, 3, 1).reshape(-1, pf.shape[1]))
                    acc["tf"].append(tf.permute(0, 2, 3, 1).reshape(-1, tf.shape[1]))
        row: dict[str, dict[str, float]] = {}
        for name, acc in per.items():
            r: dict[str, float] = {}
            if acc["s"]:
                s, ts = torch.cat(acc["s"]), torch.cat(acc["ts"])
                r["summary_cos"] = float(F.cosine_similarity(s, ts, dim=-1).mean())
                mu_s = ts.mean(0, keepdim=True)
                r["summary_cos_centered"] = float(F.cosine_similarity(s - mu_s, ts - mu_s, dim=-1).mean())
            if acc["f"]:
                f, tf = torch.cat(acc["f"]).double(), torch.cat(acc["tf"]).double()
                mu = tf.mean(0, keepdim=True)
                mse = float((f - tf).pow(2).mean())
                var = float(tf.var(0, unbiased=False).mean())
                cos = float(F.cosine_similarity(f, tf, dim=-1).mean())
                r.update(feature_cos=cos, cos_error=1.0 - cos,
                         feature_cos_centered=float(F.cosine_similarity(f - mu, tf - mu, dim=-1).mean()),
                         mse=mse, teacher_var=var, fidelity=var / max(mse, 1e-30))
            row[name] = r
        table[str(res)] = row
    return table


def format_fidelity(table: Mapping[str, Mapping[str, Mapping[str, float]]], title: str = "fidelity") -> str:
    """Markdown table: one row per (resolution, teacher)."""
    cols = ["summary_cos", "summary_cos_centered", "feature_cos", "feature_cos_centered", "fidelity"]
    lines = [f"### {title}", "", "| res | teacher | " + " | ".join(cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for res, row in table.items():
        for name, r in row.items():
            vals = [f"{r[c]:.4f}" if c in r else "-" for c in cols]
            lines.append(f"| {res} | {name} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- kNN
def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int = 20,
                temperature: float = 0.07, num_classes: int | None = None) -> torch.Tensor:
    """Weighted kNN: bank (N, D), labels (N,) int, queries (M, D) -> predicted labels (M,).

    Cosine similarity of L2-normalised vectors; the ``k`` nearest bank items vote for their label with weight
    ``exp(sim / temperature)``; ties go to the smaller label.
    """
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(f"knn: bank (N, D) and queries (M, D) must share D, got {tuple(bank.shape)} and "
                         f"{tuple(queries.shape)}")
    if temperature <= 0:
        raise ValueError(f"knn: temperature must be > 0, got {temperature}")
    k = min(k, bank.shape[0])
    c = int(num_classes if num_classes is not None else int(bank_labels.max()) + 1)
    sim = F.normalize(queries.float(), dim=-1) @ F.normalize(bank.float(), dim=-1).T  # (M, N)
    top, idx = sim.topk(k, dim=-1)
    votes = torch.zeros(queries.shape[0], c, dtype=torch.float64)
    votes.scatter_add_(1, bank_labels.long()[idx], torch.exp(top.double() / temperature))
    return votes.argmax(dim=-1)


@torch.no_grad()
def _summaries(encoder: nn.Module, samples: Sequence[Any], res: int, batch_size: int) -> torch.Tensor:
    out = []
    for i in range(0, len(samples), batch_size):
        x = _images(samples[i:i + batch_size], res, encoder.patch_size)
        o = encoder(x, adaptors=[]) if getattr(encoder, "adaptors", None) else encoder(x)
        out.append(o.summary.float())
    return torch.cat(out)


def knn_accuracy(encoder: nn.Module, bank: Sequence[Any], queries: Sequence[Any], resolution: int, k: int = 20,
                 temperature: float = 0.07, batch_size: int = 16) -> float:
    """Top-1 kNN accuracy of the backbone summary (``RadioEncoder``) on labelled ``ImageSample``s."""
    fb, fq = (_summaries(encoder, s, resolution, batch_size) for s in (bank, queries))
    lb = torch.tensor([int(s.label) for s in bank])
    lq = torch.tensor([int(s.label) for s in queries])
    n_cls = int(max(lb.max(), lq.max())) + 1
    return float((knn_predict(fb, lb, fq, k, temperature, n_cls) == lq).float().mean())


# ----------------------------------------------------------------------------------------------- modes
@torch.no_grad()
def mode_switching(encoder: nn.Module, samples: Sequence[Any], resolutions: Sequence[int],
                   reference: int | None = None, batch_size: int = 16) -> dict[str, dict[str, float]]:
    """``{str(R): {"backbone": cos, "<adaptor>": cos}}``: summary agreement with the reference resolution."""
    ref = int(reference if reference is not None else max(resolutions))
    names = list(getattr(encoder, "adaptors", {}) or {})

    def summaries(res: int) -> dict[str, torch.Tensor]:
        acc: dict[str, list[torch.Tensor]] = {}
        for i in range(0, len(samples), batch_size):
            x = _images(samples[i:i + batch_size], res, encoder.patch_size)
            o = encoder(x)
            outs = {"backbone": o} if not isinstance(o, dict) else o
            for key, v in outs.items():
                if v.summary is not None:
                    acc.setdefault(key, []).append(v.summary.float())
        return {k: torch.cat(v) for k, v in acc.items()}

    base = summaries(ref)
    table = {}
    for res in resolutions:
        cur = base if res == ref else summaries(res)
        table[str(res)] = {k: float(F.cosine_similarity(cur[k], base[k], dim=-1).mean())
                           for k in ["backbone", *names] if k in base}
    return table


def format_mode_switching(table: Mapping[str, Mapping[str, float]]) -> str:
    keys = list(next(iter(table.values())).keys()) if table else []
    lines = ["### mode switching (summary cosine vs the largest resolution)", "",
             "| res | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for res, row in table.items():
        lines.append(f"| {res} | " + " | ".join(f"{row[k]:.4f}" for k in keys) + " |")
    return "\n".join(lines)
