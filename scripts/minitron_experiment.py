"""Minitron on a tiny Nemotron-H, on CPU: train a teacher on synthetic text, prune ~50% of its
parameters, retrain by distillation, and compare against the baselines the seeds compare against.

Rows of the printed table (held-out LM loss and perplexity):
  teacher | pruned (group-aware), no retraining | pruned + KD | same architecture from scratch
  (same step budget) | naive (group-unaware) Mamba head pruning + KD

Usage: python scripts/minitron_experiment.py [--teacher-steps 400] [--retrain-steps 150] [--out DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from transformers import NemotronHForCausalLM

from mmfm.vlm.compress import (
    DistillConfig,
    PruneTarget,
    distill,
    estimate_importance,
    lm_loss,
    num_parameters,
    prune,
)
from mmfm.vlm.decoder import tiny_nemotron_h


def token_batches(n_texts: int, seq_len: int, batch_size: int, seed: int) -> tuple[list[torch.Tensor], int]:
    """Pack the synthetic corpus into ``(batch_size, seq_len)`` id batches; returns batches and vocab size."""
    from mmfm.data.synth import corpus_texts
    from mmfm.data.tokenizer import synthetic_tokenizer

    tok = synthetic_tokenizer()
    texts = corpus_texts(n_texts, seed=seed)
    ids: list[int] = []
    for text in texts:
        ids.extend(tok(text)["input_ids"] + [tok.eos_token_id])
    n = len(ids) // (seq_len * batch_size) * seq_len * batch_size
    flat = torch.tensor(ids[:n]).view(-1, batch_size, seq_len)
    return list(flat.unbind(0)), len(tok)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-steps", type=int, default=400)
    parser.add_argument("--retrain-steps", type=int, default=150)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/minitron")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(torch.get_num_threads(), 1))

    train, vocab = token_batches(6000, args.seq_len, args.batch_size, seed=args.seed)
    held_out, _ = token_batches(600, args.seq_len, args.batch_size, seed=args.seed + 1)
    held_out = held_out[:8]
    calibration = train[:4]
    arch = dict(vocab_size=vocab, hidden_size=128, pattern="M-M*M-M-", mamba_heads=16, mamba_head_dim=16,
                n_groups=4, num_heads=4, num_kv_heads=2, state_size=16, intermediate_size=384)
    start = time.perf_counter()
    teacher = tiny_nemotron_h(**arch)
    distill(teacher, None, train, DistillConfig(steps=args.teacher_steps, lr=3e-3, warmup=20), log_every=1)
    teacher.eval()
    rows = [("teacher", teacher, None)]

    imp = estimate_importance(teacher, calibration)
    target = PruneTarget(hidden_size=96, ffn_intermediate=192, attention_heads=2, mamba_heads=8, mamba_head_dim=12)
    pruned = prune(teacher, imp, target)
    rows.append(("pruned, no retraining", pruned, None))

    kd_cfg = DistillConfig(steps=args.retrain_steps, lr=1e-3, warmup=10, temperature=1.0)
    pruned_kd = copy.deepcopy(pruned)
    kd_losses = distill(pruned_kd, teacher, train, kd_cfg, log_every=1)
    rows.append(("pruned (group-aware) + KD", pruned_kd, kd_losses))

    # Same shapes as the pruned model: rebuild from its config so every width matches exactly.
    scratch = NemotronHForCausalLM(copy.deepcopy(pruned.config))
    scratch_losses = distill(scratch, None, train, DistillConfig(steps=args.retrain_steps, lr=3e-3, warmup=10),
                             log_every=1)
    rows.append(("same arch from scratch (LM loss, same steps)", scratch, scratch_losses))

    naive = prune(teacher, imp, PruneTarget(**{**target.__dict__, "group_aware": False}))
    naive_before = lm_loss(naive, held_out)
    naive_kd = copy.deepcopy(naive)
    naive_losses = distill(naive_kd, teacher, train, kd_cfg, log_every=1)
    rows.append(("naive head pruning + KD", naive_kd, naive_losses))

    results = []
    print(f"\nMinitron on tiny Nemotron-H (CPU), teacher {args.teacher_steps} steps, retrain {args.retrain_steps} steps")
    print(f"{'model':48s} {'params':>9s} {'held-out loss':>14s} {'ppl':>8s}")
    for name, model, _ in rows:
        loss = lm_loss(model.eval(), held_out)
        results.append({"model": name, "params": num_parameters(model), "loss": loss, "ppl": math.exp(loss)})
        print(f"{name:48s} {num_parameters(model):9d} {loss:14.4f} {math.exp(loss):8.2f}")
    print(f"(naive head pruning before KD: held-out loss {naive_before:.4f})")
    ratio = num_parameters(pruned) / num_parameters(teacher)
    print(f"pruned / teacher parameters: {ratio:.2f}; total time {time.perf_counter() - start:.0f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "minitron.json").write_text(json.dumps({"rows": results, "naive_before_kd": naive_before,
                                                  "param_ratio": ratio, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
