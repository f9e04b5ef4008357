#!/usr/bin/env python
"""RADIO trainer input pipeline: can it feed the GPU step, and does prefetching hide it?

The distillation trainer reads each micro-step's samples from webdataset shards, decodes them, resizes and
crops them to the step's resolution and stacks them (``build_batch``). This script times that CPU work for one
partition (default 432 px, batch 64, JPEG shards of ``--image-size`` px) in three ways, all in one run:

1. **on demand** (``prefetch: 0``, one resize thread): the batch is built on the trainer's thread when the step
   asks for it, which was the trainer's only behaviour before ``mmfm.radio.step_batches``;
2. **resize threads** (``resize_workers`` threads, still on demand);
3. **a trainer loop with a simulated GPU step**: each step takes its batch, then waits ``--gpu-step-ms``
   (default 224.5 ms, the compiled 432-px step on an H100 in BENCHMARKS.md). The wait stands in for the GPU
   step, during which the CPU is free. The loop runs on demand, then with ``prefetch: 2``, then with
   ``prefetch: 2`` and ``--decode-workers`` DataLoader processes decoding the shards (``decode_workers``). With
   prefetching, the step time is max(build, GPU) and not their sum. These are the ratios the script prints.

Without decode processes, the data layer decodes serially on the producer thread. The machine's core count
bounds what the resize threads and decode processes can gain.

    python scripts/bench_radio_data.py                          # 432 px, batch 64, 640 px JPEGs
    python scripts/bench_radio_data.py --tiny                   # seconds-long smoke run
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from bench_radio_train import run_meta, write_json  # scripts/ is on sys.path when a script is run

from mmfm.radio.distill import DataConfig, PartitionConfig, RadioTrainConfig, SampleStream, StudentConfig
from mmfm.radio.step_batches import StepBatches
from mmfm.radio.teachers import TeacherSpec


def write_jpeg_shards(out: Path, n: int, image_size: int) -> None:
    """``n`` synthetic images of ``image_size`` px as JPEG webdataset shards (as web-scale image data is)."""
    from mmfm.data.shards import write_shards
    from mmfm.data.synth import iter_synthetic

    write_shards(iter_synthetic("images", n, seed=0, image_size=image_size), out, samples_per_shard=64,
                 image_format="jpg")


def make_config(shards: str, resolution: int, batch: int) -> RadioTrainConfig:
    return RadioTrainConfig(teachers=[TeacherSpec(name="t", family="toy")], student=StudentConfig(patch_size=16),
                            data=DataConfig(train_shards=shards, shuffle_buffer=64),
                            partitions=[PartitionConfig("low", [resolution], 1.0, batch)])


def time_loop(cfg: RadioTrainConfig, steps: int, prefetch: int, workers: int, gpu_step_s: float,
              decode_workers: int = 0, decode_threads: int = 0) -> float:
    """Mean seconds per step of ``steps`` steps after one warm-up step: take the batch, then wait
    ``gpu_step_s`` (the simulated GPU step; 0 times the batch building alone)."""
    stream = SampleStream(cfg.data.train_shards, cfg.data.shuffle_buffer, 0, decode_workers, decode_threads)
    with StepBatches(cfg, stream, 0, steps + 1, prefetch, workers) as batches:
        next(batches)
        t0 = time.perf_counter()
        for batch in batches:
            assert batch.student.shape[0] == cfg.partitions[0].batch_size
            time.sleep(gpu_step_s)
        return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=432)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--image-size", type=int, default=640, help="side of the synthetic JPEGs")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--workers", type=int, default=4, help="resize threads (DataConfig.resize_workers)")
    p.add_argument("--decode-workers", type=int, default=2,
                   help="DataLoader processes decoding the shards in the last row (DataConfig.decode_workers)")
    p.add_argument("--decode-threads", type=int, default=2,
                   help="threads decoding the shards in the decode-threads rows (DataConfig.decode_threads)")
    p.add_argument("--gpu-step-ms", type=float, default=224.5, help="the simulated GPU step")
    p.add_argument("--shards", default=None, help="existing image shards (default: write synthetic JPEGs)")
    p.add_argument("--tiny", action="store_true", help="smoke run: small images and batches")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.tiny:
        args.resolution, args.batch, args.image_size, args.steps, args.gpu_step_ms = 64, 4, 96, 2, 5.0
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if shards is None:
            shards = str(Path(tmp) / "shards")
            write_jpeg_shards(Path(shards), (args.steps + 2) * args.batch, args.image_size)
        cfg = make_config(shards, args.resolution, args.batch)
        gpu_s = args.gpu_step_ms / 1e3
        row = {"on_demand_build_ms": 1e3 * time_loop(cfg, args.steps, 0, 1, 0.0),
               "threads_build_ms": 1e3 * time_loop(cfg, args.steps, 0, args.workers, 0.0),
               "threads_decode_threads_build_ms": 1e3 * time_loop(cfg, args.steps, 0, args.workers, 0.0, 0,
                                                                  args.decode_threads),
               "loop_on_demand_ms": 1e3 * time_loop(cfg, args.steps, 0, args.workers, gpu_s),
               "loop_prefetch_ms": 1e3 * time_loop(cfg, args.steps, 2, args.workers, gpu_s),
               "loop_prefetch_decode_workers_ms": 1e3 * time_loop(cfg, args.steps, 2, args.workers, gpu_s,
                                                                  args.decode_workers),
               "loop_prefetch_decode_threads_ms": 1e3 * time_loop(cfg, args.steps, 2, args.workers, gpu_s, 0,
                                                                  args.decode_threads)}
    b = args.batch
    print(f"{args.resolution} px, batch {b}, {args.image_size} px JPEGs, {os.cpu_count()} CPUs, "
          f"{args.workers} resize threads")
    print(f"  build a batch on demand, one thread: {row['on_demand_build_ms']:8.1f} ms  "
          f"({b / row['on_demand_build_ms'] * 1e3:7.1f} img/s)")
    print(f"  build a batch, {args.workers} resize threads: {row['threads_build_ms']:8.1f} ms  "
          f"({b / row['threads_build_ms'] * 1e3:7.1f} img/s, {row['on_demand_build_ms'] / row['threads_build_ms']:.2f}x)")
    print(f"  the same, plus {args.decode_threads} decode threads: {row['threads_decode_threads_build_ms']:8.1f} ms  "
          f"({b / row['threads_decode_threads_build_ms'] * 1e3:7.1f} img/s, "
          f"{row['on_demand_build_ms'] / row['threads_decode_threads_build_ms']:.2f}x)")
    print(f"  trainer loop with a {args.gpu_step_ms:g} ms GPU step: on demand {row['loop_on_demand_ms']:.1f} ms/step, "
          f"prefetch 2 {row['loop_prefetch_ms']:.1f} ms/step  ->  "
          f"{row['loop_on_demand_ms'] / row['loop_prefetch_ms']:.2f}x (the GPU step alone: {args.gpu_step_ms:g} ms)")
    print(f"  the same with {args.decode_workers} decode processes: "
          f"{row['loop_prefetch_decode_workers_ms']:.1f} ms/step  ->  "
          f"{row['loop_on_demand_ms'] / row['loop_prefetch_decode_workers_ms']:.2f}x")
    print(f"  the same with {args.decode_threads} decode threads instead: "
          f"{row['loop_prefetch_decode_threads_ms']:.1f} ms/step  ->  "
          f"{row['loop_on_demand_ms'] / row['loop_prefetch_decode_threads_ms']:.2f}x")
    write_json(args.json, {**run_meta(torch.device("cpu")), "cpus": os.cpu_count(), **vars(args)}, row=row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
