"""``mmfm radio ...`` command line.

Commands: ``extract`` (batched feature extraction to safetensors / npy), ``pca`` (PCA-to-RGB picture),
``train`` / ``eval`` / ``export`` (distillation, :mod:`mmfm.radio.train_cli`) and ``featsharp train|apply``
(FeatSharp upsamplers, :mod:`mmfm.radio.featsharp_cli`).
Each command is one ``register_<name>(sub)`` function; to add a command, write ``register_<name>(sub)`` (here
or in its own module, importing heavy modules inside the handler) and add one call to it in ``register``.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def register(subparsers) -> None:
    """Add ``mmfm radio`` and its commands to the top-level ``subparsers``."""
    # imported here, not at the top: featsharp_cli imports this module's helpers
    from mmfm.radio.featsharp_cli import register_featsharp
    from mmfm.radio.train_cli import register_subcommands

    p = subparsers.add_parser("radio", help="RADIO-style vision encoders: extract features, PCA pictures, "
                                            "distillation, FeatSharp upsamplers",
                              description="Agglomerative vision encoders (RADIO family).")
    p.set_defaults(area_parser=p)
    sub = p.add_subparsers(dest="radio_command", metavar="COMMAND")
    register_extract(sub)
    register_pca(sub)
    register_subcommands(sub)
    register_featsharp(sub)


# ---- shared options and helpers
def _friendly_errors(name: str) -> Callable:
    """Bad input (ValueError / TypeError / FileNotFoundError) -> one-line message on stderr and exit code 2."""

    def wrap(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(fn)
        def run(args: argparse.Namespace) -> int:
            try:
                return fn(args)
            except (ValueError, TypeError, FileNotFoundError) as err:
                print(f"mmfm radio {name}: error: {err}", file=sys.stderr)
                return 2

        return run

    return wrap


def _add_model_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--model", required=True, help="checkpoint directory (mmfm radio or Hugging Face radio)")
    s.add_argument("--resolution", default=None,
                   help="input size 'N' or 'HxW' in pixels (snapped to the nearest supported size); "
                        "default: the model's preferred resolution")
    s.add_argument("--device", default="cpu", help="torch device, e.g. cuda or cpu (default cpu)")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="model precision (default float32)")


def parse_resolution(text: str | None, default: tuple[int, int]) -> tuple[int, int]:
    """'512' -> (512, 512); '384x640' -> (384, 640); None -> default."""
    if text is None:
        return default
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise ValueError(f"--resolution must be 'N' or 'HxW' with positive integers, got {text!r}")
    return parts[0], parts[1]


def _load_encoder(args: argparse.Namespace, adaptors):
    import torch

    from mmfm.radio.encoder import load

    enc = load(args.model, adaptors=adaptors)
    enc.to(device=args.device, dtype=getattr(torch, args.dtype))
    pref = enc.preferred_resolution
    h, w = parse_resolution(args.resolution, (pref.height, pref.width))
    snapped = enc.get_nearest_supported_resolution(h, w)
    if tuple(snapped) != (h, w):
        log.info("resolution %dx%d is not supported; using the nearest supported %dx%d", h, w, *snapped)
    return enc, tuple(snapped)


def iter_images(inputs: list[str]) -> Iterator[tuple[str, bytes | Path]]:
    """Yield ``(key, path or image bytes)`` from image files, directories of images, and webdataset ``.tar``
    shards (or directories of them). In a shard, a sample's first image member is used."""
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise FileNotFoundError(f"--input {p} does not exist")
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file())
            shards = [f for f in files if f.suffix == ".tar"]
            images = [f for f in files if f.suffix.lower() in IMAGE_EXTS]
            if not shards and not images:
                raise ValueError(f"--input directory {p} holds no images ({', '.join(IMAGE_EXTS)}) and no .tar shards")
            for f in images:
                yield f.stem, f
            for f in shards:
                yield from _iter_shard(f)
        elif p.suffix == ".tar":
            yield from _iter_shard(p)
        elif p.suffix.lower() in IMAGE_EXTS:
            yield p.stem, p
        else:
            raise ValueError(f"--input {p} is neither an image ({', '.join(IMAGE_EXTS)}) nor a .tar shard")


def _iter_shard(path: Path) -> Iterator[tuple[str, bytes]]:
    seen: set[str] = set()
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name
                base = name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                prefix = name[: len(name) - len(base)]
                if "." + ext.lower().rsplit(".", 1)[-1] not in IMAGE_EXTS or prefix + key in seen:
                    continue
                seen.add(prefix + key)
                fh = tar.extractfile(member)
                if fh is not None:
                    yield f"{path.stem}/{prefix}{key}", fh.read()
    except tarfile.TarError as err:
        raise ValueError(f"corrupt shard {path}: {err}") from err


def _open_image(src: bytes | Path):
    from PIL import Image

    img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
    img.load()
    return img.convert("RGB")


def _to_tensor(img, size: tuple[int, int]):
    import numpy as np
    import torch
    from PIL import Image

    h, w = size
    arr = np.asarray(img.resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)


# ---- extract
def register_extract(sub) -> None:
    s = sub.add_parser("extract", help="extract summary + dense features of images to .safetensors or .npy",
                       description="Batched feature extraction. Images are resized to --resolution. Output "
                                   ".safetensors: tensors 'summary' (N, k*D) and 'features' (N, h*w, D) (plus "
                                   "'<adaptor>.summary' / '<adaptor>.features'), sample keys in the metadata. "
                                   "Output .npy: the features array; summary in <out>.summary.npy and keys in "
                                   "<out>.keys.txt. Unreadable images are skipped and counted.")
    _add_model_args(s)
    s.add_argument("--input", nargs="+", required=True,
                   help="image files, directories of images, or webdataset .tar shards (or directories of them)")
    s.add_argument("--out", required=True, help="output file, .safetensors or .npy")
    s.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    s.add_argument("--adaptor", action="append", default=None, help="also save this adaptor's outputs (repeatable)")
    s.add_argument("--feature-fmt", default="NLC", choices=["NLC", "NCHW"], help="layout of saved features")
    s.set_defaults(func=_cmd_extract)


@_friendly_errors("extract")
def _cmd_extract(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from tqdm import tqdm

    out = Path(args.out)
    if out.suffix not in (".safetensors", ".npy"):
        raise ValueError(f"--out must end in .safetensors or .npy, got {out}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.adaptor and out.suffix == ".npy":
        raise ValueError("--adaptor outputs need a .safetensors --out (an .npy holds one array)")
    enc, size = _load_encoder(args, args.adaptor)
    dev = torch.device(args.device)
    results: dict[str, list] = {}
    keys: list[str] = []
    skipped = 0

    def run(batch: list) -> None:
        x = torch.stack(batch).to(dev)
        with torch.inference_mode():
            res = enc(x, feature_fmt=args.feature_fmt)
        outs = {"": res} if not isinstance(res, dict) else {("" if k == "backbone" else f"{k}."): v
                                                              for k, v in res.items()}
        for prefix, r in outs.items():
            for field in ("summary", "features"):
                t = getattr(r, field)
                if t is not None:
                    results.setdefault(prefix + field, []).append(t.float().cpu())

    batch: list = []
    bar = tqdm(iter_images(args.input), desc="extract", unit="img")
    for key, src in bar:
        try:
            img = _open_image(src)
        except Exception as err:  # corrupt image: skip and count, keep going
            skipped += 1
            log.warning("skipping unreadable image %s: %s", key, err)
            continue
        batch.append(_to_tensor(img, size))
        keys.append(key)
        if len(batch) == args.batch_size:
            run(batch)
            batch = []
    if batch:
        run(batch)
    if not keys:
        raise ValueError(f"no readable images in --input {args.input} ({skipped} skipped)")
    tensors = {k: torch.cat(v) for k, v in results.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        from mmfm.radio.encoder import write_safetensors

        meta = {"keys": json.dumps(keys), "resolution": f"{size[0]}x{size[1]}", "feature_fmt": args.feature_fmt}
        write_safetensors(tensors, out, metadata=meta)
    else:
        np.save(out, tensors["features"].numpy())
        np.save(out.with_suffix(".summary.npy"), tensors["summary"].numpy())
        out.with_suffix(".keys.txt").write_text("\n".join(keys) + "\n")
    log.info("wrote %d images (%d skipped) at %dx%d to %s", len(keys), skipped, size[0], size[1], out)
    print(f"extracted {len(keys)} images ({skipped} skipped) at {size[0]}x{size[1]} -> {out}")
    return 0


# ---- pca
def register_pca(sub) -> None:
    s = sub.add_parser("pca", help="PCA-to-RGB picture of an image's dense features",
                       description="Encode one image and colour its patch features by their first three "
                                   "principal components (of the backbone, or of an adaptor's features).")
    _add_model_args(s)
    s.add_argument("--image", required=True, help="input image file")
    s.add_argument("--out", required=True, help="output picture (.png)")
    s.add_argument("--adaptor", default=None, help="use this adaptor's features instead of the backbone's")
    s.add_argument("--side-by-side", action="store_true", help="put the input image left of the picture")
    s.set_defaults(func=_cmd_pca)


@_friendly_errors("pca")
def _cmd_pca(args: argparse.Namespace) -> int:
    import torch

    from mmfm.radio.pca import feature_pca_picture

    img_path = Path(args.image)
    if not img_path.is_file():
        raise FileNotFoundError(f"--image {img_path} does not exist")
    enc, size = _load_encoder(args, [args.adaptor] if args.adaptor else None)
    img = _open_image(img_path)
    x = _to_tensor(img, size)[None].to(args.device)
    with torch.inference_mode():
        res = enc(x)
    r = res[args.adaptor] if args.adaptor else res
    if r.features is None:
        raise ValueError(f"adaptor {args.adaptor!r} has no feature head")
    n = r.features.shape[1]
    p = enc.patch_size
    u = int(round((n / ((size[0] // p) * (size[1] // p))) ** 0.5))  # adaptor upsample factor
    grid = (size[0] // p * u, size[1] // p * u)
    pic = feature_pca_picture(r.features[0].float().cpu(), grid, size=(size[1], size[0]),
                              image=img if args.side_by_side else None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pic.save(out)
    print(f"wrote {out} ({pic.width}x{pic.height})")
    return 0
