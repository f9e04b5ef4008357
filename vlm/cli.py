"""``mmfm vlm``: train, evaluate, chat, export, and Minitron prune / distill of hybrid decoders."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from mmfm.config import add_config_args

    p = subparsers.add_parser("vlm", help="vision-language models: train, eval, chat, export, prune, distill",
                              description="VLMs on hybrid Mamba-Transformer decoders.")
    p.set_defaults(area_parser=p)
    sub = p.add_subparsers(dest="vlm_command", metavar="COMMAND")

    t = sub.add_parser("train", help="one training stage (align or finetune); see scripts/train_vlm.py to launch")
    add_config_args(t)
    t.add_argument("--out", required=True)
    t.add_argument("--resume", action="store_true")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="VQA evaluation (same as scripts/eval_vqa.py)")
    e.add_argument("--model", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--metric", default="vqa_accuracy")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--max-new-tokens", type=int, default=8)
    e.add_argument("--image-size", type=int, default=None)
    e.add_argument("--limit", type=int, default=None)
    e.add_argument("--device", default="cpu")
    e.add_argument("--out", default=None)
    e.set_defaults(func=_cmd_eval)

    c = sub.add_parser("chat", help="ask questions about an image; answers stream token by token")
    c.add_argument("--model", required=True)
    c.add_argument("--image", required=True)
    c.add_argument("--question", default=None, help="one question (otherwise read questions from stdin)")
    c.add_argument("--max-new-tokens", type=int, default=32)
    c.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    c.add_argument("--top-p", type=float, default=1.0)
    c.set_defaults(func=_cmd_chat)

    x = sub.add_parser("export", help="write the HF nemotron_h_omni format (RADIO + pixel shuffle + MLP + NemotronH)")
    x.add_argument("--model", required=True)
    x.add_argument("--out", required=True)
    x.set_defaults(func=_cmd_export)

    pr = sub.add_parser("prune", help="Minitron pruning of a Nemotron-H language model (HF dir -> HF dir)")
    pr.add_argument("--model", required=True, help="local NemotronH directory")
    pr.add_argument("--out", required=True)
    pr.add_argument("--calib-texts", default=None, help="text file, one sample per line (default: synthetic corpus)")
    pr.add_argument("--calib-batches", type=int, default=8)
    pr.add_argument("--hidden-size", type=int, default=None)
    pr.add_argument("--ffn", type=int, default=None, help="MLP intermediate size")
    pr.add_argument("--attention-heads", type=int, default=None)
    pr.add_argument("--mamba-heads", type=int, default=None, help="multiple of n_groups")
    pr.add_argument("--mamba-head-dim", type=int, default=None)
    pr.add_argument("--drop-layers", type=int, default=0)
    pr.add_argument("--naive-groups", action="store_true", help="group-unaware head ranking (baseline)")
    pr.set_defaults(func=_cmd_prune)

    d = sub.add_parser("distill", help="logit-KD retraining of a pruned student from its teacher")
    d.add_argument("--teacher", required=True)
    d.add_argument("--student", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--texts", default=None, help="text file, one sample per line (default: synthetic corpus)")
    d.add_argument("--steps", type=int, default=200)
    d.add_argument("--lr", type=float, default=1e-3)
    d.add_argument("--temperature", type=float, default=1.0)
    d.add_argument("--lm-weight", type=float, default=0.0)
    d.set_defaults(func=_cmd_distill)


def _cmd_train(args: argparse.Namespace) -> int:
    from mmfm.config import config_from_args
    from mmfm.vlm.train import VLMTrainConfig, train

    train(config_from_args(VLMTrainConfig, args), args.out, resume=args.resume)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from mmfm.vlm.evaluate import run_eval

    return run_eval(args)


def _cmd_chat(args: argparse.Namespace) -> int:
    import sys

    from PIL import Image

    from mmfm.vlm.build import load
    from mmfm.vlm.conversation import image_to_tensor

    vlm, tok = load(args.model)
    image = image_to_tensor(Image.open(args.image), vlm.config.image_size)[None]
    questions = [args.question] if args.question else (line.strip() for line in sys.stdin if line.strip())
    for q in questions:
        print(f"Q: {q}\nA: ", end="", flush=True)

        def stream(tokens, _tok=tok):
            print(_tok.decode(tokens.tolist(), skip_special_tokens=True), end="", flush=True)

        vlm.generate(image, q, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                     temperature=args.temperature or 1.0, top_p=args.top_p, tokenizer=tok, on_token=stream)
        print()
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from mmfm.vlm.build import load
    from mmfm.vlm.hf_interop import export_hf_omni

    vlm, tok = load(args.model)
    print(f"wrote {export_hf_omni(vlm, tok, args.out)}")
    return 0


def _text_batches(path: str | None, tokenizer, n_batches: int, batch_size: int = 8, seq_len: int = 64):
    import torch

    if path:
        with open(path) as f:
            texts = [line.strip() for line in f if line.strip()]
    else:
        from mmfm.data.synth import corpus_texts

        texts = corpus_texts(n_batches * batch_size * 8)
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]
    n = min(len(ids) // (seq_len * batch_size), n_batches)
    if n == 0:
        raise ValueError(f"not enough text for one batch of {batch_size}x{seq_len} tokens")
    return list(torch.tensor(ids[:n * seq_len * batch_size]).view(n, batch_size, seq_len).unbind(0))


def _load_lm_and_tokenizer(path: str):
    from transformers import AutoTokenizer

    from mmfm.data.tokenizer import synthetic_tokenizer
    from mmfm.vlm.decoder import load_causal_lm

    lm = load_causal_lm(path).eval()
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        tok = synthetic_tokenizer()
    return lm, tok


def _cmd_prune(args: argparse.Namespace) -> int:
    from mmfm.vlm.compress import PruneTarget, estimate_importance, num_parameters, prune

    lm, tok = _load_lm_and_tokenizer(args.model)
    batches = _text_batches(args.calib_texts, tok, args.calib_batches)
    imp = estimate_importance(lm, batches, layers=args.drop_layers > 0)
    target = PruneTarget(hidden_size=args.hidden_size, ffn_intermediate=args.ffn, attention_heads=args.attention_heads,
                         mamba_heads=args.mamba_heads, mamba_head_dim=args.mamba_head_dim,
                         drop_layers=args.drop_layers, group_aware=not args.naive_groups)
    pruned = prune(lm, imp, target)
    pruned.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(f"pruned {num_parameters(lm):,} -> {num_parameters(pruned):,} parameters; wrote {args.out}")
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from mmfm.vlm.compress import DistillConfig, distill, lm_loss

    teacher, tok = _load_lm_and_tokenizer(args.teacher)
    student, _ = _load_lm_and_tokenizer(args.student)
    batches = _text_batches(args.texts, tok, 64)
    held = batches[-4:]
    before = lm_loss(student, held)
    distill(student, teacher, batches[:-4], DistillConfig(steps=args.steps, lr=args.lr, temperature=args.temperature,
                                                          lm_weight=args.lm_weight), log_every=1)
    print(f"held-out LM loss {before:.4f} -> {lm_loss(student, held):.4f} (teacher {lm_loss(teacher, held):.4f})")
    student.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    return 0
