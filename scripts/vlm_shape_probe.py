#!/usr/bin/env python
"""Where a tiny VLM loses the shapes: a linear shape probe per scene cell at each stage of its image path.

For synthetic scenes it has not seen (``sample_scene("images", i, seed=3)``), the VLM's encoder features,
compressor tokens and projector outputs are grouped per cell of the 3x3 scene grid (the tokens covering a cell,
concatenated). A linear classifier is fit per stage on the first 75% of the images to predict each occupied
cell's shape, and its accuracy on the held-out rest is printed. A stage where the accuracy drops is where the
information is discarded.

    python scripts/vlm_shape_probe.py runs/x/unshuffle2x2/captions/model [more VLM directories]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

STAGES = ("encoder", "compressor", "projector")


def cell_features(model, images: torch.Tensor, batch: int = 128) -> dict[str, torch.Tensor]:
    """images (n, 3, S, S) -> {stage: (n, 9, d)}: the tokens over each cell of the 3x3 grid, concatenated."""
    from mmfm.data.synth import tokens_by_cell

    grid = images.shape[-1] // model.vision_encoder.patch_size
    out: dict[str, list[torch.Tensor]] = {s: [] for s in STAGES}
    with torch.no_grad():
        for i in range(0, len(images), batch):
            enc = model.vision_encoder(images[i:i + batch]).features  # (b, grid * grid, D)
            comp = model.compressor(enc, (grid, grid))
            comp = comp[0] if isinstance(comp, tuple) else comp  # (b, K, D')
            for stage, tokens in zip(STAGES, (enc, comp, model.projector(comp))):
                out[stage].append(tokens_by_cell(tokens))
    return {s: torch.cat(v) for s, v in out.items()}


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, n_fit: int, classes: int, steps: int = 400) -> float:
    """Fit a linear classifier on cells of the first n_fit images (standardised features), return its accuracy
    on the occupied cells (y < classes - 1) of the rest. x (n, 9, d), y (n, 9)."""
    mean, std = x[:n_fit].mean((0, 1)), x[:n_fit].std((0, 1)) + 1e-6
    x = (x - mean) / std
    torch.manual_seed(0)  # the same head init for every stage and model
    head = torch.nn.Linear(x.shape[-1], classes)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(head(x[:n_fit]).flatten(0, 1), y[:n_fit].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = head(x[n_fit:]).argmax(-1)
    occupied = y[n_fit:] < classes - 1
    return float((pred == y[n_fit:])[occupied].float().mean())


def main(argv: list[str] | None = None) -> int:
    from mmfm.data.synth import SHAPES, cell_labels, render_scene, sample_scene
    from mmfm.vlm.build import load
    from mmfm.vlm.conversation import image_to_tensor

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", type=Path, help="VLM directories (mmfm.vlm.build.save_vlm)")
    p.add_argument("--n-images", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    scenes = [sample_scene("images", i, seed=3) for i in range(args.n_images)]
    shapes, _ = cell_labels(scenes)  # len(SHAPES): empty cell
    n_fit = args.n_images * 3 // 4
    images_at: dict[int, torch.Tensor] = {}  # rendered once per image size
    for path in args.models:
        model, _ = load(path)
        model.eval()
        size = model.config.image_size
        if size not in images_at:
            images_at[size] = torch.stack([image_to_tensor(render_scene(s), size) for s in scenes])
        feats = cell_features(model, images_at[size])
        accs = {s: probe_accuracy(f, shapes, n_fit, len(SHAPES) + 1) for s, f in feats.items()}
        dims = {s: f.shape[-1] for s, f in feats.items()}
        print(f"{path}: held-out shape probe per cell " + ", ".join(f"{s} (dim {dims[s]}) {a:.3f}" for s, a in accs.items()),
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
