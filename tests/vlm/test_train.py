"""VLM stages end to end on tiny synthetic data: conversation encoding, exact resume, save/load, VQA eval."""

from __future__ import annotations

import json

import pytest
import torch

from mmfm.config import load_config
from mmfm.data.schemas import ConversationSample, Message
from mmfm.data.synth import write_synthetic
from mmfm.data.tokenizer import IGNORE_INDEX
from mmfm.vlm.build import VLMConfig, build_vlm, load, save_vlm
from mmfm.vlm.conversation import build_prompts, encode_sample
from mmfm.vlm.train import VLMTrainConfig, set_trainable, train


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    write_synthetic("vqa", 24, root / "train", seed=0, samples_per_shard=12, image_size=64)
    write_synthetic("vqa", 6, root / "test", seed=1, image_size=64)
    return root


def tiny_cfg(shards, steps: int, extra=()) -> VLMTrainConfig:
    return load_config(VLMTrainConfig, None, [
        "model.image_size=32", "model.projector_hidden=32", f"train_shards={shards / 'train'}", "batch_size=4",
        "shuffle_buffer=8", f"steps={steps}", "ckpt_every=2", "max_length=64", "engine.optimizer.total_steps=6",
        *extra])


def test_encoding_expands_placeholders_and_masks_labels():
    from PIL import Image

    vlm, tok = build_vlm(VLMConfig(image_size=64))
    k = vlm.tokens_per_image(64, 64)
    assert k == 4  # 4x4 patches, 2x2 pixel-unshuffle
    sample = ConversationSample("s", [Image.new("RGB", (80, 80))],
                                [Message("user", "<image>\nWhat colour?"), Message("assistant", "red")])
    enc = encode_sample(sample, tok, vlm.image_token_id, vlm.tokens_per_image, image_size=64)
    assert enc.input_ids.count(vlm.image_token_id) == k
    answer = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]
    assert tok.decode(answer, skip_special_tokens=True).strip() == "red"
    ids, mask = build_prompts(tok, ["short?", "a much longer question here?"], vlm.image_token_id, k)
    assert mask[:, -1].all() and mask[0, 0] == 0  # left padded


def test_image_position_after_text_puts_placeholders_after_the_question():
    from PIL import Image

    from mmfm.vlm.conversation import place_images

    assert place_images("<image>\nWhat colour?", "after_text") == "What colour?\n<image>"
    assert place_images("What colour?\n<image>", "first") == "<image>\nWhat colour?"
    assert place_images("no image", "after_text") == "no image"
    with pytest.raises(ValueError, match="image_position"):
        place_images("<image>", "middle")
    vlm, tok = build_vlm(VLMConfig(image_size=64))
    sample = ConversationSample("s", [Image.new("RGB", (64, 64))],
                                [Message("user", "<image>\nWhat colour?"), Message("assistant", "red")])
    first = encode_sample(sample, tok, vlm.image_token_id, vlm.tokens_per_image, image_size=64)
    after = encode_sample(sample, tok, vlm.image_token_id, vlm.tokens_per_image, image_size=64,
                          image_position="after_text")
    q = tok.encode("What colour?", add_special_tokens=False)

    def index(ids, sub):
        return next(i for i in range(len(ids)) if ids[i:i + len(sub)] == sub)

    img_first, img_after = first.input_ids.index(vlm.image_token_id), after.input_ids.index(vlm.image_token_id)
    assert img_first < index(first.input_ids, q) and img_after > index(after.input_ids, q)
    assert sorted(first.input_ids) == sorted(after.input_ids)  # same tokens, reordered
    answer = [t for t, lab in zip(after.input_ids, after.labels) if lab != IGNORE_INDEX]
    assert tok.decode(answer, skip_special_tokens=True).strip() == "red"
    ids, _ = build_prompts(tok, ["What colour?"], vlm.image_token_id, 4, image_position="after_text")
    row = ids[0].tolist()
    assert row.index(vlm.image_token_id) > index(row, q)


def test_align_stage_trains_only_the_projector():
    vlm, _ = build_vlm(VLMConfig())
    set_trainable(vlm, "align", train_encoder=False)
    trainable = {n.split(".")[0] for n, p in vlm.named_parameters() if p.requires_grad}
    assert trainable == {"projector"}
    set_trainable(vlm, "finetune", train_encoder=False)
    assert {n.split(".")[0] for n, p in vlm.named_parameters() if p.requires_grad} == {"projector", "language_model"}


def test_train_resume_exact_then_load_and_evaluate(shards, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    extra = [f"eval_shards={shards / 'test'}", "eval_samples=6"]
    result = train(tiny_cfg(shards, 6, extra), full, progress=False)
    train(tiny_cfg(shards, 2), part, progress=False)
    train(tiny_cfg(shards, 6), part, resume=True, progress=False)
    read = lambda run: [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert read(part) == pytest.approx(read(full), rel=0, abs=1e-6)
    assert 0.0 <= result["eval"]["overall"] <= 1.0 and result["eval"]["count"] == 6
    assert "majority_baseline" in result["eval"]
    vlm, tok = load(full / "model")
    vlm2, _ = load(part / "model")
    ids, mask = build_prompts(tok, ["What colour?"], vlm.image_token_id, vlm.tokens_per_image(32, 32))
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vlm(ids, images, mask).logits, vlm2(ids, images, mask).logits)
    assert isinstance(vlm.generate(images, "What colour?", max_new_tokens=3, tokenizer=tok)[0], str)


@pytest.mark.parametrize("vit", [{}, {"embed_dim": 48, "depth": 3, "num_heads": 3}])
def test_save_load_round_trip_is_exact(tmp_path, vit):
    from mmfm.vlm.build import EncoderSpec

    vlm, tok = build_vlm(VLMConfig(image_size=32, compressor="avgpool", encoder=EncoderSpec(vit=vit)))
    if vit:  # the overrides reach the random student
        assert (vlm.vision_encoder.student.cfg.embed_dim, len(vlm.vision_encoder.student.blocks)) == (48, 3)
    save_vlm(vlm, tok, tmp_path)
    again, _ = load(tmp_path)
    ids = torch.tensor([[tok.bos_token_id] + [vlm.image_token_id] + [7, 8]])
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(ids, images).logits, vlm.eval()(ids, images).logits)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load(tmp_path)
