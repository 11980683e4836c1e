"""GSM8K extraction and scoring: real dataset answers, hand-written edge cases, interval maths."""

import json
from pathlib import Path

import pytest

from distft.eval import extract_answer, gold_answer, score, wilson_interval

GSM8K_DIR = Path(__file__).resolve().parents[2].parent / "shared/data/gsm8k"


def _answers(split: str) -> list[str]:
    path = GSM8K_DIR / f"{split}.jsonl"
    if not path.exists():
        pytest.skip(f"GSM8K data not found at {path}")
    with path.open() as f:
        return [json.loads(line)["answer"] for line in f if line.strip()]


@pytest.mark.parametrize("split, expected_rows", [("test", 1319), ("train", 7473)])
def test_every_real_answer_has_a_gold_and_extracts_to_it(split, expected_rows):
    answers = _answers(split)
    assert len(answers) == expected_rows
    for answer in answers:
        gold = gold_answer(answer)
        assert extract_answer(answer) == gold
        # The raw last line, commas removed, is the same number.
        assert gold == answer.rsplit("####", 1)[1].strip().replace(",", "")


def test_real_answers_include_comma_numbers():
    answers = _answers("test")
    with_commas = [a for a in answers if "," in a.rsplit("####", 1)[1]]
    assert with_commas, "expected some '#### 1,600' style answers in the test split"
    assert all("," not in gold_answer(a) for a in with_commas)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the total is 18.\n#### 18", "18"),
        ("#### 1,600", "1600"),
        ("#### 1,450,000", "1450000"),
        ("#### $1,600", "1600"),
        ("#### $ 5", "5"),
        ("#### 72.", "72"),
        ("#### 72. That is the answer.", "72"),
        ("#### -5", "-5"),
        ("#### -$5", "-5"),
        ("#### $-5", "-5"),
        ("#### 1.50", "1.5"),
        ("#### 3.0", "3"),
        ("#### -3.00", "-3"),
        ("#### -0", "0"),
        ("#### 0.25", "0.25"),
        ("#### .5", "0.5"),
        ("#### 007", "7"),
        ("####42", "42"),
        ("#### 18 dollars", "18"),
        ("#### 18\n#### 20", "18"),  # the first marker wins
        ("#### 18 #### 20", "18"),
    ],
)
def test_extract_answer_normalises(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "The answer is 42.",  # no marker: no fallback to the last number
        "",
        "####",
        "#### ",
        "#### the answer is 42",  # text, not a number, right after the marker
        "#### forty-two",
        "####\n42",  # the number must be on the marker's line
        "#### none\n#### 42",  # only the first marker counts
        "#### 3/4",  # a fraction is not silently read as 3
        "#### -",
        "#### $",
    ],
)
def test_extract_answer_returns_none_without_a_number_after_the_marker(text):
    assert extract_answer(text) is None


def test_gold_answer_raises_without_a_final_answer():
    with pytest.raises(ValueError, match="####"):
        gold_answer("She has 5 apples.")


def test_score_counts_correct_and_formatted():
    predictions = [
        "4 + 4 = 8\n#### 8",  # correct
        "#### 1,600.00",  # correct after normalisation
        "#### 7",  # formatted, wrong
        "The answer is 3",  # unformatted; the right number does not count
    ]
    result = score(predictions, ["8", "1600", "6", "3"])
    assert result == {
        "gsm8k_accuracy": 0.5,
        "gsm8k_format_rate": 0.75,
        "gsm8k_correct": 2,
        "gsm8k_formatted": 3,
        "gsm8k_strict_match": 0.25,  # lm-eval keeps "1600.00" (only a trailing "." is dropped): no match for 1600
        "gsm8k_flexible_extract": 0.5,  # the last number of "The answer is 3" counts there
        "num_examples": 4,
    }


def test_score_accepts_raw_answer_fields_and_unnormalised_golds():
    result = score(["#### 1600", "#### 1600"], ["so...\n#### 1,600", "1,600"])
    assert result["gsm8k_correct"] == 2


def test_score_rejects_empty_and_mismatched_inputs():
    with pytest.raises(ValueError, match="zero"):
        score([], [])
    with pytest.raises(ValueError, match="2 predictions but 1"):
        score(["#### 1", "#### 2"], ["1"])


def test_wilson_interval_edges_and_known_value():
    assert wilson_interval(0, 10)[0] == 0.0
    assert 0.0 < wilson_interval(0, 10)[1] < 0.35
    assert wilson_interval(10, 10)[1] == 1.0
    assert 0.65 < wilson_interval(10, 10)[0] < 1.0
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4)
    assert high == pytest.approx(0.5962, abs=1e-4)
    low, high = wilson_interval(660, 1319)
    assert low < 660 / 1319 < high
    assert high - low < 0.06


def test_wilson_interval_rejects_bad_counts():
    with pytest.raises(ValueError):
        wilson_interval(0, 0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
    with pytest.raises(ValueError):
        wilson_interval(-1, 10)
