"""``mmfm radio featsharp train | apply``: FeatSharp feature upsamplers (:mod:`mmfm.radio.featsharp`) for one
frozen teacher (wired into ``mmfm.radio.cli.register`` by ``register_featsharp(sub)``).

- ``train --teacher SPEC.yaml | --recipe RECIPE --teacher NAME --shards DIR --out FILE.safetensors``: fit an
  upsampler on image shards (``train_featsharp``);
- ``apply --checkpoint FILE.safetensors (same teacher options) --image ... | --shards DIR --out FEATS``:
  low-res and upsampled features of images, optionally a PCA picture of both.

The teacher is one :class:`~mmfm.radio.teachers.TeacherSpec`: a YAML file holding one spec mapping, or the
teacher ``NAME`` of a RADIO recipe. It is built by ``mmfm.radio.distill.build_teachers``, so a random-init
teacher of a recipe gets the very weights ``mmfm radio train`` distils from (a spec file's teacher is seeded
as the first teacher of a seed-0 recipe). ``train`` records a fingerprint of the teacher (weights, input size
and normalisation) in the checkpoint's metadata; ``apply`` refuses a checkpoint trained for another teacher.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmfm.radio.cli import _friendly_errors, _open_image

if TYPE_CHECKING:
    import torch.nn as nn

    from mmfm.radio.teachers import TeacherSpec

__all__ = ["register_featsharp", "register_featsharp_apply", "register_featsharp_train", "resolve_teacher",
           "teacher_fingerprint"]

# metadata keys this CLI adds next to the library's ``featsharp_config``
TEACHER_META = "mmfm_teacher"
TRAIN_META = "mmfm_train"
PCA_ROWS = 8  # images shown in the --pca picture


def register_featsharp(sub) -> None:
    """``mmfm radio featsharp``: the group of FeatSharp commands."""
    p = sub.add_parser("featsharp", help="FeatSharp feature upsamplers for a frozen teacher: train, apply",
                       description="Train a FeatSharp upsampler (u-times finer teacher features) and apply it.")
    p.set_defaults(area_parser=p)
    fsub = p.add_subparsers(dest="featsharp_command", metavar="COMMAND")
    register_featsharp_train(fsub)
    register_featsharp_apply(fsub)


def _add_teacher_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--teacher", required=True,
                   help="a YAML file holding one TeacherSpec mapping, or with --recipe the NAME of one of its teachers")
    s.add_argument("--recipe", default=None, help="a RADIO recipe (e.g. configs/radio/tiny-cpu.yaml)")
    s.add_argument("--device", default="cpu", help="torch device, e.g. cuda or cpu (default cpu)")


def _image_tensor(image, size: int):
    """PIL image -> (3, size, size) in [0, 1]: aspect-preserving resize + center crop (as the distiller)."""
    from mmfm.data.transforms import center_crop_to_multiple, to_tensor

    return to_tensor(center_crop_to_multiple(image, 1, (size, size)))


# ---- teachers
def resolve_teacher(teacher: str, recipe: str | None = None, device: str = "cpu") -> tuple[TeacherSpec, nn.Module]:
    """``(TeacherSpec, frozen teacher)`` from ``--teacher`` / ``--recipe`` (module docstring)."""
    from mmfm.config import load_config
    from mmfm.radio.distill import RadioTrainConfig, build_teachers
    from mmfm.radio.teachers import TeacherSpec

    if recipe is None:
        path = Path(teacher)
        if not path.is_file():
            raise FileNotFoundError(f"--teacher {path} is not a file (give a TeacherSpec YAML file, or --recipe "
                                    "RECIPE --teacher NAME)")
        spec = load_config(TeacherSpec, path)
        cfg = RadioTrainConfig(teachers=[spec])
    else:
        full = load_config(RadioTrainConfig, recipe)
        names = [t.name for t in full.teachers]
        if teacher not in names:
            raise ValueError(f"--teacher {teacher!r} is not a teacher of recipe {recipe}; its teachers: {names}")
        i = names.index(teacher)
        spec = full.teachers[i]
        # build_teachers seeds teacher i by its index: random-init weights need the earlier teachers built too;
        # loaded weights do not depend on the seed, so a checkpointed teacher is built alone
        cfg = RadioTrainConfig(seed=full.seed, teachers=[spec] if spec.checkpoint else full.teachers[: i + 1])
    return spec, build_teachers(cfg, device)[spec.name]


def teacher_fingerprint(teacher: nn.Module) -> str:
    """Digest of what makes a teacher's features: input size, patch size, input normalisation and weights.

    Each weight enters with its name, shape, dtype and first / last 64 values: enough to tell two checkpoints
    or two random inits apart without hashing every value of a large teacher."""
    import torch

    h = hashlib.sha256()
    for name in ("input_size", "patch_size"):
        h.update(f"{name}={getattr(teacher, name, None)};".encode())
    tensors = dict(teacher.state_dict())
    for name in ("mean", "std"):  # non-persistent buffers of mmfm Teachers: not in the state dict
        buf = getattr(teacher, name, None)
        if isinstance(buf, torch.Tensor):
            tensors[f"<{name}>"] = buf
    for name in sorted(tensors):
        t = tensors[name].detach()
        flat = t.reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(torch.cat([flat[:64], flat[-64:]]).to("cpu", torch.float64).numpy().tobytes())
    return h.hexdigest()


def _describe(info: dict[str, Any]) -> str:
    """``'clip' (open_clip, input 64, features 64x4x4, weights random init)`` from a teacher info dict."""
    parts = [f"{info.get('family')}" + (f" {info['model_name']}" if info.get("model_name") else ""),
             f"input {info.get('input_size')}"]
    if info.get("features"):
        parts.append(f"features {info['features']}")
    parts.append(f"weights {info.get('checkpoint') or 'random init'}")
    return f"{info.get('name')!r} ({', '.join(parts)})"


def _teacher_info(spec, up) -> dict[str, Any]:
    return {"name": spec.name, "family": spec.family, "model_name": spec.model_name,
            "checkpoint": spec.checkpoint, "input_size": up.input_size,
            "features": f"{up.dim}x{up.grid[0]}x{up.grid[1]}", "fingerprint": teacher_fingerprint(up.teacher)}


def _checkpoint_meta(path: Path, what: str = "--checkpoint") -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for a file that is not safetensors
        raise ValueError(f"{what} {path} is not a readable safetensors file: {err}") from err


def load_upsampler_for(path: Path | str, spec, teacher, what: str = "--checkpoint"):
    """``FeatSharpUpsampler.load`` that names the teacher when the checkpoint was trained for another one.

    ``what`` names the setting the path came from in error messages (``--checkpoint`` on the command line,
    ``featsharp_checkpoint`` in a distillation recipe)."""
    from mmfm.radio.featsharp import FeatSharpUpsampler

    path = Path(path)
    meta = _checkpoint_meta(path, what)
    stored = json.loads(meta[TEACHER_META]) if TEACHER_META in meta else None
    if stored is not None and stored.get("fingerprint") != teacher_fingerprint(teacher):
        given = {"name": spec.name, "family": spec.family, "model_name": spec.model_name,
                 "checkpoint": spec.checkpoint, "input_size": getattr(teacher, "input_size", spec.input_size)}
        raise ValueError(f"{what} {path} was trained for teacher {_describe(stored)}, not for the teacher "
                         f"given here, {_describe(given)}: their weights or input settings differ; pass the "
                         "teacher the upsampler was trained with")
    try:
        return FeatSharpUpsampler.load(str(path), teacher)
    except RuntimeError as err:  # load_state_dict: size mismatch (a checkpoint without our teacher metadata)
        first = str(err).strip().splitlines()
        raise ValueError(f"{what} {path} does not fit teacher {spec.name!r}: "
                         f"{first[-1].strip() if first else err}") from err


# ---- train
def register_featsharp_train(sub) -> None:
    """``mmfm radio featsharp train``."""
    s = sub.add_parser("train", help="train a FeatSharp upsampler for a frozen teacher on image shards",
                       description="Fit a FeatSharp upsampler (multi-view consistency, mmfm.radio.featsharp) for "
                                   "one frozen teacher on webdataset image shards. Images are resized and "
                                   "center-cropped to --image-size. The teacher's weights are not saved.")
    _add_teacher_args(s)
    s.add_argument("--shards", required=True, help="image shards: a directory of .tar, a glob or brace pattern")
    s.add_argument("--out", required=True, help="output checkpoint (.safetensors)")
    s.add_argument("--factor", type=int, default=2, help="upsample factor u >= 2 (default 2)")
    s.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    s.add_argument("--batch-size", type=int, default=8, help="images per step (default 8)")
    s.add_argument("--image-size", type=int, default=None,
                   help="training image size in pixels (default: factor x the teacher's input size)")
    s.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (default 5e-4)")
    s.add_argument("--n-views", type=int, default=2, help="random views per batch in the loss (default 2)")
    s.add_argument("--fit-batches", type=int, default=4, help="batches that fit the feature normaliser (default 4)")
    s.add_argument("--seed", type=int, default=0, help="seed of the upsampler init, views and shuffle (default 0)")
    s.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    s.set_defaults(func=_cmd_train)


def _batches(shards: str, size: int, batch_size: int, seed: int, device: str, bar) -> Iterator[Any]:
    """Endless stream of (B, 3, size, size) batches in [0, 1], reshuffled every epoch."""
    import torch

    from mmfm.data.shards import read_shards

    dataset = read_shards(shards, schema="image", shuffle_buffer=256, seed=seed, rank=0, world_size=1)
    epoch = 0
    while True:
        dataset.set_epoch(epoch)
        batch: list = []
        seen = 0
        for sample in dataset:
            seen += 1
            batch.append(_image_tensor(sample.image, size))
            if len(batch) == batch_size:
                bar.update(1)
                yield torch.stack(batch).to(device)
                batch = []
        if not seen:
            raise ValueError(f"--shards {shards} holds no readable image samples")
        # a last partial batch is dropped (constant batch shape) unless the shards hold less than one batch
        if batch and seen < batch_size:
            bar.update(1)
            yield torch.stack(batch).to(device)
        epoch += 1


@_friendly_errors("featsharp train")
def _cmd_train(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from mmfm.radio.featsharp import FeatSharpUpsampler, train_featsharp

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must end in .safetensors, got {out}")
    for name in ("steps", "batch_size", "n_views", "fit_batches"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.factor < 2:
        raise ValueError(f"--factor must be >= 2, got {args.factor}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.image_size is not None and args.image_size < 1:
        raise ValueError(f"--image-size must be >= 1, got {args.image_size}")
    from mmfm.data.shards import expand_urls

    expand_urls(args.shards)  # missing shards fail here, before the teacher is built
    spec, teacher = resolve_teacher(args.teacher, args.recipe, args.device)
    torch.manual_seed(args.seed)
    up = FeatSharpUpsampler(teacher, args.factor).to(args.device)
    size = args.image_size or args.factor * up.input_size
    total = args.steps + (0 if bool(up.normalizer.fitted) else args.fit_batches)
    with tqdm(total=total, desc="featsharp train", unit="batch", disable=args.no_progress) as bar:
        try:
            up, losses = train_featsharp(teacher, _batches(args.shards, size, args.batch_size, args.seed,
                                                           args.device, bar),
                                         steps=args.steps, factor=args.factor, lr=args.lr, n_views=args.n_views,
                                         fit_batches=args.fit_batches, seed=args.seed, upsampler=up)
        except FloatingPointError as err:
            raise ValueError(f"{err} (try a lower --lr)") from err
    out.parent.mkdir(parents=True, exist_ok=True)
    _save_with_metadata(up, out, {
        TEACHER_META: json.dumps(_teacher_info(spec, up)),
        TRAIN_META: json.dumps({"steps": args.steps, "batch_size": args.batch_size, "image_size": size,
                                "lr": args.lr, "seed": args.seed, "shards": str(args.shards),
                                "first_loss": losses[0], "last_loss": losses[-1]})})
    k = min(5, len(losses) // 2)
    line = f"loss: first {losses[0]:.6f} -> last {losses[-1]:.6f}"
    if k > 1:  # single steps are noisy (random views): also the means of the first / last k
        line += f" (mean of the first / last {k} steps: {sum(losses[:k]) / k:.6f} -> {sum(losses[-k:]) / k:.6f})"
    print(line)
    print(f"FeatSharp x{args.factor} upsampler for teacher {spec.name!r} ({args.steps} steps at {size}px) -> {out}")
    return 0


def _save_with_metadata(up, out: Path, extra: dict[str, str]) -> None:
    """``up.save`` to a temporary file, then the same tensors with the library's metadata plus ``extra``
    (atomically) at ``out``."""
    from safetensors.torch import load_file

    from mmfm.radio.encoder import write_safetensors

    tmp = out.with_name(out.name + ".lib.tmp")
    try:
        up.save(str(tmp))
        meta = _checkpoint_meta(tmp)
        write_safetensors(load_file(str(tmp)), out, metadata={**meta, **extra})
    finally:
        tmp.unlink(missing_ok=True)


# ---- apply
def register_featsharp_apply(sub) -> None:
    """``mmfm radio featsharp apply``."""
    s = sub.add_parser("apply", help="upsample a teacher's features of images with a trained FeatSharp checkpoint",
                       description="Write the teacher's low-res features 'lr' (N, C, h, w) and the FeatSharp "
                                   "features 'hr' (N, C, u*h, u*w) of images to a .safetensors file (sample keys "
                                   "in the metadata), in the teacher's feature space unless --normalized.")
    s.add_argument("--checkpoint", required=True, help="FeatSharp checkpoint of `mmfm radio featsharp train`")
    _add_teacher_args(s)
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", nargs="+", default=None, help="image files")
    src.add_argument("--shards", default=None, help="image shards (directory of .tar, glob or brace pattern)")
    s.add_argument("--max-images", type=int, default=None, help="with --shards: at most this many images")
    s.add_argument("--out", required=True, help="output features (.safetensors)")
    s.add_argument("--pca", default=None,
                   help=f"also write a PCA picture (.png): one row per image (the first {PCA_ROWS}): image | "
                        "low-res | upsampled, one PCA per row so that the colours compare")
    s.add_argument("--image-size", type=int, default=None,
                   help="input size in pixels (default: the checkpoint's training size)")
    s.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    s.add_argument("--normalized", action="store_true",
                   help="keep the features in the upsampler's normalised space (default: the teacher's space)")
    s.set_defaults(func=_cmd_apply)


def _apply_inputs(args: argparse.Namespace) -> Iterator[tuple[str, Any]]:
    """``(key, PIL image)`` of ``--image`` files or ``--shards`` samples."""
    if args.image:
        for item in args.image:
            p = Path(item)
            if not p.is_file():
                raise FileNotFoundError(f"--image {p} does not exist")
            try:
                img = _open_image(p)
            except OSError as err:  # PIL: not an image / truncated
                raise ValueError(f"--image {p} is not a readable image: {err}") from err
            yield p.stem, img
        return
    from mmfm.data.shards import read_shards

    for n, sample in enumerate(read_shards(args.shards, schema="image", shuffle_buffer=0, rank=0, world_size=1)):
        if args.max_images is not None and n >= args.max_images:
            return
        yield sample.key, sample.image


def _pca_picture(images: list, lr, hr, size: int):
    """Rows ``image | low-res PCA | upsampled PCA`` (each ``size`` x ``size``)."""
    import torch
    from PIL import Image

    from mmfm.radio.pca import pca_rgb

    rows = []
    for img, a, b in zip(images, lr, hr):
        la, lb = a.flatten(1).T, b.flatten(1).T  # (h*w, C), (u*h*u*w, C)
        # one PCA over both maps' tokens (a 1 x N "grid"), so equal features get equal colours
        rgb = pca_rgb(torch.cat([la, lb]).float(), (1, la.shape[0] + lb.shape[0]))[0]
        pics = [Image.fromarray(rgb[: la.shape[0]].reshape(*a.shape[1:], 3)),
                Image.fromarray(rgb[la.shape[0]:].reshape(*b.shape[1:], 3))]
        row = Image.new("RGB", (3 * size, size))
        row.paste(img.resize((size, size), Image.BILINEAR), (0, 0))
        for j, pic in enumerate(pics, start=1):
            row.paste(pic.resize((size, size), Image.NEAREST), (j * size, 0))
        rows.append(row)
    canvas = Image.new("RGB", (3 * size, size * len(rows)))
    for i, row in enumerate(rows):
        canvas.paste(row, (0, i * size))
    return canvas


@_friendly_errors("featsharp apply")
def _cmd_apply(args: argparse.Namespace) -> int:
    import torch

    from mmfm.radio.encoder import write_safetensors

    ckpt = Path(args.checkpoint)
    if not ckpt.is_file():
        raise FileNotFoundError(f"--checkpoint {ckpt} does not exist")
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out must end in .safetensors, got {out}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_images is not None and args.max_images < 1:
        raise ValueError(f"--max-images must be >= 1, got {args.max_images}")
    if args.image_size is not None and args.image_size < 1:
        raise ValueError(f"--image-size must be >= 1, got {args.image_size}")
    # bad inputs fail before the teacher is built
    if args.image:
        for item in args.image:
            if not Path(item).is_file():
                raise FileNotFoundError(f"--image {item} does not exist")
    else:
        from mmfm.data.shards import expand_urls

        expand_urls(args.shards)
    meta = _checkpoint_meta(ckpt)
    if "featsharp_config" not in meta:
        raise ValueError(f"--checkpoint {ckpt} is not a FeatSharp checkpoint (no featsharp_config metadata)")
    spec, teacher = resolve_teacher(args.teacher, args.recipe, args.device)
    up = load_upsampler_for(ckpt, spec, teacher).to(args.device).eval()
    trained = json.loads(meta.get(TRAIN_META, "{}"))
    size = args.image_size or int(trained.get("image_size") or up.cfg.factor * up.input_size)

    keys: list[str] = []
    lrs: list = []
    hrs: list = []
    shown: list = []
    batch: list = []

    def run() -> None:
        lr, hr = up.apply(torch.stack(batch).to(args.device), denormalize=not args.normalized)
        lrs.append(lr.float().cpu())
        hrs.append(hr.float().cpu())
        batch.clear()

    for key, img in _apply_inputs(args):
        keys.append(key)
        if len(shown) < PCA_ROWS and args.pca:
            shown.append(img)
        batch.append(_image_tensor(img, size))
        if len(batch) == args.batch_size:
            run()
    if batch:
        run()
    if not keys:
        raise ValueError(f"no images in --shards {args.shards}")
    tensors = {"lr": torch.cat(lrs), "hr": torch.cat(hrs)}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, out, metadata={
        "keys": json.dumps(keys), "image_size": str(size), "factor": str(up.cfg.factor), "teacher": spec.name,
        "space": "normalized" if args.normalized else "teacher", "featsharp_checkpoint": str(ckpt)})
    hr = tensors["hr"]
    print(f"FeatSharp x{up.cfg.factor} features of {len(keys)} images at {size}px: lr {tuple(tensors['lr'].shape)}, "
          f"hr {tuple(hr.shape)} -> {out}")
    if args.pca:
        pic = _pca_picture(shown, tensors["lr"], hr, size)
        Path(args.pca).parent.mkdir(parents=True, exist_ok=True)
        pic.save(args.pca)
        print(f"wrote {args.pca} ({pic.width}x{pic.height})")
    return 0
