"""Peak memory of the training step with and without the chunked loss (`trainer.loss_chunk_tokens`), on a tiny Llama
with a Llama-3-size vocabulary (128,256 tokens), where the loss is the largest activation.

    python bench/bench_loss_memory.py --out bench/results/loss_memory_cpu.json

One process, CPU, fp32: the step (forward, loss, backward) of one 2048-token row runs alternately unchunked and
chunked, each measured as the peak resident memory above what was resident before the forward (Linux: the peak is
reset through /proc/self/clear_refs before each step). Also records both losses and whether the gradients are equal.
"""

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="model dtype (GPU runs: bf16)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from distft.dist import current_memory_bytes, peak_memory_bytes, reset_peak_memory
    from distft.loss import causal_lm_loss_sum

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq_len,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[args.dtype]))
    ids = torch.randint(0, args.vocab, (1, args.seq_len))
    labels = ids.clone()
    labels[:, : args.seq_len // 4] = -100  # a prompt, as in SFT
    cpu = torch.device("cpu")

    def step(chunk: int | None) -> dict:
        model.zero_grad(set_to_none=True)
        before = current_memory_bytes(cpu)
        if not reset_peak_memory(cpu):
            raise SystemExit("cannot reset the peak resident memory on this platform (Linux only)")
        started = time.perf_counter()
        logits = model(input_ids=ids, use_cache=False).logits
        forward_peak, after_forward = peak_memory_bytes(cpu), current_memory_bytes(cpu)
        reset_peak_memory(cpu)
        loss = causal_lm_loss_sum(logits, labels, chunk_tokens=chunk)
        loss.backward()
        seconds = time.perf_counter() - started
        loss_peak = peak_memory_bytes(cpu)
        del logits
        grads = torch.cat([p.grad.flatten().float() for p in model.parameters()])
        # the step: its peak above what was resident before it; the loss step: from the logits to the gradients,
        # above what was resident once the forward had produced the logits
        return {"peak_above_start_bytes": max(forward_peak, loss_peak) - before,
                "loss_step_peak_bytes": loss_peak - after_forward, "loss": float(loss.detach()), "seconds": seconds,
                "grads": grads}

    runs = {"whole": [], "chunked": []}
    for _ in range(args.repeats):
        for name, chunk in (("whole", None), ("chunked", args.chunk)):
            runs[name].append(step(chunk))
    same_grads = all(torch.equal(a["grads"], b["grads"]) for a, b in zip(runs["whole"], runs["chunked"],
                                                                            strict=True))
    for rows in runs.values():
        for r in rows:
            del r["grads"]
    def least(name: str, key: str) -> int:
        return min(r[key] for r in runs[name])

    logits_bytes = args.seq_len * args.vocab * (4 if args.dtype == "fp32" else 2)
    result = {"vocab": args.vocab, "seq_len": args.seq_len, "chunk_tokens": args.chunk, "dtype": args.dtype,
              "repeats": args.repeats, "logits_bytes": logits_bytes, "runs": runs, "same_gradients": same_grads,
              "loss_whole": runs["whole"][0]["loss"], "loss_chunked": runs["chunked"][0]["loss"],
              "torch": torch.__version__}
    for key in ("peak_above_start_bytes", "loss_step_peak_bytes"):
        result[key] = {"whole": least("whole", key), "chunked": least("chunked", key),
                       "ratio": least("whole", key) / least("chunked", key)}
    step, loss_step = result["peak_above_start_bytes"], result["loss_step_peak_bytes"]
    print(f"{args.dtype}, vocab {args.vocab}, {args.seq_len} tokens (logits {logits_bytes / 2**30:.2f} GiB), chunks of "
          f"{args.chunk}: loss step {loss_step['whole'] / 2**30:.2f} -> {loss_step['chunked'] / 2**30:.2f} GiB "
          f"({loss_step['ratio']:.2f}x less); whole step {step['whole'] / 2**30:.2f} -> "
          f"{step['chunked'] / 2**30:.2f} GiB ({step['ratio']:.2f}x); gradients equal: {same_grads}; loss "
          f"{result['loss_whole']:.6f} vs {result['loss_chunked']:.6f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
