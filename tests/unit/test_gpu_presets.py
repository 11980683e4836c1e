"""The Llama-2 7B/13B/70B x full/LoRA/QLoRA commands that docs/gpu.md documents for 8 x 80 GB nodes plan as fitting.

The commands are read from the table itself, so the table cannot drift from what the planner says.
"""

import re
import shlex

import pytest

from distft.config import validate_config
from distft.plan import plan_config
from tests.conftest import REPO, compose_cfg

SECTION = "## Llama-2 7B / 13B / 70B on one 8 × 80 GB node"
COMMAND = re.compile(r"`python -m distft\.train (\+experiment=gsm8k_\w+ [^`]*)`")


def _documented() -> list[list[str]]:
    text = (REPO / "docs" / "gpu.md").read_text()
    assert SECTION in text
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return [shlex.split(m) for m in COMMAND.findall(section)]


def _combination(overrides: list[str]) -> tuple[str, str]:
    values = dict(o.split("=", 1) for o in overrides)
    return values["model"], values["+experiment"].removeprefix("gsm8k_")


def test_the_table_covers_every_model_and_method_once():
    combos = [_combination(o) for o in _documented()]
    assert sorted(combos) == sorted((m, k) for m in ("llama2_7b", "llama2_13b", "llama2_70b")
                                    for k in ("full", "lora", "qlora"))
    assert all("hardware=h100_8x" in o for o in _documented())


@pytest.mark.parametrize("hardware", ["h100_8x", "a100_80gb_8x"])
@pytest.mark.parametrize("overrides", _documented(), ids=lambda o: "-".join(_combination(o)))
def test_each_documented_command_validates_and_plans_as_fitting(overrides, hardware, data_dir):
    overrides = [o if not o.startswith("hardware=") else f"hardware={hardware}" for o in overrides]
    validate_config(compose_cfg([*overrides, f"data.path={data_dir}"]))
    plan = plan_config(compose_cfg(overrides))
    assert plan.fits is True, f"{' '.join(overrides)}: peak {plan.memory.peak_bytes / 2**30:.1f} GiB " \
                              f"({plan.memory.peak_phase})"
