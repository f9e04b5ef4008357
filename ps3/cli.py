"""``mmfm ps3``: pre-training, evaluation and selection pictures."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ps3", help="PS3 high-resolution encoders: train, eval, select",
                              description="PS3: global low-res pass + selective high-res encoding.")
    p.set_defaults(area_parser=p)
    sub = p.add_subparsers(dest="ps3_command", metavar="COMMAND")

    t = sub.add_parser("train", help="pre-train PS3 on region shards (see scripts/train_ps3.py for launchers)")
    from mmfm.config import add_config_args

    add_config_args(t)
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--resume", action="store_true")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="selection hit rates and local retrieval on held-out region shards")
    e.add_argument("--model", required=True, help="model dir written by training (OUT/model)")
    e.add_argument("--data", required=True, help="region shards")
    e.add_argument("--n", type=int, default=64, help="number of held-out images")
    e.add_argument("--image-size", type=int, default=512)
    e.add_argument("--k", type=int, default=8, help="selection budget for the hit rates")
    e.add_argument("--out", default=None, help="write the metrics as JSON here")
    e.set_defaults(func=_cmd_eval)

    s = sub.add_parser("select", help="draw the high-res patches PS3 selects on an image")
    s.add_argument("--model", required=True, help="model dir written by training (OUT/model)")
    s.add_argument("--image", required=True)
    s.add_argument("--prompt", default=None, help="text prompt (top-down); bottom-up saliency without")
    s.add_argument("--k", type=int, default=32, help="number of high-res patches (num_look_close)")
    s.add_argument("--out", required=True, help="output PNG")
    s.set_defaults(func=_cmd_select)


def _cmd_train(args: argparse.Namespace) -> int:
    from mmfm.config import config_from_args
    from mmfm.ps3.train import PS3TrainConfig, train

    train(config_from_args(PS3TrainConfig, args), args.out, resume=args.resume)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from mmfm.ps3.evaluate import evaluate_ps3, format_table
    from mmfm.ps3.objective import ObjectiveConfig, PS3Objective
    from mmfm.ps3.train import PS3TrainConfig, eval_batches, load_model

    encoder, text = load_model(args.model)
    cfg = PS3TrainConfig(eval_samples=args.n, image_size=args.image_size)
    objective = PS3Objective(encoder, text, ObjectiveConfig())
    metrics = evaluate_ps3(objective, eval_batches(cfg, args.data), args.k)
    print(format_table(metrics))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(metrics, f, indent=2)
    return 0


def _cmd_select(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from mmfm.ps3.train import load_model
    from mmfm.ps3.visualize import save_selection

    encoder, text = load_model(args.model)
    image = Image.open(args.image).convert("RGB")
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        prompt = text([args.prompt]) if args.prompt else None
        out = encoder(x, num_look_close=args.k, prompt=prompt)
    path = save_selection(image, out.positions[0], encoder.grid_sizes(), args.out)
    print(f"wrote {path} ({args.k} patches, {'top-down: ' + args.prompt if args.prompt else 'bottom-up'})")
    return 0
