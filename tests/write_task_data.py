"""Write SQL or ViGGO rows in the datasets' real schemas (the builders the tests use) as DIR/train.jsonl and
DIR/test.jsonl, for running the task presets where the hub cannot be reached:

    python -m tests.write_task_data sql /tmp/sql --train 400 --test 32

The rows are synthetic (a few question/query and meaning-representation patterns), not the datasets' own rows."""

import argparse
from pathlib import Path

from tests.conftest import sql_rows, viggo_rows, write_task_dir

BUILDERS = {"sql": sql_rows, "viggo": viggo_rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=sorted(BUILDERS))
    parser.add_argument("directory", type=Path)
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--test", type=int, default=32)
    args = parser.parse_args(argv)
    out = write_task_dir(args.directory, BUILDERS[args.task], train=args.train, test=args.test)
    print(f"{out}: {args.train} train and {args.test} test rows ({args.task})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
