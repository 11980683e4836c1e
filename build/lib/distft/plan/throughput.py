"""Throughput and cost: FLOPs per token from the model's shape, tokens/s from a configured efficiency (MFU x peak
FLOP/s) or a measured rate, and the tokens of one epoch of the configured dataset."""

import json
from pathlib import Path

from distft.plan.shapes import ModelShape

# Dense bf16 tensor-core peaks per GPU, from NVIDIA's datasheets (docs/planner.md has the links).
PEAK_TFLOPS = {"A100": 312.0, "H100-SXM": 989.4, "H100-PCIe": 756.5}
PCIE_BYTES_PER_S = 25e9  # host<->GPU copies for offloaded states (PCIe 4.0 x16, ~25 GB/s achieved)
CPU_ADAM_PARAMS_PER_S = 1e9  # DeepSpeedCPUAdam / torch on CPU, parameters updated per second and worker
CHARS_PER_TOKEN = 4.0  # English text with a Llama/GPT-style BPE tokenizer (used only when no tokenizer is local)
TEMPLATE_TOKENS = 30  # prompt template / chat markup per example in that estimate
GSM8K_TRAIN_TOKENS = 1_500_000  # GSM8K train split (7,473 examples) with the embedded tokenizer, packed (FINDINGS)


def matmul_params(shape: ModelShape) -> int:
    """Parameters that take part in a matrix multiply per token: every decoder linear and the LM head (the
    embedding lookup is free)."""
    return shape.layers * shape.layer_linear_params() + shape.vocab * shape.hidden


def flops_per_token(shape: ModelShape, *, method: str, seq_len: int, gradient_checkpointing: bool,
                    lora_params: int = 0) -> float:
    """Training FLOPs per token, forward + backward.

    Full: 6N (forward 2N, backward 4N: activation and weight gradients) plus 12·L·d·seq for attention scores
    (PaLM, appendix B). LoRA/QLoRA: the frozen base needs activation gradients but no weight gradients, so 4N,
    plus 6 per adapter parameter; the 4-bit dequantisation is not counted. Activation checkpointing recomputes the
    forward: +2N and +1/3 of the attention term.
    """
    n = matmul_params(shape)
    attention = 12 * shape.layers * shape.hidden * seq_len
    flops = (6 * n if method == "full" else 4 * n + 6 * lora_params) + attention
    if gradient_checkpointing:
        flops += 2 * n + attention / 3
    return float(flops)


def offload_seconds_per_step(*, trainable: int, module_bytes: int, world: int, micro_steps: int,
                             offload_optimizer: bool, offload_params: bool) -> float:
    """Extra time per optimizer step for offloaded states: copies over PCIe and the optimizer step on the CPU."""
    seconds = 0.0
    if offload_optimizer:
        seconds += 4 * trainable / world / PCIE_BYTES_PER_S  # bf16 gradients down, bf16 weights back
        seconds += trainable / world / CPU_ADAM_PARAMS_PER_S
    if offload_params:
        seconds += 2 * micro_steps * module_bytes / PCIE_BYTES_PER_S  # every weight fetched for forward and backward
    return seconds


def dataset_tokens(*, name: str, path: str | None, tokenizer_dir: str | None, seq_len: int, packing: bool,
                   limit: int | None, template: str, hub_id: str, system_prompt: str | None) -> tuple[int, str]:
    """Tokens in one epoch of the training split and how they were obtained: counted with the model's tokenizer
    (packed rows, as training sees them) when both data and tokenizer are local, else estimated."""
    train = Path(path) / "train.jsonl" if path else None
    if train is not None and train.exists() and tokenizer_dir and (Path(tokenizer_dir) / "tokenizer_config.json").exists():
        from distft.data import build_rows
        from distft.model import load_tokenizer

        tok = load_tokenizer(tokenizer_dir)
        rows, _ = build_rows(split="train", packing=packing, limit=limit, name=name, path=path, tokenizer=tok,
                             template=template, seq_len=seq_len, hub_id=hub_id, system_prompt=system_prompt)
        return sum(len(r.input_ids) for r in rows), f"counted: {len(rows)} packed rows of {train}"
    if train is not None and train.exists():
        chars = examples = 0
        with open(train) as f:
            for line in f:
                if line.strip():
                    chars += sum(len(str(v)) for v in json.loads(line).values())
                    examples += 1
                    if limit is not None and examples >= limit:
                        break
        tokens = int(chars / CHARS_PER_TOKEN + TEMPLATE_TOKENS * examples)
        return tokens, f"estimated: {examples} examples, {CHARS_PER_TOKEN:g} characters per token + template"
    if name == "gsm8k":
        return GSM8K_TRAIN_TOKENS, "estimated: GSM8K train split, 1.5M tokens (data not local)"
    return 0, "unknown: data not local"
