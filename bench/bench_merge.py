"""LoRA merged into its base (`method.merge_on_export`, `python -m distft.merge`): streamed one tensor at a time
against peft's merge_and_unload on the whole model (what distft did before), peak RSS and wall time of each, and
whether the two outputs are the same bit for bit.

The base is bench_scale's random-initialised 3.4B Llama (26 x 3200, bf16, 2 GB safetensors shards); the adapter a
random LoRA r=16 on every linear layer, written by peft. Each merge runs in a process of its own (its peak RSS from
getrusage), into bf16, as a GPU run's merge (run.compute_dtype).

    python bench/bench_merge.py --out docs/results/merge_cpu.json     # ~5 min, 24 GiB
    python bench/bench_merge.py --report docs/results/merge_cpu.json  # the table
    python bench/bench_merge.py --shape tiny --out /tmp/merge.json    # smoke test
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from bench_memory import machine  # noqa: E402
from bench_scale import SHAPES, build_checkpoint, dir_bytes  # noqa: E402

GiB = 2**30
WAYS = ("streamed", "peft")  # distft.merge today; peft's merge on the whole model (distft before)


def build_adapter(base: Path, out: Path, r: int = 16) -> Path:
    """A LoRA adapter for `base` with random A and B, written by peft; the base is never read (built on meta)."""
    if (out / "adapter_model.safetensors").exists():
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False,
                      base_model_name_or_path=str(base))
    peft_model = get_peft_model(model, lora)
    torch.manual_seed(0)
    for name, module in peft_model.named_modules():
        if name.endswith(("lora_A.default", "lora_B.default")):
            module.to_empty(device="cpu")
            torch.nn.init.normal_(module.weight, std=0.02)
    tmp = out.with_name(out.name + ".partial")
    peft_model.save_pretrained(tmp)
    sys.path.insert(0, str(REPO))
    from distft.model import load_tokenizer

    load_tokenizer(str(base)).save_pretrained(tmp)
    tmp.rename(out)
    return out


def child(way: str, base: str, adapter: str, out: str) -> None:
    """One merge in this process; prints its wall time and peak RSS as JSON."""
    sys.path.insert(0, str(REPO))
    from distft import merge

    start = time.perf_counter()
    if way == "streamed":
        info = merge.merge_adapter(base, Path(adapter), Path(out), dtype="bf16")
        assert info["streamed"], info
    else:
        from transformers import AutoTokenizer

        merge._merge_whole(base, Path(adapter), Path(out), dtype="bf16")
        AutoTokenizer.from_pretrained(adapter).save_pretrained(out)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def same_outputs(a: Path, b: Path) -> bool:
    """Every tensor of the two merged models equal bit for bit, read one at a time."""
    sys.path.insert(0, str(REPO))
    import torch

    from distft.export_shards import open_safetensors, written_files

    files_a, files_b = written_files(a), written_files(b)
    if files_a != files_b:
        return False
    handles = {}
    for key, file in files_a.items():
        for d in (a, b):
            handles.setdefault(d / file, open_safetensors(str(d / file)))
        x, y = (handles[d / file].get_tensor(key) for d in (a, b))
        if x.dtype != y.dtype or not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="3b", choices=sorted(SHAPES))
    parser.add_argument("--work-root", type=Path, default=Path(tempfile.gettempdir()) / "distft-bench-scale")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--report", type=Path, help="print the table of a recorded run and exit")
    parser.add_argument("--child", nargs=4, metavar=("WAY", "BASE", "ADAPTER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    if args.report:
        return print(markdown(json.loads(args.report.read_text())))
    args.work_root.mkdir(parents=True, exist_ok=True)
    base = build_checkpoint(args.shape, args.work_root)
    adapter = build_adapter(base, args.work_root / f"lora-{args.shape}")
    results = {"machine": machine(), "shape": args.shape, "base_bytes": dir_bytes(base), "runs": {}}
    with tempfile.TemporaryDirectory(dir=args.work_root) as tmp:
        for way in WAYS:
            out = Path(tmp) / way
            done = subprocess.run([sys.executable, __file__, "--child", way, str(base), str(adapter), str(out)],
                                  capture_output=True, text=True, check=True)
            run = json.loads(done.stdout.strip().splitlines()[-1])
            run["out_bytes"] = dir_bytes(out)
            results["runs"][way] = run
            print(way, run, flush=True)
        results["identical"] = same_outputs(Path(tmp) / "streamed", Path(tmp) / "peft")
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(markdown(results))
    if not results["identical"]:
        sys.exit("the streamed merge differs from peft's")


def markdown(res: dict) -> str:
    runs = res["runs"]
    rows = [f"| {way} | {runs[way]['peak_rss'] / GiB:.2f} GiB | {runs[way]['seconds']:.0f} s |" for way in WAYS]
    ratio = runs["peft"]["peak_rss"] / runs["streamed"]["peak_rss"]
    return "\n".join([
        f"Base {res['shape']}: {res['base_bytes'] / GiB:.2f} GiB of bf16 safetensors; merged into bf16.", "",
        "| merge | peak RSS | wall |", "|---|---|---|", *rows, "",
        f"peft's whole-model merge peaks {ratio:.1f}x higher; outputs identical bit for bit: {res['identical']}"])


if __name__ == "__main__":
    main()
