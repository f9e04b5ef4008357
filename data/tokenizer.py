"""Tokenizers: load a Hugging Face tokenizer from a local directory, or build a small byte-level BPE
offline (``tokenizers`` library) for the demo and tests; a chat template with image placeholders.

Chat format (text form; every marker is one special token)::

    <s><|user|><image>
    What colour is the circle?</s><|assistant|>red</s>

:func:`apply_chat_template` returns ``input_ids`` and ``labels`` where every position except the
assistant answers and their closing ``</s>`` is ``-100`` (ignored by the LM loss); each ``<image>``
placeholder stays one ``<image>`` token, to be replaced by visual embeddings downstream.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

IMAGE_TOKEN = "<image>"
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<s>", "</s>", "<unk>"
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, IMAGE_TOKEN, *ROLE_TOKENS.values()]
IGNORE_INDEX = -100

# The same format as a Jinja template, so ``tokenizer.apply_chat_template`` (transformers) renders
# the identical text.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

SYNTH_TOKENIZER_VERSION = 1  # bump when the synthetic corpus or the recipe changes (new cache dir)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 1024, out_dir: str | Path | None = None) -> Any:
    """Train a byte-level BPE tokenizer on ``texts`` (offline) and wrap it as a
    ``transformers.PreTrainedTokenizerFast`` with pad/bos/eos/unk, ``<image>`` and role tokens and
    the chat template. Saved to ``out_dir`` (``tokenizer.json`` + config) when given.

    Byte-level: any text encodes (no unknown characters) and decodes back exactly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    min_vocab = 256 + len(SPECIAL_TOKENS)
    if not isinstance(vocab_size, int) or vocab_size < min_vocab:
        raise ValueError(f"vocab_size={vocab_size!r}: must be an int >= {min_vocab} (256 bytes + special tokens)")
    texts = [t for t in texts if isinstance(t, str) and t]
    if not texts:
        raise ValueError("texts: need at least one non-empty string to train the tokenizer on")
    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    hf = _wrap(tok)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        hf.save_pretrained(str(out_dir))
    return hf


def _wrap(tok: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD_TOKEN, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                                 unk_token=UNK_TOKEN,
                                 additional_special_tokens=[IMAGE_TOKEN, *ROLE_TOKENS.values()])
    hf.chat_template = CHAT_TEMPLATE
    return hf


def load_tokenizer(path: str | Path) -> Any:
    """Load a Hugging Face tokenizer from a local directory (never downloads).

    The directory needs ``tokenizer.json`` (fast tokenizer) or ``tokenizer_config.json`` with the
    files it names (e.g. ``tokenizer.model``); a missing directory or files is a FileNotFoundError.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"tokenizer path {str(p)!r} is not a directory; pass a local directory holding "
                                "tokenizer.json (build one with `mmfm data tokenizer --out DIR`)")
    has_json, has_config = (p / "tokenizer.json").is_file(), (p / "tokenizer_config.json").is_file()
    if not has_json and not has_config:
        raise FileNotFoundError(f"tokenizer directory {str(p)!r} has neither tokenizer.json nor "
                                f"tokenizer_config.json (found: {sorted(x.name for x in p.iterdir())})")
    if has_config:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    return PreTrainedTokenizerFast(tokenizer_file=str(p / "tokenizer.json"))


def cache_root() -> Path:
    """``$MMFM_CACHE`` or ``~/.cache/mmfm``."""
    env = os.environ.get("MMFM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mmfm"


def synthetic_tokenizer(cache_dir: str | Path | None = None, vocab_size: int = 1024, n_scenes: int = 500) -> Any:
    """The default tokenizer for the demo and tests: BPE trained on the synthetic corpus
    (:func:`mmfm.data.synth.corpus_texts`), built once and cached under
    ``cache_dir`` (default :func:`cache_root`) ``/tokenizer-synth-v{version}-{vocab_size}-{n_scenes}``."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / f"tokenizer-synth-v{SYNTH_TOKENIZER_VERSION}-{vocab_size}-{n_scenes}"
    if (target / "tokenizer.json").is_file():
        return load_tokenizer(target)
    from mmfm.data.synth import corpus_texts

    root.mkdir(parents=True, exist_ok=True)
    # Build in a temporary sibling and rename: parallel test processes never see a half-written dir.
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-tokenizer-", dir=root))
    try:
        build_tokenizer(corpus_texts(n_scenes, seed=0), vocab_size=vocab_size, out_dir=tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "tokenizer.json").is_file():  # lost the race to a complete copy: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(target)


def _message_fields(message: Any) -> tuple[str, str]:
    if isinstance(message, dict):
        role, content = message.get("role"), message.get("content")
    else:
        role, content = getattr(message, "role", None), getattr(message, "content", None)
    if role not in ROLES:
        raise ValueError(f"message role {role!r}: must be one of {ROLES}")
    if not isinstance(content, str):
        raise TypeError(f"message content must be a str, got {type(content).__name__}")
    return role, content


def render_chat(messages: Sequence[Any], add_generation_prompt: bool = False) -> str:
    """The chat as text (same as :data:`CHAT_TEMPLATE`)."""
    parts = [BOS_TOKEN]
    for message in messages:
        role, content = _message_fields(message)
        parts.append(f"{ROLE_TOKENS[role]}{content}{EOS_TOKEN}")
    if add_generation_prompt:
        parts.append(ROLE_TOKENS["assistant"])
    return "".join(parts)


def apply_chat_template(tokenizer: Any, messages: Sequence[Any], add_generation_prompt: bool = False,
                        ) -> dict[str, Any]:
    """Tokenize a conversation (``messages``: dicts or :class:`~mmfm.data.schemas.Message` with
    ``role`` in system/user/assistant) for training or generation.

    Returns ``{"input_ids": list[int], "labels": list[int], "text": str, "num_images": int}``;
    ``labels[i] == input_ids[i]`` on assistant answer tokens and their closing ``</s>``, ``-100``
    elsewhere. ``add_generation_prompt`` appends ``<|assistant|>`` (for generation).
    """
    special = {t: tokenizer.convert_tokens_to_ids(t) for t in (BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN, *ROLE_TOKENS.values())}
    missing = [t for t, i in special.items() if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"tokenizer lacks the special tokens {missing}; build it with build_tokenizer() or add "
                         "them with tokenizer.add_special_tokens(...)")
    ids: list[int] = [special[BOS_TOKEN]]
    labels: list[int] = [IGNORE_INDEX]
    for message in messages:
        role, content = _message_fields(message)
        # Each segment is bounded by special tokens, so segment-wise encoding equals encoding the
        # whole rendered text (checked in the tests).
        body = tokenizer(content, add_special_tokens=False)["input_ids"] if content else []
        ids += [special[ROLE_TOKENS[role]], *body, special[EOS_TOKEN]]
        if role == "assistant":
            labels += [IGNORE_INDEX, *(IGNORE_INDEX if t == special[IMAGE_TOKEN] else t for t in body),
                       special[EOS_TOKEN]]
        else:
            labels += [IGNORE_INDEX] * (len(body) + 2)
    if add_generation_prompt:
        ids.append(special[ROLE_TOKENS["assistant"]])
        labels.append(IGNORE_INDEX)
    return {"input_ids": ids, "labels": labels, "text": render_chat(messages, add_generation_prompt),
            "num_images": ids.count(special[IMAGE_TOKEN])}
