"""Time-to-refusal of every bad input in tests/cli_cases.py, run as a user runs it (a fresh `python -m distft.train`
process per input, from another directory), and the message it prints. Writes the table of docs/bad_inputs.md.

    python bench/bench_refusals.py --out docs/bad_inputs.md

The time is the whole command's wall time (interpreter start, imports, Hydra, the checks) on this machine; no input
may start Ray. Not a test: tests/cli/test_bad_inputs.py checks the same inputs' exit codes and messages.
"""

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.cli_cases import CASES, prepare  # noqa: E402

HEADER = """# Bad inputs and their refusals

Each row is one bad input from `tests/cli_cases.py`, run as a fresh command from another directory; the same inputs
are tests (`tests/cli/test_bad_inputs.py`: exit code 2, no traceback, no Ray started, an earlier run's file kept).
Time is the whole command's wall time, interpreter start and imports included. Produced by
`python bench/bench_refusals.py --out docs/bad_inputs.md` on {machine}; {summary}.

Config typos and type errors are caught before Hydra runs the job; cross-field checks, the storage path, the model
directory or hub id, the data (every line, the fields, the seq_len filter, one step's worth of rows, the test split)
and `run.resume_from` are checked on the driver before Ray starts. Data the driver cannot read on a cluster it
joins is checked on the workers instead (a note says so); a worker's user error then prints as one message too.

| input | command-line arguments (after the test's base run) | s | exit | message (first line, shortened) |
|---|---|---:|---:|---|
"""


def message(output: str) -> str:
    found = re.search(r"(?:distft(?:\.\w+)?: error:)\s*(.*)", output, re.S)
    text = found.group(1) if found else output
    lines = [ln.strip(" -") for ln in text.strip().splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    if first.startswith("invalid config") and len(lines) > 1:
        first = lines[1]
    if first.endswith("invalid row problem(s):") and len(lines) > 1:
        first = lines[1]
    return first[:150] + ("…" if len(first) > 150 else "")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="markdown file to write (default: print)")
    args = p.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    rows, times = [], []
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            argv = prepare(case, Path(tmp))
            started = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", *argv], cwd=tmp, env=env, capture_output=True, text=True,
                                 timeout=300)
            seconds = time.perf_counter() - started
        output = out.stdout + out.stderr
        ray = "Started a local Ray instance" in output
        shown = " ".join(a.format(tmp="TMP", data="TMP/data", runs="TMP/runs") for a in case.args) \
            or "(its data files)"
        rows.append(f"| {case.name} | `{shown}` | {seconds:.1f} | {out.returncode}{' RAY' if ray else ''} | "
                    f"{message(output).replace('|', '/').replace(tmp, 'TMP')} |")
        times.append(seconds)
        print(f"{case.name}: {seconds:.1f} s, exit {out.returncode}", file=sys.stderr)
    machine = f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"
    summary = (f"{len(CASES)} inputs, median {sorted(times)[len(times) // 2]:.1f} s, slowest {max(times):.1f} s "
               f"({CASES[times.index(max(times))].name})")
    text = HEADER.format(machine=machine, summary=summary) + "\n".join(rows) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
