"""Generation tasks: what a scored question's output is compared with, per `data.name`.

Each task scores greedy outputs against its examples and returns its own metrics, a headline `accuracy` (the task's
`metric`) and one row per example, so reports can pair arms question by question (distft.stats).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from distft.data.sources import Example
from distft.eval import gsm8k, sql, viggo


@dataclass(frozen=True)
class Task:
    name: str  # the data.name it scores
    metric: str  # the headline metric's key
    label: str  # for reports
    checks: dict[str, Callable[[str, Example], bool]]  # per-example metric name -> check(output, example)
    gold: Callable[[Example], str]

    def score(self, predictions: list[str], examples: list[Example]) -> dict:
        if len(predictions) != len(examples):
            raise ValueError(f"{len(predictions)} predictions but {len(examples)} examples")
        if not examples:
            raise ValueError("cannot score zero examples")
        n = len(examples)
        rows = [{"gold": self.gold(e), **{k: bool(check(p, e)) for k, check in self.checks.items()}}
                for p, e in zip(predictions, examples, strict=True)]
        headline = self.metric.removeprefix(f"{self.name}_")
        out = {"task": self.name, "metric": self.metric}
        for key in self.checks:
            count = sum(r[key] for r in rows)
            out[f"{self.name}_{key}"] = count / n
            out[f"{self.name}_{key}_correct"] = count
        if self.name == "gsm8k":  # distft's strict #### rule and its format rate, with their historical keys
            out = {**out, **{k: v for k, v in gsm8k.score(predictions, [e.response for e in examples]).items()
                             if k != "num_examples"}}
            out.pop("gsm8k_accuracy_correct", None)
        for r in rows:
            r["correct"] = r[headline]
        correct = sum(r["correct"] for r in rows)
        return {**out, "accuracy": correct / n, "correct": correct, "num_examples": n, "per_example": rows}


def _context(e: Example) -> str:
    return (e.meta or {}).get("context", "")


TASKS = {
    "gsm8k": Task("gsm8k", "gsm8k_accuracy", "GSM8K accuracy (answer after ####)",
                  {"accuracy": lambda p, e: gsm8k.extract_answer(p) == gsm8k.gold_answer(e.response),
                   "strict_match": lambda p, e: gsm8k.strict_match(p, e.response),
                   "flexible_extract": lambda p, e: gsm8k.flexible_extract(p, e.response)},
                  lambda e: gsm8k.gold_answer(e.response)),
    "sql": Task("sql", "sql_exact_match", "SQL exact match (normalised)",
                {"exact_match": lambda p, e: sql.exact_match(p, e.response),
                 "execution_match": lambda p, e: sql.execution_match(p, e.response, _context(e))},
                lambda e: e.response),
    "viggo": Task("viggo", "viggo_exact_match", "ViGGO exact match (function and attributes)",
                  {"exact_match": lambda p, e: viggo.exact_match(p, e.response),
                   "function_match": lambda p, e: viggo.function_match(p, e.response)},
                  lambda e: e.response),
}


def get_task(data_name: str) -> Task | None:
    """The task of `data.name`; None for data without a generation metric (jsonl)."""
    return TASKS.get(data_name)
