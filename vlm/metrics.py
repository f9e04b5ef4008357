"""VQA metrics, written to their official definitions.

- :func:`vqa_accuracy` — VQAv2 (Antol et al. 2015; Goyal et al. 2017). Answer normalisation follows
  the VQA API's ``vqaEval.py`` (GT-Vision-Lab/VQA, BSD licence) and EvalAI's answer processor as used
  by lmms-eval (``EvalAIAnswerProcessor`` + ``vqav2_process_results``): punctuation handling with the
  official punctuation list and comma/period-in-number regexes, number words to digits (``manualMap``),
  article removal, the official contractions map. Accuracy is ``min(#matching humans / 3, 1)``
  averaged over the 10 leave-one-out subsets of the 10 human answers.
- :func:`anls` — DocVQA / InfographicVQA ANLS (Biten et al. 2019), as in the official RRC script and
  lmms-eval: ``1 - min_answers NL(pred, answer)``, set to 0 when below ``threshold``.
- :func:`relaxed_accuracy` — ChartQA (Masry et al. 2022, sec. 5.1; pix2struct / lmms-eval
  ``relaxed_correctness``): numbers within 5 % relative error, otherwise case-insensitive equality.
- :func:`exact_match`, :func:`multiple_choice_accuracy`.
- :func:`evaluate_predictions` aggregates any of them overall and per category, :func:`format_table`
  renders results as text, :func:`majority_baseline` scores the "always answer the most frequent
  answer of the category" baseline.

Every metric returns a score in ``[0, 1]`` per question; aggregates are means (tables print x100).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

# --------------------------------------------------------------------------------------------------
# Official VQAv2 answer normalisation (vqaEval.py: contractions, manualMap, articles, punct, regexes)
# --------------------------------------------------------------------------------------------------
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES: tuple[str, ...] = ("a", "an", "the")
PUNCTUATION: tuple[str, ...] = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                                "@", "`", ",", "?", "!")
# The official patterns, verbatim. `(?!<=\d)` is (as in the original) a negative LOOKAHEAD for the
# two characters "<=" followed by a digit, not a lookbehind; kept for identical behaviour.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# The official code calls `periodStrip.sub("", text, re.UNICODE)`: the third positional argument of
# `Pattern.sub` is `count`, so at most int(re.UNICODE) == 32 periods are removed. Reproduced exactly.
_PERIOD_SUB_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """Official ``processPunctuation``: each punctuation mark is deleted if it touches a space
    anywhere in the text (or the text contains a digit-comma-digit), else replaced by a space;
    then periods not followed by a digit are removed ("1.5" keeps its period)."""
    out = text
    has_number_comma = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or has_number_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_SUB_COUNT)


def process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lower-case, split on whitespace, number words -> digits,
    drop articles, expand contractions ("isnt" -> "isn't"), join with single spaces."""
    words = [NUMBER_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _word_tokenize(text: str) -> str:
    # EvalAI's answer processor (pythia/mmf `EvalAIAnswerProcessor.word_tokenize`, used by lmms-eval):
    # lower-case, drop commas and question marks, split the possessive "'s".
    return text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()


def normalize_answer(answer: str) -> str:
    """Normalise one answer like EvalAI's VQA processor: lower-case / word-tokenise, newlines and
    tabs to spaces, strip, :func:`process_punctuation`, :func:`process_digit_article`.

    ``"Two"`` -> ``"2"``, ``"the dog."`` -> ``"dog"``, ``"isnt"`` -> ``"isn't"``, ``"1,000"`` -> ``"1000"``.
    """
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__} ({answer!r})")
    text = _word_tokenize(answer).replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def _check_answers(answers: Sequence[str], name: str = "answers") -> list[str]:
    if isinstance(answers, str) or not isinstance(answers, Sequence) or len(answers) == 0:
        raise ValueError(f"{name} must be a non-empty list of reference strings, got {answers!r}")
    if not all(isinstance(a, str) for a in answers):
        raise TypeError(f"{name} must hold only str, got {[type(a).__name__ for a in answers]}")
    return list(answers)


def vqa_accuracy(pred: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one prediction against its human answers (normally 10).

    Exactly lmms-eval's ``vqav2_process_results``: the prediction is normalised
    (:func:`normalize_answer`); the references are stripped and, when they are not all identical,
    they (and the prediction) go through :func:`process_punctuation` and :func:`process_digit_article`.
    Then, for each reference ``i``, ``acc_i = min(1, #{j != i : ref_j == pred} / 3)``; the result is
    the mean of ``acc_i``. With ``k`` of 10 matching references:
    ``(k * min((k-1)/3, 1) + (10-k) * min(k/3, 1)) / 10`` (k=1: 0.3, k=2: 0.6, k=3: 0.9, k>=4: 1).

    Notes: when all references are identical they are compared without normalisation (as in both
    official codes). The VQA API's ``vqaEval.py`` applies only ``processPunctuation`` to differing
    references; VQAv2 references are stored already normalised (and so are mmfm's synthetic ones),
    so both give the same numbers there.
    """
    if not isinstance(pred, str):
        raise TypeError(f"pred must be a str, got {type(pred).__name__} ({pred!r})")
    refs = [a.replace("\n", " ").replace("\t", " ").strip() for a in _check_answers(answers)]
    res = normalize_answer(pred)
    if len(set(refs)) > 1:
        refs = [process_digit_article(process_punctuation(a)) for a in refs]
        res = process_digit_article(process_punctuation(res))
    matches = [a == res for a in refs]
    total = sum(matches)
    # leave-one-out: the other references match `total - matches[i]` times
    accs = [min(1.0, (total - m) / 3.0) for m in matches]
    return sum(accs) / len(accs)


# --------------------------------------------------------------------------------------------------
# ANLS (DocVQA)
# --------------------------------------------------------------------------------------------------
def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(pred: str, answers: Sequence[str] | str, threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity of one prediction (DocVQA).

    As in the official RRC evaluation script (and lmms-eval's ``anls``): both strings are
    lower-cased, stripped and whitespace-collapsed; ``NL = lev(gt, pred) / max(len(gt), len(pred))``
    where the lengths are those of the raw strings (official quirk); the score is
    ``1 - min over answers of NL``, set to 0 when it is below ``threshold``.
    """
    if not isinstance(pred, str):
        raise TypeError(f"pred must be a str, got {type(pred).__name__} ({pred!r})")
    refs = [answers] if isinstance(answers, str) else _check_answers(answers)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    det = " ".join(pred.strip().lower().split())
    values = []
    for answer in refs:
        gt = " ".join(answer.strip().lower().split())
        length = max(len(answer.upper()), len(pred.upper()))
        values.append(0.0 if length == 0 else levenshtein(gt, det) / length)
    score = 1.0 - min(values)
    return 0.0 if score < threshold else score


# --------------------------------------------------------------------------------------------------
# Relaxed accuracy (ChartQA)
# --------------------------------------------------------------------------------------------------
def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0  # percentages compare as fractions
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(pred: str, target: str | Sequence[str], tolerance: float = 0.05) -> float:
    """ChartQA relaxed correctness: if both parse as numbers (``"12%"`` -> 0.12) and the target is
    non-zero, correct when ``|pred - target| / |target| <= tolerance``; otherwise a case-insensitive
    exact string match. Strings are compared as given (no stripping), like the reference
    implementation. A list of targets scores the best one."""
    if not isinstance(pred, str):
        raise TypeError(f"pred must be a str, got {type(pred).__name__} ({pred!r})")
    if not isinstance(target, str):
        return max(relaxed_accuracy(pred, t, tolerance) for t in _check_answers(target, "target"))
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    p, t = _to_float(pred), _to_float(target)
    if p is not None and t:
        return float(abs(p - t) / abs(t) <= tolerance)
    return float(pred.lower() == target.lower())


# --------------------------------------------------------------------------------------------------
# Exact match and multiple choice
# --------------------------------------------------------------------------------------------------
def exact_match(pred: str, answers: Sequence[str] | str, ignore_case: bool = True) -> float:
    """1.0 if the stripped prediction equals any stripped answer (case-insensitive by default)."""
    if not isinstance(pred, str):
        raise TypeError(f"pred must be a str, got {type(pred).__name__} ({pred!r})")
    refs = [answers] if isinstance(answers, str) else _check_answers(answers)
    norm = (lambda s: s.strip().lower()) if ignore_case else (lambda s: s.strip())
    p = norm(pred)
    return float(any(norm(a) == p for a in refs))


_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def parse_multiple_choice(pred: str, choices: Sequence[str]) -> int | None:
    """Index of the option a free-form prediction picks, or ``None`` if it names none / several.

    Tried in order: a bare letter ("B", "(B)", "B.", "B: text"); "answer is B" / "answer: (B)";
    a parenthesised letter "(B)" anywhere; the text of exactly one option (an option contained in
    another named option does not count); a lone capital letter token that is a valid option.
    """
    n = len(choices)
    if n == 0 or n > len(_LETTERS):
        raise ValueError(f"choices must hold 1..{len(_LETTERS)} options, got {n}")
    letters = _LETTERS[:n]
    text = pred.strip()
    m = re.fullmatch(rf"\(?([{letters}])\)?(?:[.:)]\s*.*)?", text, flags=re.DOTALL)
    if m:
        return letters.index(m.group(1))
    # only the word "answer" is case-insensitive: "the answer is a circle" must not pick option A
    m = re.search(rf"(?i:answer)\s*(?:(?i:is)|:)?\s*:?\s*\(?([{letters}])(?![\w'])", text)
    if m:
        return letters.index(m.group(1))
    found = set(re.findall(rf"\(([{letters}])\)", text))
    if len(found) == 1:
        return letters.index(found.pop())
    low = text.lower()
    hits = [i for i, c in enumerate(choices) if c.strip() and re.search(rf"(?<!\w){re.escape(c.strip().lower())}(?!\w)", low)]
    if hits:
        # an option named only as part of a longer named option does not count ("red" in "dark red");
        # two separately named options are ambiguous
        texts = {i: choices[i].strip().lower() for i in hits}
        best = [i for i in hits if not any(j != i and texts[i] in texts[j] for j in hits)]
        return best[0] if len(best) == 1 else None
    tokens = set(re.findall(rf"(?<![\w'])([{letters}])(?![\w'])", text))
    if text.startswith("A ") and len(tokens) > 1:  # a sentence-initial article "A", not option A
        tokens.discard("A")
    if len(tokens) == 1:
        return letters.index(tokens.pop())
    return None


def multiple_choice_accuracy(pred: str, choices: Sequence[str], answer: int | str) -> float:
    """1.0 if the option parsed from ``pred`` (:func:`parse_multiple_choice`) is the right one.
    ``answer`` is the option index, its letter ("B") or its text."""
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        raise TypeError(f"answer must be an option index, letter or text, got {answer!r}")
    if isinstance(answer, int):
        idx = answer
    elif len(answer.strip()) == 1 and answer.strip().upper() in _LETTERS[: len(choices)]:
        idx = _LETTERS.index(answer.strip().upper())
    else:
        texts = [c.strip().lower() for c in choices]
        if answer.strip().lower() not in texts:
            raise ValueError(f"answer {answer!r} is neither an option letter nor one of the choices {list(choices)}")
        idx = texts.index(answer.strip().lower())
    if not 0 <= idx < len(choices):
        raise ValueError(f"answer index {idx} is out of range for {len(choices)} choices")
    return float(parse_multiple_choice(pred, choices) == idx)


# --------------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------------
def _score_vqa(r: Mapping[str, Any]) -> float:
    return vqa_accuracy(r["prediction"], _refs(r))


def _score_anls(r: Mapping[str, Any]) -> float:
    return anls(r["prediction"], _refs(r))


def _score_relaxed(r: Mapping[str, Any]) -> float:
    return relaxed_accuracy(r["prediction"], _refs(r))


def _score_exact(r: Mapping[str, Any]) -> float:
    return exact_match(r["prediction"], _refs(r))


def _score_mc(r: Mapping[str, Any]) -> float:
    if "choices" not in r:
        raise KeyError("multiple_choice records need a 'choices' list")
    answer = r["answer"] if "answer" in r else _refs(r)[0]
    return multiple_choice_accuracy(r["prediction"], r["choices"], answer)


METRICS: dict[str, Callable[[Mapping[str, Any]], float]] = {
    "vqa_accuracy": _score_vqa,
    "anls": _score_anls,
    "relaxed_accuracy": _score_relaxed,
    "exact_match": _score_exact,
    "multiple_choice": _score_mc,
}


def _refs(r: Mapping[str, Any]) -> list[str]:
    if r.get("answers") is not None:
        return list(r["answers"])
    if r.get("answer") is not None:
        return [r["answer"]] if isinstance(r["answer"], str) else list(r["answer"])
    raise KeyError("record needs 'answers' (list of references) or 'answer'")


def evaluate_predictions(records: Iterable[Mapping[str, Any]],
                         metric: str | Callable[[Mapping[str, Any]], float] = "vqa_accuracy") -> dict[str, Any]:
    """Score every record and aggregate overall and per ``category``.

    Each record is a mapping with ``prediction`` and ``answers`` (or ``answer``); optional
    ``category`` (default ``"all"``), ``choices`` (multiple choice) and ``question_id``.
    ``metric`` is a name in :data:`METRICS` or a callable ``record -> score``.

    Returns ``{"metric", "overall", "count", "per_category": {cat: {"score", "count"}}, "scores"}``
    with scores in ``[0, 1]`` (``scores`` lists the per-record scores in input order).
    """
    if isinstance(metric, str):
        if metric not in METRICS:
            raise ValueError(f"metric={metric!r} is unknown; expected one of {sorted(METRICS)} or a callable")
        name, fn = metric, METRICS[metric]
    elif callable(metric):
        name, fn = getattr(metric, "__name__", "custom"), metric
    else:
        raise TypeError(f"metric must be a name or a callable, got {metric!r}")
    scores: list[float] = []
    per_cat: dict[str, list[float]] = defaultdict(list)
    for i, r in enumerate(records):
        if "prediction" not in r:
            raise KeyError(f"record {i} has no 'prediction' (keys: {sorted(r)})")
        try:
            s = float(fn(r))
        except KeyError as e:
            raise KeyError(f"record {i}: {e.args[0]}") from None
        scores.append(s)
        per_cat[str(r.get("category") or "all")].append(s)
    overall = sum(scores) / len(scores) if scores else float("nan")
    return {
        "metric": name,
        "overall": overall,
        "count": len(scores),
        "per_category": {c: {"score": sum(v) / len(v), "count": len(v)} for c, v in sorted(per_cat.items())},
        "scores": scores,
    }


def format_table(results: Mapping[str, Any] | Sequence[Mapping[str, Any]], title: str | None = None) -> str:
    """Render one or more :func:`evaluate_predictions` results as a text table (scores x100)."""
    results_list = [results] if isinstance(results, Mapping) else list(results)
    cats = sorted({c for r in results_list for c in r["per_category"]})
    rows = [["category", *(r["metric"] for r in results_list), "n"]]
    for c in cats:
        entries = [r["per_category"].get(c) for r in results_list]
        n = next((e["count"] for e in entries if e), 0)
        rows.append([c, *(f"{100 * e['score']:.2f}" if e else "-" for e in entries), str(n)])
    rows.append(["overall", *(f"{100 * r['overall']:.2f}" for r in results_list), str(results_list[0]["count"])])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    fmt = [row[0].ljust(widths[0]) + "  " + "  ".join(v.rjust(w) for v, w in zip(row[1:], widths[1:])) for row in rows]
    sep = "-" * len(fmt[0])
    lines = ([title] if title else []) + [fmt[0], sep, *fmt[1:-1], sep, fmt[-1]]
    return "\n".join(lines)


def majority_baseline(records: Iterable[Mapping[str, Any]], metric: str = "vqa_accuracy") -> dict[str, Any]:
    """Score the blind baseline that answers every question of a category with that category's most
    frequent (normalised) majority reference answer. Records need ``answers`` and ``category``;
    returns :func:`evaluate_predictions`' dict plus ``"answers": {category: answer}``."""
    recs = [dict(r) for r in records]
    majority: dict[str, Counter[str]] = defaultdict(Counter)
    for r in recs:
        refs = [normalize_answer(a) for a in _refs(r)]
        majority[str(r.get("category") or "all")][Counter(refs).most_common(1)[0][0]] += 1
    best = {c: cnt.most_common(1)[0][0] for c, cnt in majority.items()}
    for r in recs:
        r["prediction"] = best[str(r.get("category") or "all")]
    out = evaluate_predictions(recs, metric)
    out["answers"] = best
    return out
