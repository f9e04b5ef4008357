"""``mmfm data``: synthetic shards, shard inspection, the synthetic tokenizer."""

from __future__ import annotations

import argparse
import json
from collections import Counter


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="write, inspect and tokenize webdataset shards",
                              description="Data tools: synthetic shapes-world shards, shard inspection, "
                                          "the offline synthetic tokenizer.")
    p.set_defaults(area_parser=p)
    sub = p.add_subparsers(dest="data_command", metavar="COMMAND")

    s = sub.add_parser("synth", help="write synthetic shards (shapes world with exact ground truth)",
                       description="Generate procedural samples and write them as webdataset shards.")
    s.add_argument("--kind", choices=("images", "regions", "vqa"), default="images",
                   help="images: caption + label; regions: boxes + local captions (PS3); vqa: conversations")
    s.add_argument("--n", type=int, default=100, help="number of samples (default: 100)")
    s.add_argument("--out", required=True, help="output directory for shard-000000.tar, ...")
    s.add_argument("--seed", type=int, default=0, help="random seed; same seed, same data (default: 0)")
    s.add_argument("--samples-per-shard", type=int, default=256, help="samples per tar shard (default: 256)")
    s.add_argument("--image-size", type=int, default=None,
                   help="square image size in pixels (default: 224 for images/vqa, 1024 for regions)")
    s.add_argument("--caption-style", choices=("global", "grounded"), default="global",
                   help="kind images: 'global' ('a red circle and two blue squares on ...') or 'grounded' "
                        "('top left: red circle; center: blue square; ...', each item with its grid cell)")
    s.set_defaults(func=_cmd_synth)

    i = sub.add_parser("inspect", help="count samples, keys and bad samples in shards",
                       description="Read shards with the fault-tolerant reader and summarise them.")
    i.add_argument("urls", nargs="+", help="shard paths, a directory, a glob or brace notation")
    i.add_argument("--schema", default="auto", choices=("auto", "image", "regions", "conversation", "raw"),
                   help="decode as this schema (auto: per sample from its JSON; raw: no decoding)")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.set_defaults(func=_cmd_inspect)

    t = sub.add_parser("tokenizer", help="build the synthetic-corpus BPE tokenizer into a directory",
                       description="Train the small byte-level BPE tokenizer on the synthetic corpus (offline) "
                                   "and save tokenizer.json + tokenizer_config.json.")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--vocab-size", type=int, default=1024, help="vocabulary size (default: 1024)")
    t.add_argument("--n-scenes", type=int, default=500, help="synthetic scenes in the corpus (default: 500)")
    t.set_defaults(func=_cmd_tokenizer)


def _cmd_synth(args: argparse.Namespace) -> int:
    from mmfm.data.synth import write_synthetic

    paths = write_synthetic(args.kind, args.n, args.out, seed=args.seed, samples_per_shard=args.samples_per_shard,
                            image_size=args.image_size, caption_style=args.caption_style)
    print(f"wrote {args.n} {args.kind} samples in {len(paths)} shard(s) to {args.out}")
    for path in paths:
        print(f"  {path}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from mmfm.data.shards import read_shards

    dataset = read_shards(args.urls if len(args.urls) > 1 else args.urls[0], schema="raw")
    decode = None if args.schema == "raw" else dataset  # second pass decodes (counts bad samples)
    keys: Counter[str] = Counter()
    per_shard: Counter[str] = Counter()
    n_raw = 0
    for sample in dataset:
        n_raw += 1
        per_shard[sample["__url__"]] += 1
        keys.update(k for k in sample if not k.startswith("__"))
    summary = {"shards": len(dataset.urls), "raw_samples": n_raw, "keys": dict(sorted(keys.items())),
               "samples_per_shard": dict(per_shard)}
    if decode is not None:
        decoded = read_shards(dataset.urls, schema=args.schema)
        types: Counter[str] = Counter(type(s).__name__ for s in decoded)
        summary.update(samples=sum(types.values()), types=dict(types))
        summary["skipped"] = dict(decoded.skipped)
    else:
        summary["skipped"] = dict(dataset.skipped)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['shards']} shard(s), {n_raw} raw samples")
    if "samples" in summary:
        print(f"decoded ({args.schema}): {summary['samples']} " + ", ".join(f"{k}={v}" for k, v in summary["types"].items()))
    print("keys: " + ", ".join(f"{k}={v}" for k, v in summary["keys"].items()))
    print("skipped: " + (", ".join(f"{k}={v}" for k, v in summary["skipped"].items()) or "none"))
    return 0


def _cmd_tokenizer(args: argparse.Namespace) -> int:
    from mmfm.data.synth import corpus_texts
    from mmfm.data.tokenizer import build_tokenizer

    tok = build_tokenizer(corpus_texts(args.n_scenes, seed=0), vocab_size=args.vocab_size, out_dir=args.out)
    print(f"wrote tokenizer ({len(tok)} tokens) to {args.out}")
    return 0
