"""VQA evaluation: read questions (webdataset conversation shards or a jsonl file), generate answers
with a VLM in batches, score them with the official metric definitions in :mod:`mmfm.vlm.metrics`,
and write a per-category table plus a JSON with every prediction.

jsonl format, one question per line: ``{"id": ..., "image": "path.png", "question": "...",
"answers": ["...", ...], "category": "..."}`` (image paths relative to the jsonl file).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmfm.data.schemas import IMAGE_PLACEHOLDER, ConversationSample


@dataclass
class VQAItem:
    id: str
    image: torch.Tensor  # (3, H, W) in [0, 1]
    question: str
    answers: list[str]
    category: str | None = None


def _image_tensor(image) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def item_from_conversation(sample: ConversationSample) -> VQAItem:
    """First user turn is the question (placeholder removed); the last assistant turn or ``answers`` is truth."""
    if len(sample.images) != 1:
        raise ValueError(f"VQA sample {sample.key!r} has {len(sample.images)} images; evaluation expects 1")
    question = next(m.content for m in sample.messages if m.role == "user").replace(IMAGE_PLACEHOLDER, "").strip()
    answers = sample.answers or [next(m.content for m in reversed(sample.messages) if m.role == "assistant")]
    return VQAItem(sample.key, _image_tensor(sample.images[0]), question, list(answers), sample.category)


def iter_vqa(data: str | Path, limit: int | None = None) -> Iterator[VQAItem]:
    """Items from a jsonl file or from conversation shards (a directory, glob or list of tars)."""
    from PIL import Image

    path = Path(str(data))
    count = 0
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise FileNotFoundError(f"VQA jsonl file {path} does not exist")
        with path.open() as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    image = Image.open(path.parent / rec["image"])
                    yield VQAItem(str(rec.get("id", line_no)), _image_tensor(image), rec["question"],
                                  list(rec["answers"]), rec.get("category"))
                except (KeyError, json.JSONDecodeError) as err:
                    raise ValueError(f"{path}:{line_no}: bad VQA record ({err}); need image, question, answers") from err
                count += 1
                if limit and count >= limit:
                    return
        return
    from mmfm.data.shards import read_shards

    for sample in read_shards(str(data), schema="conversation"):
        yield item_from_conversation(sample)
        count += 1
        if limit and count >= limit:
            return


def evaluate_vqa(vlm, tokenizer, data: str | Path, metric: str = "vqa_accuracy", batch_size: int = 16,
                 max_new_tokens: int = 8, image_size: int | None = None, limit: int | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Generate an answer for every question and score it.

    Returns ``{"metric", "overall", "per_category", "predictions": [...]}``.
    """
    from tqdm.auto import tqdm

    from mmfm.vlm.metrics import evaluate_predictions, majority_baseline

    records: list[dict[str, Any]] = []
    batch: list[VQAItem] = []

    def flush() -> None:
        images = [item.image for item in batch]
        if image_size is not None:
            images = [torch.nn.functional.interpolate(im[None], size=(image_size, image_size), mode="bilinear",
                                                      antialias=True, align_corners=False)[0] for im in images]
        preds = vlm.answer(tokenizer, images, [item.question for item in batch], max_new_tokens=max_new_tokens)
        for item, pred in zip(batch, preds):
            records.append({"id": item.id, "question": item.question, "prediction": pred, "answers": item.answers,
                            "category": item.category})
        batch.clear()

    for item in tqdm(iter_vqa(data, limit), desc="vqa eval", disable=not progress, unit="q"):
        batch.append(item)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    summary = evaluate_predictions(records, metric)
    blind = majority_baseline(records, metric)
    summary["majority_baseline"] = {"overall": blind["overall"], "per_category": blind["per_category"],
                                    "answers": blind["answers"]}
    return {"metric": metric, **summary, "predictions": records}


def run_eval(args) -> int:
    """Back end of ``scripts/eval_vqa.py`` and ``mmfm vlm eval`` (argparse namespace in, exit code out)."""
    from mmfm.vlm.build import load
    from mmfm.vlm.metrics import format_table

    vlm, tokenizer = load(args.model, device=args.device)
    size = args.image_size or getattr(getattr(vlm, "config", None), "image_size", None)
    result = evaluate_vqa(vlm, tokenizer, args.data, metric=args.metric, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens, image_size=size, limit=args.limit)
    blind = result["majority_baseline"]
    print(format_table([{k: v for k, v in result.items() if k not in ("predictions", "majority_baseline")},
                        {"metric": f"{args.metric} (majority baseline)", **blind}]))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "predictions.json").write_text(json.dumps(result["predictions"], indent=2))
        metrics = {k: v for k, v in result.items() if k not in ("predictions", "scores")}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(f"wrote {out}/predictions.json and metrics.json")
    return 0
