"""Host memory of one QLoRA load (`distft.model.load_model` with bitsandbytes 4-bit, as every rank loads the base)
on CPU: anonymous memory before, at its peak and after, and the checkpoint's file pages mapped meanwhile.

What it shows for the planner's GPU figure (`distft.plan.memory.device_map_in_flight`): transformers quantises while
loading one tensor at a time (no loading threads under on-the-fly quantisation), so above the model it keeps the
loader holds at most about one tensor in flight; the file's pages are mapped (RssFile, page cache). On CPU the
quantised model itself stays in host memory (the `after - before` column); on a GPU it is on the device, and what the
host holds is the in-flight part and the mapped pages. bench/gpu_check.py samples the same on a GPU.

    python bench/bench_qlora_load.py --out docs/results/qlora_load_cpu.json     # ~2 min, on bench_scale's 3.4B
    python bench/bench_qlora_load.py --shape tiny --out /tmp/qload.json         # smoke test
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from bench_memory import HostSampler, machine  # noqa: E402
from bench_scale import SHAPES, build_checkpoint, dir_bytes  # noqa: E402

GiB = 2**30


def child(model_dir: str) -> None:
    """One QLoRA load in this process, sampled every 5 ms; prints the figures as JSON."""
    sys.path.insert(0, str(REPO))
    import bitsandbytes  # noqa: F401 - imported before sampling starts, as the worker imports it
    import torch
    from transformers import BitsAndBytesConfig

    from distft.model import load_model

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    with HostSampler(interval=0.005) as host:
        start = time.perf_counter()
        model = load_model(model_dir, dtype="bf16", quantization_config=quant, device=torch.device("cpu"))
        seconds = time.perf_counter() - start
    kept = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"before": host.before, "peak": host.peak, "after": HostSampler.read(), "seconds": seconds,
                      "model_bytes": kept}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="3b", choices=sorted(SHAPES))
    parser.add_argument("--work-root", type=Path, default=Path(tempfile.gettempdir()) / "distft-bench-scale")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    args.work_root.mkdir(parents=True, exist_ok=True)
    base = build_checkpoint(args.shape, args.work_root)
    done = subprocess.run([sys.executable, __file__, "--child", str(base)], capture_output=True, text=True, check=True)
    run = json.loads(done.stdout.strip().splitlines()[-1])
    shape = SHAPES[args.shape]
    largest = max(shape["vocab_size"] * shape["hidden_size"], shape["intermediate_size"] * shape["hidden_size"]) * 2
    run.update(machine=machine(), shape=args.shape, checkpoint_bytes=dir_bytes(base), largest_tensor_bytes=largest,
               in_flight=run["peak"]["RssAnon"] - run["after"]["RssAnon"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(run, indent=2) + "\n")
    print(markdown(run))


def markdown(r: dict) -> str:
    g = lambda n: f"{n / GiB:.2f} GiB"  # noqa: E731
    return "\n".join([
        f"QLoRA load of `{r['shape']}` ({g(r['checkpoint_bytes'])} bf16 checkpoint) on CPU, {r['seconds']:.0f} s:", "",
        "| anon before | anon peak | anon after | peak - after (in flight) | largest tensor (bf16) | file pages mapped |",
        "|---|---|---|---|---|---|",
        f"| {g(r['before']['RssAnon'])} | {g(r['peak']['RssAnon'])} | {g(r['after']['RssAnon'])} | {g(r['in_flight'])} "
        f"| {g(r['largest_tensor_bytes'])} | {g(r['peak']['RssFile'])} |"])


if __name__ == "__main__":
    main()
