"""`python -m distft.eval EXPORT_DIR [--examples N] [--workers K] ...`: test accuracy of an export on its run's task
(GSM8K, SQL or ViGGO: the run's data.name; GSM8K for an export outside a run directory).

Greedy generation in batches, spread over K Ray actors (Ray Data `map_batches` with an actor pool); joins the cluster
at --address / RAY_ADDRESS, else starts a local one. Writes a JSON result (accuracy, 95% Wilson interval, format rate,
outputs) and prints the headline numbers.
"""

import argparse
import json
import os
import sys
from pathlib import Path

from distft.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distft.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", type=Path, help="a run's export/ directory (full model or LoRA adapter)")
    parser.add_argument("--examples", type=int, default=None, help="first N test questions (default: all)")
    parser.add_argument("--workers", type=int, default=1, help="generation actors (default 1)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="generation budget (default: the run's eval.max_new_tokens, else 256)")
    parser.add_argument("--data-path", default=None,
                        help="directory with test.jsonl (default: the run's data.path, else the task's hub dataset)")
    parser.add_argument("--template", choices=("auto", "chat", "plain"), default=None,
                        help="prompt template (default: the run's data.template)")
    parser.add_argument("--cpus-per-worker", type=float, default=1)
    parser.add_argument("--gpus-per-worker", type=float, default=None,
                        help="GPUs per actor (default: 1 when the cluster has GPUs, else 0)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local one)")
    parser.add_argument("--output", type=Path, default=None,
                        help="result JSON (default: <run dir>/eval_<task>.json beside the export, else ./eval_<task>.json)")
    args = parser.parse_args(argv)

    from distft.eval.export_eval import default_output, evaluate_export, export_kind, write_result

    problems = []
    if args.examples is not None and args.examples < 1:
        problems.append(f"--examples={args.examples} must be at least 1")
    if args.workers < 1:
        problems.append(f"--workers={args.workers} must be at least 1")
    if args.batch_size < 1:
        problems.append(f"--batch-size={args.batch_size} must be at least 1")
    try:
        export_kind(args.export_dir)
    except UserError as e:
        problems.append(str(e))
    if problems:
        print("distft.eval: error:\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        return 2

    import ray

    address = args.address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            ray.init(num_cpus=max(os.cpu_count() or 1, int(args.workers * args.cpus_per_worker)),
                     include_dashboard=False)
    gpus = args.gpus_per_worker
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    try:
        result = evaluate_export(args.export_dir, examples=args.examples, workers=args.workers,
                                 batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                 data_path=args.data_path, template=args.template,
                                 cpus_per_worker=args.cpus_per_worker, gpus_per_worker=gpus)
    except UserError as e:
        print(f"distft.eval: error: {e}", file=sys.stderr)
        return 2
    output = args.output or default_output(args.export_dir)
    write_result(result, output)
    headline = {k: result[k] for k in ("task", "metric", "accuracy", "ci95", "num_examples", "seconds")}
    print(json.dumps(headline | {"output": str(output)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
