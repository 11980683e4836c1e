"""Paired tests for comparing two models on the same questions, and the summary statistics the report shows.

Two arms scored on the same questions are compared by McNemar's test: only the questions where exactly one arm is
right (the discordant pairs) carry information about which arm is better. With b questions only A got right and c
only B got right, the null hypothesis "equally good" says each discordant question is a fair coin flip.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

ALPHA = 0.05  # significance level of the report's verdicts
EXACT_BELOW = 25  # discordant pairs below which McNemar's p-value is the exact binomial one (the chi-square is poor)


def mcnemar(b: int, c: int) -> float:
    """Two-sided p-value of McNemar's test for b and c discordant pairs.

    Exact (two-sided binomial with p=1/2) when b + c < EXACT_BELOW, else the chi-square statistic with continuity
    correction, (|b - c| - 1)^2 / (b + c), on 1 degree of freedom. No discordant pairs: p = 1.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be non-negative, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    if n < EXACT_BELOW:
        tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
        return min(1.0, 2 * tail)
    chi2 = max(abs(b - c) - 1, 0) ** 2 / n
    return math.erfc(math.sqrt(chi2 / 2))  # survival function of chi-square with 1 dof


def min_discordant(alpha: float = ALPHA) -> int:
    """The fewest discordant pairs for which even a unanimous split (all b, no c) reaches p < alpha (6 at 0.05):
    below it the exact test cannot tell two arms apart whatever they answer."""
    n = 1
    while mcnemar(n, 0) >= alpha:
        n += 1
    return n


@dataclass
class Paired:
    """Two arms on the questions they have in common."""

    n: int  # questions both arms answered
    correct_a: int
    correct_b: int
    b: int  # A right, B wrong
    c: int  # A wrong, B right
    p_value: float

    @property
    def acc_a(self) -> float | None:
        return self.correct_a / self.n if self.n else None

    @property
    def acc_b(self) -> float | None:
        return self.correct_b / self.n if self.n else None

    @property
    def difference(self) -> float | None:
        """Accuracy of A minus accuracy of B, on the shared questions."""
        return (self.correct_a - self.correct_b) / self.n if self.n else None


def paired(correct_a: Mapping[Hashable, bool], correct_b: Mapping[Hashable, bool]) -> Paired:
    """McNemar's test on the questions both mappings score (matched by key: a question's index, or (seed, index)
    when runs of several seeds are pooled)."""
    common = [k for k in correct_a if k in correct_b]
    b = sum(bool(correct_a[k]) and not correct_b[k] for k in common)
    c = sum(not correct_a[k] and bool(correct_b[k]) for k in common)
    return Paired(n=len(common), correct_a=sum(bool(correct_a[k]) for k in common),
                  correct_b=sum(bool(correct_b[k]) for k in common), b=b, c=c, p_value=mcnemar(b, c))


TOO_FEW = ("too few questions differ to tell these arms apart; evaluate more "
           "(eval.gsm8k_examples / compare.final_eval_examples)")


def verdict(name_a: str, name_b: str, result: Paired, alpha: float = ALPHA) -> str:
    """The comparison in words: which arm is better at level `alpha`, no detectable difference, or too few
    discordant questions for any answer pattern to be significant."""
    if result.b + result.c < min_discordant(alpha):
        return TOO_FEW
    if result.p_value < alpha:
        better = name_a if result.b > result.c else name_b
        return f"{better} better (p={result.p_value:.2g})"
    return f"no detectable difference (p={result.p_value:.2g})"


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    if not values:
        raise ValueError("mean_std of no values")
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else None
