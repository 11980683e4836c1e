"""GSM8K answer extraction and accuracy.

Extraction is deliberately strict: an answer counts only if it follows ``####``, the format the
GSM8K training targets teach. Many evaluations fall back to "the last number in the text" when the
marker is missing; we do not, because that credits a model that never learned the format for
whatever number its rambling happens to end on (often an intermediate result that equals the
answer), inflating accuracy, most of all before fine-tuning. Whether the format was learned is
reported separately as ``gsm8k_format_rate``.
"""

from __future__ import annotations

import math
import re

# After the first "####": optional "$" and sign in either order, then a number with optional
# thousands commas and decimals (".5" allowed). Anything else right after the marker means no answer.
_ANSWER_RE = re.compile(
    r"####[ \t]*(?:\$[ \t]*)?(?P<sign>-)?[ \t]*(?:\$[ \t]*)?(?P<num>\d[\d,]*(?:\.\d+)?|\.\d+)"
)


def _normalise_number(sign: str, digits: str) -> str:
    """Canonical form of a number: no commas, no leading/trailing zeros, no "-0"."""
    digits = digits.replace(",", "")
    whole, _, frac = digits.partition(".")
    whole = whole.lstrip("0") or "0"
    frac = frac.rstrip("0")
    text = f"{whole}.{frac}" if frac else whole
    return text if text == "0" or not sign else f"-{text}"


def extract_answer(text: str) -> str | None:
    """Return the normalised number that directly follows the first ``####`` in ``text``.

    ``"#### $1,600."`` -> ``"1600"``, ``"#### 1.50"`` -> ``"1.5"``, ``"#### -3.0"`` -> ``"-3"``.
    Returns None when there is no ``####`` or no number right after it (see the module docstring
    for why there is no fallback). A fraction such as ``"#### 3/4"`` also gives None rather than
    a wrong "3".
    """
    marker = text.find("####")
    if marker < 0:
        return None
    match = _ANSWER_RE.match(text, marker)
    if match is None:
        return None
    if text[match.end() : match.end() + 1] == "/":
        return None
    return _normalise_number(match["sign"] or "", match["num"])


def gold_answer(answer_field: str) -> str:
    """Return the normalised final answer of a GSM8K ``answer`` field.

    Raises:
        ValueError: if the field has no ``#### <number>`` line, i.e. the record is not GSM8K-shaped.
    """
    answer = extract_answer(answer_field)
    if answer is None:
        raise ValueError(f"GSM8K answer has no '#### <number>' final line: {answer_field[-80:]!r}")
    return answer


def _normalise_gold(gold: str) -> str:
    """Normalise a gold answer given either as a bare number or as a full ``####`` answer field."""
    return gold_answer(gold if "####" in gold else f"#### {gold.strip()}")


def score(predictions: list[str], golds: list[str]) -> dict:
    """Exact-match accuracy of generated texts against gold answers.

    Args:
        predictions: generated texts; each is scored with :func:`extract_answer`.
        golds: gold answers, as returned by :func:`gold_answer` (raw answer fields also work).

    Returns:
        ``gsm8k_accuracy`` and ``gsm8k_format_rate`` (share with an extractable answer) as fractions,
        with the counts behind them and ``num_examples``.
    """
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions but {len(golds)} gold answers")
    n = len(predictions)
    if n == 0:
        raise ValueError("cannot score zero examples")
    extracted = [extract_answer(p) for p in predictions]
    formatted = sum(a is not None for a in extracted)
    correct = sum(a is not None and a == _normalise_gold(g) for a, g in zip(extracted, golds, strict=True))
    strict = sum(strict_match(p, g) for p, g in zip(predictions, golds, strict=True))
    flexible = sum(flexible_extract(p, g) for p, g in zip(predictions, golds, strict=True))
    return {
        "gsm8k_accuracy": correct / n,
        "gsm8k_format_rate": formatted / n,
        "gsm8k_correct": correct,
        "gsm8k_formatted": formatted,
        "gsm8k_strict_match": strict / n,
        "gsm8k_flexible_extract": flexible / n,
        "num_examples": n,
    }


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion ``k / n`` (95% for the default ``z``).

    Preferred over the normal approximation because it stays inside [0, 1] and is sensible at
    0/n and n/n, which small eval sets hit often.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


# lm-evaluation-harness's gsm8k task (lm_eval/tasks/gsm8k/gsm8k.yaml), reproduced so a distft number can sit next to
# published tables: two answer filters, then exact_match with its ignore-regexes and ignore_case.
LM_EVAL_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
LM_EVAL_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
LM_EVAL_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")
LM_EVAL_INVALID = "[invalid]"  # RegexFilter's fallback when nothing matches


def _lm_eval_filter(pattern: re.Pattern, text: str, group_select: int) -> str:
    """lm-eval's RegexFilter followed by take_first: findall, pick one match, the first non-empty group of it."""
    matches = pattern.findall(text)
    if not matches:
        return LM_EVAL_INVALID
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), None)
        if match is None:
            return LM_EVAL_INVALID
    return match.strip()


def _lm_eval_exact_match(prediction: str, gold: str) -> bool:
    """lm-eval's exact_match with the gsm8k task's options (regexes_to_ignore, ignore_case, punctuation kept)."""
    for pattern in LM_EVAL_IGNORE:
        prediction, gold = re.sub(pattern, "", prediction), re.sub(pattern, "", gold)
    return prediction.lower() == gold.lower()


def _lm_eval_gold(gold: str) -> str:
    """lm-eval's target is the whole answer field; a bare number is given the field's `#### ` line."""
    return gold if "####" in gold else f"#### {gold.strip()}"


def strict_match(text: str, gold: str) -> bool:
    """lm-eval `strict-match`: the first number right after "#### " (one space), compared after its ignore-regexes."""
    return _lm_eval_exact_match(_lm_eval_filter(LM_EVAL_STRICT, text, 0), _lm_eval_gold(gold))


def flexible_extract(text: str, gold: str) -> bool:
    """lm-eval `flexible-extract`: the last number-like token anywhere in the text."""
    return _lm_eval_exact_match(_lm_eval_filter(LM_EVAL_FLEXIBLE, text, -1), _lm_eval_gold(gold))
