"""Shard write/read throughput for synthetic 224 px images (samples/s), against plain webdataset.

Write: ``mmfm.data.write_shards`` of pre-generated ImageSamples (PNG encoding included).
Read: ``mmfm.data.read_shards`` decoding to ImageSample (PNG decode + JSON) vs the same work done
by a plain ``webdataset.WebDataset(...).decode("pil")`` pipeline over the same shards, plus the
undecoded (raw bytes) path of each. Best of ``--repeats`` runs. Example::

    python scripts/bench_data.py --n 1000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds

from mmfm.data.shards import read_shards, write_shards
from mmfm.data.synth import iter_synthetic


def _best(fn, repeats: int) -> tuple[float, int]:
    best, count = float("inf"), 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        count = fn()
        best = min(best, time.perf_counter() - t0)
    return best, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="number of 224 px samples")
    parser.add_argument("--samples-per-shard", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-format", default="png", choices=("png", "jpg"))
    args = parser.parse_args()

    t0 = time.perf_counter()
    samples = list(iter_synthetic("images", args.n, seed=0, image_size=224))
    gen_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        counter = iter(range(10**6))

        def write() -> int:
            write_shards(samples, out / f"w{next(counter)}", samples_per_shard=args.samples_per_shard,
                         image_format=args.image_format)
            return len(samples)

        write_s, _ = _best(write, args.repeats)
        shards = sorted(str(p) for p in (out / "w0").glob("*.tar"))
        size_mb = sum(Path(p).stat().st_size for p in shards) / 1e6

        def mmfm_decoded() -> int:
            return sum(1 for s in read_shards(shards, schema="image") if s.image is not None)

        def wds_decoded() -> int:
            ds = wds.WebDataset(shards, shardshuffle=False).decode("pil").to_tuple("__key__", args.image_format,
                                                                                   "json")
            return sum(1 for _key, image, _meta in ds if image.convert("RGB") is not None)

        def mmfm_raw() -> int:
            return sum(1 for _ in read_shards(shards, schema="raw"))

        def wds_raw() -> int:
            return sum(1 for _ in wds.WebDataset(shards, shardshuffle=False))

        results = {name: _best(fn, args.repeats) for name, fn in
                   [("mmfm_decoded", mmfm_decoded), ("wds_decoded", wds_decoded), ("mmfm_raw", mmfm_raw),
                    ("wds_raw", wds_raw)]}
    for name, (_, count) in results.items():
        assert count == args.n, f"{name} read {count} of {args.n} samples"

    rate = {name: args.n / s for name, (s, _) in results.items()}
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "n": args.n, "image_size": 224, "image_format": args.image_format, "shards": len(shards),
        "shard_MB": round(size_mb, 1), "generate_samples_per_s": round(args.n / gen_s, 1),
        "write_samples_per_s": round(args.n / write_s, 1),
        **{f"read_{k}_samples_per_s": round(v, 1) for k, v in rate.items()},
        "ratio_decoded_mmfm_over_wds": round(rate["mmfm_decoded"] / rate["wds_decoded"], 3),
        "ratio_raw_mmfm_over_wds": round(rate["mmfm_raw"] / rate["wds_raw"], 3),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
