"""Every bad input in tests/cli_cases.py, run as a user runs it (`python -m distft.train ...` in a subprocess from
another directory): exit code 2, one message naming the problem and the fix, no Python traceback, no Ray started,
and the file an earlier run left in the run directory untouched."""

import os
import subprocess
import sys

import pytest

from tests.cli_cases import CASES, prepare
from tests.conftest import REPO

pytestmark = pytest.mark.cli


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_plainly(case, tmp_path):
    argv = prepare(case, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-m", *argv], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=180)
    output = out.stdout + out.stderr
    assert out.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "Started a local Ray instance" not in output
    for words in case.expect:
        assert words in output, f"{words!r} not in:\n{output[-3000:]}"
    assert (tmp_path / "runs" / "case" / "saved.txt").read_text() == "an earlier run's file"
    assert not list((tmp_path / "runs").rglob("checkpoint_*"))
