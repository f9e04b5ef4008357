"""Tokenizer: offline BPE build, save/load through transformers, chat template and label masking."""

from __future__ import annotations

import pytest

from mmfm.data.schemas import Message
from mmfm.data.tokenizer import (
    CHAT_TEMPLATE,
    IGNORE_INDEX,
    IMAGE_TOKEN,
    apply_chat_template,
    build_tokenizer,
    load_tokenizer,
    render_chat,
    synthetic_tokenizer,
)

TEXTS = [
    "a red circle above a blue square", "two green triangles on a striped background",
    "What colour is the circle?", "How many squares are there?", "red", "blue", "two", "yes", "no",
    "Is there a yellow star left of the triangle?", "the text says HELLO", "a small purple hexagon",
] * 5


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    build_tokenizer(TEXTS, vocab_size=300, out_dir=out)
    return load_tokenizer(out)


def test_build_save_load_roundtrip(tok, tmp_path):
    from transformers import PreTrainedTokenizerFast

    assert isinstance(tok, PreTrainedTokenizerFast)
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<s>", "</s>", "<unk>")
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4
    for text in ["a red circle above a blue square", "Unseen wörds & ünïcode 123 ✓", "  spaced\nlines  "]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text  # byte-level: exact round trip, no <unk>
        assert tok.unk_token_id not in ids
    # <image> stays one token, also glued to words.
    ids = tok(f"x{IMAGE_TOKEN}y", add_special_tokens=False)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids(IMAGE_TOKEN)) == 1
    # Also loadable with the tokenizer.json alone.
    (tmp_path / "only").mkdir()
    tok.backend_tokenizer.save(str(tmp_path / "only" / "tokenizer.json"))
    alone = load_tokenizer(tmp_path / "only")
    assert alone("a red circle")["input_ids"] == tok("a red circle")["input_ids"]


def test_trained_merges_compress_the_corpus(tok):
    text = "a red circle above a blue square"
    assert len(tok(text)["input_ids"]) < len(text.encode()) / 2  # BPE learned the corpus words


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "vocab.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"neither tokenizer.json nor tokenizer_config.json.*vocab.txt"):
        load_tokenizer(tmp_path / "empty")


def test_build_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(TEXTS, vocab_size=10)
    with pytest.raises(ValueError, match="texts"):
        build_tokenizer(["", ""], vocab_size=300)


MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": f"{IMAGE_TOKEN}\nWhat colour is the circle?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": f"And this one? {IMAGE_TOKEN}"},
    {"role": "assistant", "content": "two blue squares"},
]


def test_chat_template_ids_and_labels(tok):
    out = apply_chat_template(tok, MESSAGES)
    ids, labels = out["input_ids"], out["labels"]
    assert len(ids) == len(labels)
    # Independent reference: encoding the rendered text in one go gives the same ids.
    assert ids == tok(out["text"], add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == out["text"]
    # transformers renders the same text from the stored Jinja template.
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.apply_chat_template(MESSAGES, tokenize=False) == out["text"]
    # Labels: exactly the assistant answers and their closing </s>.
    kept = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ids, labels))
    eos = tok.eos_token_id
    expected = (tok("red", add_special_tokens=False)["input_ids"] + [eos]
                + tok("two blue squares", add_special_tokens=False)["input_ids"] + [eos])
    assert kept == expected
    assert tok.decode(kept) == "red</s>two blue squares</s>"
    # Image placeholders stay as single <image> tokens, masked out.
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    assert out["num_images"] == 2 and ids.count(image_id) == 2
    assert all(lab == IGNORE_INDEX for t, lab in zip(ids, labels) if t == image_id)


def test_chat_template_generation_prompt_and_messages(tok):
    msgs = [Message("user", f"{IMAGE_TOKEN} How many?")]
    out = apply_chat_template(tok, msgs, add_generation_prompt=True)
    assert out["text"] == f"<s><|user|>{IMAGE_TOKEN} How many?</s><|assistant|>"
    assert out["text"] == render_chat(msgs, add_generation_prompt=True)
    assert out["input_ids"][-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert set(out["labels"]) == {IGNORE_INDEX}
    with pytest.raises(ValueError, match="role"):
        apply_chat_template(tok, [{"role": "bot", "content": "x"}])


def test_chat_template_rejects_tokenizer_without_special_tokens():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    with pytest.raises(ValueError, match="lacks the special tokens"):
        apply_chat_template(plain, MESSAGES)


def test_synthetic_tokenizer_cached(tmp_path, monkeypatch):
    pytest.importorskip("mmfm.data.synth")
    monkeypatch.setenv("MMFM_CACHE", str(tmp_path))
    first = synthetic_tokenizer(vocab_size=400, n_scenes=30)
    cached = list(tmp_path.glob("tokenizer-synth-*/tokenizer.json"))
    assert len(cached) == 1
    second = synthetic_tokenizer(vocab_size=400, n_scenes=30)  # loaded from the cache
    text = "What colour is the circle?"
    assert first(text)["input_ids"] == second(text)["input_ids"]
    assert len(first(text)["input_ids"]) < len(text)
    assert not list(tmp_path.glob(".tmp-*"))
