"""Evaluation helpers: GSM8K answer extraction and scoring, batched greedy generation."""

from distft.eval.generate import greedy_generate
from distft.eval.gsm8k import extract_answer, gold_answer, score, wilson_interval

__all__ = ["extract_answer", "gold_answer", "greedy_generate", "score", "wilson_interval"]
