"""Where a RADIO distillation step's student phase spends its time: backbone vs adaptor heads vs losses.

Builds the step of ``bench_radio_train.py`` (ViT-B/16 student, CLIP-L + DINOv2-L teachers) at one partition and
times, on the same inputs: the Engine's full forward + backward (heads and losses included), the encoder with all
its heads under a plain sum-of-squares loss, the backbone alone forward + backward, and the backbone forward
alone. Then one profiled full forward + backward: the top ops and kernels by self GPU time, and the top aten ops
by input shape (which tensor a copy or a reduction is on).

    python scripts/profile_radio_student.py                 # 432 px, batch 64, on the GPU
    python scripts/profile_radio_student.py --compile       # the same with compiled blocks (``compile: true``)
    python scripts/profile_radio_student.py --tiny          # CPU smoke run with tiny models
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from mmfm.radio.distill import StepPlan, TargetMaker, compile_models, setup
from mmfm.training import Engine


def main() -> int:
    import bench_radio_train as bench  # scripts/ is on sys.path when this file is run

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=432)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run with tiny models")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the blocks, adaptor MLPs and loss terms, as compile: true does")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (RadioTrainConfig.compile_mode)")
    args = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        args.resolution, args.batch, args.iters = 64, 4, 2
    res, b = args.resolution, args.batch
    cfg = bench.make_config(args.tiny, res, 1024, b, 16, "bf16" if dev.type == "cuda" else "fp32")
    teachers, infos, model, norms = setup(cfg, dev)
    if args.compile:  # no FLOP counter runs here, so compiled blocks stay compiled (mmfm.radio.flops)
        compile_models(model, teachers, args.compile_mode)
    engine = Engine.from_config(model, cfg.engine, micro_batch_size=b)
    maker = TargetMaker(cfg, teachers, infos, norms, engine.device)
    plan = StepPlan(0, (res, res), 1)
    x = torch.rand(b, 3, res, res, device=dev)
    bench.prime_normalizers(maker, plan, x)
    targets = maker.targets(plan, maker.teacher_outputs(plan, x))
    engine.train()
    enc = model.encoder

    def clear() -> None:
        for prm in model.parameters():
            prm.grad = None

    def full() -> None:
        engine.backward(engine.forward(x, targets)["loss"])
        clear()

    def encoder_heads() -> None:
        with engine.autocast():
            out = enc(x, feature_fmt="NCHW")
            loss = sum(o.features.float().square().mean()
                       + (o.summary.float().square().mean() if o.summary is not None else 0.0)
                       for n, o in out.items() if n != "backbone" and o.features is not None)
        loss.backward()
        clear()

    def backbone() -> None:
        with engine.autocast():
            tokens = enc.student.forward_tokens(enc.input_conditioner(x, torch.float32))
        tokens.float().square().mean().backward()
        clear()

    def backbone_forward() -> None:
        with torch.no_grad(), engine.autocast():
            enc.student.forward_tokens(enc.input_conditioner(x, torch.float32))

    print(f"{res} px, batch {b}, {dev.type}"
          + (f" ({torch.cuda.get_device_name(dev)}, torch {torch.__version__})" if dev.type == "cuda" else ""))
    for label, fn in [("full forward + backward (Engine: heads + losses)", full),
                      ("encoder with every head, sum-of-squares loss", encoder_heads),
                      ("backbone alone, forward + backward", backbone),
                      ("backbone alone, forward (no grad)", backbone_forward)]:
        print(f"  {label}: {bench.time_ms(fn, dev, args.iters):.1f} ms", flush=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts, record_shapes=True) as prof:
        full()
        bench.sync(dev)
    print("top ops and kernels by self device time, one full forward + backward:")
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:28]:
        print(f"  {e.self_device_time_total / 1e3:7.2f} ms  n={e.count:4d}  {e.key[:110]}")
    print("top aten ops by input shape:")
    shaped = [e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")]
    for e in sorted(shaped, key=lambda e: -e.self_device_time_total)[:22]:
        print(f"  {e.self_device_time_total / 1e3:7.2f} ms  n={e.count:4d}  {e.key[:40]}  {str(e.input_shapes)[:120]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
