"""scripts/vlm_experiment.py: the per-word caption accuracy maps tokens to the right words."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch


class OracleCaptioner:
    """Predicts every next token (teacher forcing), except the tokens of the words in ``wrong``."""

    image_token_id: int

    def __init__(self, tokenizer, wrong: set[str]) -> None:
        from mmfm.data.schemas import IMAGE_PLACEHOLDER

        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        self.wrong_ids = {i for w in wrong for i in tokenizer(" " + w, add_special_tokens=False)["input_ids"]}
        self.vocab = len(tokenizer)

    def tokens_per_image(self, h: int, w: int) -> int:
        return 9

    def __call__(self, input_ids, images, attention_mask=None):
        nxt = torch.roll(input_ids, -1, dims=1)
        nxt = torch.where(torch.isin(nxt, torch.tensor(sorted(self.wrong_ids))), (nxt + 1) % self.vocab, nxt)
        return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, self.vocab).float())


@pytest.mark.parametrize("style", ["grounded", "global"])
def test_caption_word_accuracy_counts_each_kind_of_word(style, load_script):
    from mmfm.data.synth import SHAPES
    from mmfm.data.tokenizer import synthetic_tokenizer

    tok = synthetic_tokenizer()
    fn = load_script("vlm_experiment").caption_word_accuracy
    perfect = fn(OracleCaptioner(tok, set()), tok, style, 96, n=20)
    kinds = {"color", "shape", "text"} | ({"cell"} if style == "grounded" else set())
    assert set(perfect) - {"words"} == kinds and all(perfect[k] == 1.0 for k in kinds)
    assert perfect["words"]["shape"] == perfect["words"]["color"] > 20  # every item has a colour and a shape
    plurals = {k + "es" if k.endswith(("s", "x")) else k + "s" for k in SHAPES}
    no_shapes = fn(OracleCaptioner(tok, set(SHAPES) | plurals), tok, style, 96, n=20)
    assert no_shapes["shape"] == 0.0 and all(no_shapes[k] == 1.0 for k in kinds - {"shape"})


def test_pretrain_encoder_is_deterministic_and_saves_the_trained_encoder(tmp_path, load_script):
    """One seed gives one pre-trained encoder, whatever the compressor (its width changes how much the
    projector draws from the generator before the pre-training head is initialised)."""
    from mmfm.config import load_config
    from mmfm.vlm.build import load
    from mmfm.vlm.train import VLMTrainConfig

    script = load_script("vlm_experiment")
    cfg = load_config(VLMTrainConfig, script.CONFIG, [])
    uncompressed = load_config(VLMTrainConfig, script.CONFIG, ["model.compressor=none"])
    a, acc = script.pretrain_encoder(cfg, tmp_path / "a", steps=3, n_images=520, batch=8)
    b, _ = script.pretrain_encoder(uncompressed, tmp_path / "b", steps=3, n_images=520, batch=8)
    assert set(acc) == {"shape", "color"} and all(0.0 <= v <= 1.0 for v in acc.values())
    enc_a, enc_b = (load(p)[0].vision_encoder.state_dict() for p in (a, b))
    assert all(torch.equal(enc_a[k], enc_b[k]) for k in enc_a)
    torch.manual_seed(cfg.seed)
    from mmfm.vlm.build import build_vlm

    untrained = build_vlm(cfg.model)[0].vision_encoder.state_dict()
    assert any(not torch.equal(enc_a[k], untrained[k]) for k in enc_a)  # the saved encoder is the trained one


def test_pretrain_encoder_needs_whole_grid_cells(tmp_path, load_script):
    from mmfm.config import load_config
    from mmfm.vlm.train import VLMTrainConfig

    script = load_script("vlm_experiment")
    cfg = load_config(VLMTrainConfig, script.CONFIG, ["model.image_size=64"])  # 4 tokens per side
    with pytest.raises(ValueError, match="not a multiple of 3"):
        script.pretrain_encoder(cfg, tmp_path, steps=1, n_images=520)


def test_make_data_links_one_set_per_training_seed(tmp_path, load_script):
    """--train-seeds: n samples per seed, each seed's own scenes, all linked into data/vqa; a set already in
    place (e.g. linked from another run) is kept, not regenerated; seed 1 (held out) is refused."""
    from mmfm.data.shards import read_shards

    script = load_script("vlm_experiment")
    one = script.make_data(tmp_path / "one", n_train=6, n_test=2, n_captions=0)  # the default: seed 0 only
    (tmp_path / "two" / "data").mkdir(parents=True)
    (tmp_path / "two" / "data" / "vqa-s0").symlink_to(one["train"].resolve())
    two = script.make_data(tmp_path / "two", n_train=6, n_test=2, n_captions=0, train_seeds=(0, 5), workers=2)
    links = sorted(p.name for p in two["train"].iterdir())
    assert links == ["s0-shard-000000.tar", "s5-shard-000000.tar"] and all(
        p.is_symlink() for p in two["train"].iterdir())

    def questions(path):
        return [str(x.messages) for x in read_shards(path, schema="conversation")]

    seed0 = questions(one["train"])
    assert questions(two["train"].with_name("vqa-s0")) == seed0
    seed5 = questions(two["train"].with_name("vqa-s5"))
    assert len(seed5) == 6 and seed5 != seed0
    with pytest.raises(ValueError, match="held-out"):
        script.make_data(tmp_path / "three", n_train=6, n_test=2, n_captions=0, train_seeds=(0, 1))
