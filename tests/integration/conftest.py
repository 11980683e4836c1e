"""Helpers for the slow tier: run the real command path on a tiny random Llama with 2 Ray CPU workers."""

from pathlib import Path

import pytest

from distft.launch import launch
from distft.model import disable_bnb_cpu_repack
from distft.tracking import read_metrics
from tests.conftest import compose_cfg, tiny_model_dir

EXPERIMENT = {"full": "gsm8k_full", "lora": "gsm8k_lora", "qlora": "gsm8k_qlora"}
# Learning rates large enough that a tiny random model's eval loss visibly falls within a few steps.
TEST_LR = {"full": 3e-3, "lora": 3e-2, "qlora": 3e-2}
# Parity runs: 10 fp32 steps, no eval or export, so only the optimisation path is compared.
PARITY = ("trainer.max_steps=10", "eval.enabled=false", "run.export=false", "trainer.checkpoint_every=100")
NO_EVAL = ("eval.enabled=false", "run.export=false")
# Gradient accumulation runs: 1 row x 4 micro-batches x 2 workers per step.
ACCUM = ("trainer.global_batch_size=8", "trainer.max_steps=4", *NO_EVAL)


def run_tiny(tmp_path: Path, gsm8k_dir: Path, name: str, method: str = "lora", *overrides: str) -> dict:
    """`python -m distft.train +experiment=gsm8k_<method> model=tiny_llama hardware=cpu ...`, in-process, on DDP
    unless the overrides name a strategy (gsm8k_full defaults to FSDP, for 7B on GPUs)."""
    if not any(o.startswith("strategy=") for o in overrides):
        overrides = ("strategy=ddp", *overrides)
    cfg = compose_cfg([
        f"+experiment={EXPERIMENT[method]}", "model=tiny_llama", "hardware=cpu",
        f"run.storage_path={tmp_path}", f"run.name={name}", f"data.path={gsm8k_dir}",
        "data.max_train_examples=96", "data.seq_len=384", "trainer.max_steps=6", "trainer.checkpoint_every=2",
        "trainer.warmup_steps=1", f"trainer.lr={TEST_LR[method]}", "trainer.progress_bar=false",
        "eval.loss_examples=16", "eval.gsm8k_examples=4", "eval.max_new_tokens=8", "eval.at_start=true",
        "scaling.num_workers=2", *overrides,
    ])
    return launch(cfg)


def curve(run_dir: str) -> dict[int, float]:
    """Per-step training loss, keyed by step."""
    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl")}


def assert_curves_close(actual: dict[int, float], expected: dict[int, float], rel: float = 1e-4) -> None:
    assert actual.keys() == expected.keys()
    for step in expected:
        assert actual[step] == pytest.approx(expected[step], rel=rel), f"step {step}: {actual[step]} vs {expected[step]}"


@pytest.fixture(scope="session")
def ddp_parity_curves(tmp_path_factory, gsm8k_dir, ray_cluster) -> dict[str, dict[int, float]]:
    """The DDP loss curves (full and LoRA) that every other strategy must reproduce."""
    out = {}
    root = tmp_path_factory.mktemp("ddp-parity")
    for method in ("full", "lora"):
        summary = run_tiny(root, gsm8k_dir, f"ddp-{method}", method, "strategy=ddp", *PARITY)
        assert summary["status"] == "completed", summary["error"]
        out[method] = curve(summary["run_dir"])
    return out


@pytest.fixture(scope="session")
def ddp_accum_curve(tmp_path_factory, gsm8k_dir, ray_cluster) -> dict[int, float]:
    """DDP full fine-tuning with 4 micro-batches of 1 row per step: the curve accumulation elsewhere must match."""
    summary = run_tiny(tmp_path_factory.mktemp("ddp-accum"), gsm8k_dir, "ddp-accum", "full", "strategy=ddp", *ACCUM,
                       "trainer.micro_batch_size=1")
    assert summary["status"] == "completed", summary["error"]
    assert summary["grad_accum"] == 4
    return curve(summary["run_dir"])


def reload_export_and_compare(run_dir: Path, export: Path, method: str, atol: float):
    """Reload an export with plain transformers (full) or peft (LoRA/QLoRA), no distft code, and check it reproduces
    the trained model's logits on the run's probe (`export_probe.pt`). Returns the reloaded model and the probe."""
    import torch

    probe = torch.load(run_dir / "export_probe.pt")
    if method == "full":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    else:
        from peft import AutoPeftModelForCausalLM

        kwargs = {}
        if method == "qlora":
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32)
        model = AutoPeftModelForCausalLM.from_pretrained(export, dtype=torch.float32, **kwargs)
        # Training used bitsandbytes' dequantise-and-matmul kernel (distft.model.load_model turns the other one off);
        # on CPUs with AVX512-BF16 an eval forward would otherwise switch to a repacked kernel with bf16 scales.
        disable_bnb_cpu_repack(model)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], use_cache=False).logits.float()
    assert torch.allclose(logits, probe["logits"], atol=atol), (logits - probe["logits"]).abs().max()
    assert (export / "tokenizer.json").exists()  # the tokenizer travels with the export
    return model, probe


def spawn_two_ranks(target, out_dir: Path, what: str) -> None:
    """Run `target(rank, port, tiny_model_dir, out_dir)` as two spawned torch.distributed ranks; fail (not hang)
    as soon as a rank exits non-zero (the other would wait in a collective forever), or if they are not done within
    10 minutes."""
    import multiprocessing
    import socket
    import time

    model_dir = tiny_model_dir()
    ctx = multiprocessing.get_context("spawn")
    with socket.socket() as s:  # a port nothing listens on now (a random one could be one of Ray's)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=target, args=(r, port, model_dir, str(out_dir))) for r in (0, 1)]
    for p in procs:
        p.start()
    deadline = time.time() + 600
    while any(p.is_alive() for p in procs) and time.time() < deadline:
        if any(p.exitcode not in (None, 0) for p in procs):
            break
        time.sleep(0.5)
    alive = [p.is_alive() for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    codes = [p.exitcode for p in procs]
    assert all(c == 0 for c in codes), f"{what}: exit codes {codes} (alive before the kill: {alive})"
