"""scripts/vlm_experiment.py: the per-word caption accuracy maps tokens to the right words."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "vlm_experiment.py"


def _script():
    spec = importlib.util.spec_from_file_location("vlm_experiment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
def test_caption_word_accuracy_counts_each_kind_of_word(style):
    from mmfm.data.synth import SHAPES
    from mmfm.data.tokenizer import synthetic_tokenizer

    tok = synthetic_tokenizer()
    fn = _script().caption_word_accuracy
    perfect = fn(OracleCaptioner(tok, set()), tok, style, 96, n=20)
    kinds = {"color", "shape", "text"} | ({"cell"} if style == "grounded" else set())
    assert set(perfect) - {"words"} == kinds and all(perfect[k] == 1.0 for k in kinds)
    assert perfect["words"]["shape"] == perfect["words"]["color"] > 20  # every item has a colour and a shape
    plurals = {k + "es" if k.endswith(("s", "x")) else k + "s" for k in SHAPES}
    no_shapes = fn(OracleCaptioner(tok, set(SHAPES) | plurals), tok, style, 96, n=20)
    assert no_shapes["shape"] == 0.0 and all(no_shapes[k] == 1.0 for k in kinds - {"shape"})
