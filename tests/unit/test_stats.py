"""distft.stats: McNemar's test (exact and chi-square), pairing by question, verdicts in words."""

import math
from statistics import NormalDist

import pytest

from distft.stats import TOO_FEW, mcnemar, mean_std, min_discordant, paired, verdict


def test_mcnemar_exact_for_few_discordant_pairs():
    assert mcnemar(0, 0) == 1.0
    assert mcnemar(0, 5) == pytest.approx(2 / 32)  # a unanimous 5-0 split is still not significant at 0.05
    assert mcnemar(5, 0) == mcnemar(0, 5)
    assert mcnemar(1, 9) == pytest.approx(2 * (1 + 10) / 2**10)
    assert mcnemar(3, 3) == 1.0  # the two tails overlap: capped at 1
    assert mcnemar(12, 12) == 1.0
    # b + c = 24 is the last exact case: 2 * P(X <= 6) for X ~ Binomial(24, 1/2)
    assert mcnemar(6, 18) == pytest.approx(2 * sum(math.comb(24, k) for k in range(7)) / 2**24)


def chi2_sf_1dof(x: float) -> float:
    """P(chi-square_1 > x) = P(|Z| > sqrt(x)), by another route than distft.stats's erfc."""
    return 2 * (1 - NormalDist().cdf(math.sqrt(x)))


def test_mcnemar_chi_square_with_continuity_correction_from_25_pairs():
    assert mcnemar(30, 10) == pytest.approx(chi2_sf_1dof(19**2 / 40), rel=1e-9)  # (|30 - 10| - 1)^2 / 40
    assert mcnemar(30, 10) == pytest.approx(0.002663, abs=1e-6)
    assert mcnemar(5, 20) == pytest.approx(chi2_sf_1dof(14**2 / 25), rel=1e-9)  # 7.84: p = 0.00511
    assert mcnemar(13, 12) == 1.0  # |b - c| - 1 = 0
    with pytest.raises(ValueError, match="non-negative"):
        mcnemar(-1, 3)


def test_min_discordant_is_where_a_unanimous_split_becomes_significant():
    assert min_discordant() == 6  # 2 / 2^5 = 0.0625, 2 / 2^6 = 0.031
    assert min_discordant(0.01) == 8  # 2 / 2^7 = 0.0156, 2 / 2^8 = 0.0078


def test_paired_matches_questions_by_key():
    a = {0: True, 1: True, 2: False, 3: False, 4: True}
    b = {0: True, 1: False, 2: True, 3: False, 9: True}  # 4 and 9 are not shared
    result = paired(a, b)
    assert (result.n, result.correct_a, result.correct_b, result.b, result.c) == (4, 2, 2, 1, 1)
    assert result.difference == 0 and result.acc_a == 0.5 and result.p_value == 1.0
    pooled = paired({(1, 0): True, (2, 0): True}, {(1, 0): False, (2, 0): False, (3, 0): True})  # (seed, index)
    assert (pooled.n, pooled.b, pooled.c) == (2, 2, 0)
    empty = paired({}, {0: True})
    assert empty.n == 0 and empty.acc_a is None and empty.difference is None


def test_verdict_in_words():
    many = paired({i: i < 30 for i in range(40)}, {i: 20 <= i < 30 for i in range(40)})  # b = 20, c = 0
    assert verdict("full", "lora", many) == f"full better (p={many.p_value:.2g})"
    flipped = paired({i: 20 <= i < 30 for i in range(40)}, {i: i < 30 for i in range(40)})
    assert verdict("full", "lora", flipped).startswith("lora better (p=")
    even = paired({i: i % 2 == 0 for i in range(40)}, {i: i % 2 == 1 for i in range(40)})  # b = c = 20
    assert verdict("full", "lora", even) == "no detectable difference (p=1)"
    few = paired({i: i < 5 for i in range(200)}, {i: False for i in range(200)})  # 5-0: n is large, b + c is not
    assert verdict("full", "lora", few) == TOO_FEW
    assert "evaluate more" in TOO_FEW and "eval.gsm8k_examples" in TOO_FEW


def test_mean_std():
    assert mean_std([0.5]) == (0.5, None)
    mean, std = mean_std([0.2, 0.4, 0.6])
    assert mean == pytest.approx(0.4) and std == pytest.approx(0.2)
    with pytest.raises(ValueError):
        mean_std([])
