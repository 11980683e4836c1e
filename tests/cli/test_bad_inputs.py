"""Every bad input in tests/cli_cases.py, run as a user runs it (`python -m distft.train ...` in a subprocess from
another directory): exit code 2, one message naming the problem and the fix, no Python traceback, no Ray started,
and the file an earlier run left in the run directory untouched."""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.cli_cases import CASES, Case, prepare
from tests.conftest import REPO

pytestmark = pytest.mark.cli

TEST = "test_bad_input_is_refused_plainly"


def _refuse(case: Case, tmp: Path) -> tuple[int, str]:
    argv = prepare(case, tmp)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-m", *argv], cwd=tmp, env=env, capture_output=True, text=True,
                         timeout=180)
    return out.returncode, out.stdout + out.stderr


@pytest.fixture(scope="module")
def refusals(request, tmp_path_factory) -> dict[str, tuple[Path, int, str]]:
    """The selected cases, two commands at a time: each is one Python process that imports and exits, so two
    cores run two of them in about the time of one."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if getattr(item, "originalname", None) == TEST]
    dirs = {case.name: tmp_path_factory.mktemp(case.name) for case in selected}
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = dict(zip(dirs, pool.map(lambda case: _refuse(case, dirs[case.name]), selected), strict=True))
    return {name: (dirs[name], *done[name]) for name in done}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_plainly(case, refusals):
    tmp, returncode, output = refusals[case.name]
    assert returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "Started a local Ray instance" not in output
    for words in case.expect:
        assert words in output, f"{words!r} not in:\n{output[-3000:]}"
    assert (tmp / "runs" / "case" / "saved.txt").read_text() == "an earlier run's file"
    assert not list((tmp / "runs").rglob("checkpoint_*"))
