"""VQA metrics against hand computations from the official definitions.

References: VQA API ``vqaEval.py`` (GT-Vision-Lab/VQA: processPunctuation, processDigitArticle,
leave-one-out accuracy), lmms-eval ``vqav2_process_results`` / ``EvalAIAnswerProcessor``, lmms-eval
``anls`` (= the DocVQA RRC script), ChartQA ``relaxed_correctness`` (pix2struct / lmms-eval).
"""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmfm.vlm.metrics import (
    anls,
    evaluate_predictions,
    exact_match,
    format_table,
    levenshtein,
    majority_baseline,
    multiple_choice_accuracy,
    normalize_answer,
    parse_multiple_choice,
    process_digit_article,
    process_punctuation,
    relaxed_accuracy,
    vqa_accuracy,
)


# ---------------------------------------------------------------------------------- normalisation
@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two", "2"),                  # manualMap (after lower-casing)
        ("the dog.", "dog"),           # article + trailing period
        ("isnt", "isn't"),             # contractions map
        ("1,000", "1000"),             # comma inside a number
        ("3.5", "3.5"),                # period followed by a digit is kept
        ("yes!", "yes"),               # '!' not touching a space -> space, then collapsed
        ("A  red\tball\n", "red ball"),
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),          # manualMap stops at ten
        ("what's", "what 's"),         # EvalAI word_tokenize splits the possessive 's
        ("left-right", "left right"),  # '-' not next to a space -> replaced by a space
        ("left - right", "left right"),  # '-' next to a space -> deleted
        ("an apple", "apple"),
        ("dont", "don't"),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_process_punctuation_official_rules() -> None:
    # A punctuation mark touching a space anywhere is deleted everywhere, otherwise replaced by a space.
    assert process_punctuation("a/b") == "a b"
    assert process_punctuation("a/b c /d") == "ab c d"
    # digit,digit anywhere switches every mark to deletion
    assert process_punctuation("1,000 a/b") == "1000 ab"
    # periods: removed unless followed by a digit
    assert process_punctuation("dog.") == "dog"
    assert process_punctuation(".5") == ".5"
    # the official call passes re.UNICODE (32) as `count`: only the first 32 periods go
    assert process_punctuation("." * 40) == "." * 8
    assert process_digit_article("The Two Dogs") == "2 dogs"


def test_normalize_answer_rejects_non_str() -> None:
    with pytest.raises(TypeError, match="answer must be a str"):
        normalize_answer(3)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- VQA accuracy
def _formula(k: int, n: int = 10) -> float:
    # k of n references match: the n-k leave-one-out subsets that drop a non-matching reference see
    # k matches, the k subsets that drop a matching one see k-1.
    return (k * min((k - 1) / 3, 1) + (n - k) * min(k / 3, 1)) / n


def _brute_force(pred_norm: str, refs_norm: list[str]) -> float:
    # Independent formulation: every 9-subset of the 10 references, min(#matches / 3, 1), mean.
    subsets = list(itertools.combinations(range(len(refs_norm)), len(refs_norm) - 1))
    return sum(min(sum(refs_norm[j] == pred_norm for j in s) / 3, 1) for s in subsets) / len(subsets)


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_k_matches(k: int, expected: float) -> None:
    answers = ["cat"] * k + ["dog", "bird", "cow", "fish", "horse", "pig", "goat", "duck", "owl", "ant"][: 10 - k]
    assert vqa_accuracy("cat", answers) == pytest.approx(expected, abs=1e-12)
    assert _formula(k) == pytest.approx(expected, abs=1e-12)  # hand values: 3/10, 6/10, 9/10


def test_vqa_accuracy_normalises_prediction_and_answers() -> None:
    answers = ["2"] * 5 + ["two", "Two.", "3", "3", "4"]
    # after normalisation 7 references are "2" -> 1.0
    assert vqa_accuracy("Two", answers) == 1.0
    assert vqa_accuracy(" the 2. ", answers) == 1.0
    # "3" matches 2 references -> k=2 -> 0.6
    assert vqa_accuracy("three", answers) == pytest.approx(0.6)
    assert vqa_accuracy("five", answers) == 0.0


def test_vqa_accuracy_identical_references_are_not_normalised() -> None:
    # Official behaviour: with one unique reference nothing but strip() is applied to it.
    assert vqa_accuracy("yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("YES.", ["yes"] * 10) == 1.0  # the prediction is always normalised
    assert vqa_accuracy("2", ["Two"] * 10) == 0.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["red", "Red.", "blue", "the blue", "2", "two", "3"]), min_size=10, max_size=10),
       st.sampled_from(["red", "blue", "2", "Three", "green"]))
def test_vqa_accuracy_matches_brute_force(answers: list[str], pred: str) -> None:
    refs = answers
    if len(set(refs)) > 1:
        refs_n = [normalize_answer(a) for a in refs]
    else:
        refs_n = [a.strip() for a in refs]
    assert vqa_accuracy(pred, answers) == pytest.approx(_brute_force(normalize_answer(pred), refs_n), abs=1e-12)


def test_vqa_accuracy_bad_input() -> None:
    with pytest.raises(ValueError, match="non-empty list"):
        vqa_accuracy("a", [])
    with pytest.raises(ValueError, match="non-empty list"):
        vqa_accuracy("a", "a")
    with pytest.raises(TypeError, match="pred must be a str"):
        vqa_accuracy(None, ["a"])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- ANLS
def test_levenshtein() -> None:
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "abc") == 0


def test_anls_typos_and_threshold() -> None:
    assert anls("Hello World", ["hello world"]) == 1.0
    assert anls("  hello   world ", ["hello world"]) == pytest.approx(1 - 0 / 16)  # raw-length denominator
    # one typo in 10 characters: 1 - 1/10
    assert anls("invoice 42", ["invoice 43"]) == pytest.approx(0.9)
    # max over answers
    assert anls("invoice 42", ["receipt", "invoice 43"]) == pytest.approx(0.9)
    # NL = 3/6 = 0.5 -> score 0.5 is kept (zeroed only strictly below the threshold)
    assert anls("abcxyz", ["abcdef"]) == pytest.approx(0.5)
    # NL = 4/6 -> 1/3 < 0.5 -> 0
    assert anls("abwxyz", ["abcdef"]) == 0.0
    assert anls("abwxyz", ["abcdef"], threshold=0.3) == pytest.approx(1 / 3)
    assert anls("", [""]) == 1.0


# ---------------------------------------------------------------------------------- relaxed accuracy
def test_relaxed_accuracy_boundary() -> None:
    assert relaxed_accuracy("105", "100") == 1.0   # exactly 5 %
    assert relaxed_accuracy("95", "100") == 1.0
    assert relaxed_accuracy("105.1", "100") == 0.0
    assert relaxed_accuracy("94.9", "100") == 0.0
    assert relaxed_accuracy("21", "20") == 1.0     # 1/20 = 0.05
    assert relaxed_accuracy("12%", "0.12") == 1.0  # percent -> fraction
    assert relaxed_accuracy("0", "0") == 1.0       # zero target falls back to string match
    assert relaxed_accuracy("0.0", "0") == 0.0
    assert relaxed_accuracy("Yes", "yes") == 1.0
    assert relaxed_accuracy("yes ", "yes") == 0.0  # no stripping, like the reference
    assert relaxed_accuracy("110", "100", tolerance=0.1) == 1.0
    assert relaxed_accuracy("50", ["100", "51"]) == 1.0


# ---------------------------------------------------------------------------------- EM / MC
def test_exact_match() -> None:
    assert exact_match(" Paris ", ["paris"]) == 1.0
    assert exact_match("Paris", ["paris"], ignore_case=False) == 0.0
    assert exact_match("Lyon", ["paris", "london"]) == 0.0


@pytest.mark.parametrize(
    "pred, expected",
    [("B", 1), ("(C)", 2), ("A. square", 0), ("The answer is B.", 1), ("Answer: (D)", 3),
     ("I think (C) is right", 2), ("It is a circle.", 1), ("the answer is a circle", 1),
     ("A red circle", None), ("dark red", 3), ("none of them", None)],
)
def test_parse_multiple_choice(pred: str, expected: int | None) -> None:
    choices = ["square", "circle", "red", "dark red"]
    assert parse_multiple_choice(pred, choices) == expected


def test_multiple_choice_accuracy() -> None:
    choices = ["cat", "dog", "bird"]
    assert multiple_choice_accuracy("B", choices, 1) == 1.0
    assert multiple_choice_accuracy("(b) cat", choices, "B") == 0.0  # lower-case "(b)" is no letter: "cat" counts
    assert multiple_choice_accuracy("The answer is dog", choices, "dog") == 1.0
    assert multiple_choice_accuracy("C", choices, "B") == 0.0
    with pytest.raises(ValueError, match="neither an option letter"):
        multiple_choice_accuracy("B", choices, "cow")


# ---------------------------------------------------------------------------------- aggregation
def test_evaluate_predictions_and_table() -> None:
    records = [
        {"prediction": "2", "answers": ["2"] * 10, "category": "count"},
        {"prediction": "3", "answers": ["2"] * 10, "category": "count"},
        {"prediction": "red", "answers": ["red"] * 3 + ["blue"] * 7, "category": "color"},
    ]
    res = evaluate_predictions(records, "vqa_accuracy")
    assert res["per_category"]["count"] == {"score": 0.5, "count": 2}
    assert res["per_category"]["color"]["score"] == pytest.approx(0.9)
    assert res["overall"] == pytest.approx((1 + 0 + 0.9) / 3)
    assert res["scores"] == pytest.approx([1.0, 0.0, 0.9])
    table = format_table(res, title="VQA")
    assert "count" in table and "50.00" in table and "63.33" in table
    em = evaluate_predictions([{"prediction": "x", "answer": "X"}], "exact_match")
    assert em["overall"] == 1.0 and em["per_category"]["all"]["count"] == 1
    assert "exact_match" in format_table([res, em])
    with pytest.raises(ValueError, match="metric='bleu' is unknown"):
        evaluate_predictions(records, "bleu")
    with pytest.raises(KeyError, match="record 0"):
        evaluate_predictions([{"prediction": "x"}], "vqa_accuracy")
    assert math.isnan(evaluate_predictions([], "anls")["overall"])


def test_majority_baseline() -> None:
    records = [{"answers": ["yes"] * 10, "category": "yn"}] * 3 + [{"answers": ["no"] * 10, "category": "yn"}]
    res = majority_baseline(records)
    assert res["answers"] == {"yn": "yes"}
    assert res["per_category"]["yn"]["score"] == pytest.approx(0.75)
