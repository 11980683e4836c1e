"""What the export, streaming-load and merge tests share: every tensor of an export directory, and small random
checkpoints in the layouts a loader meets."""

from pathlib import Path

import torch
from safetensors.torch import load_file

from distft.model import ensure_random_model, load_tokenizer

# 4 layers with a small vocabulary, so that a decoder layer (148 kB) is the largest group and the model ~6 of them
SHAPE = dict(vocab_size=512, num_layers=4)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in `directory`, by name."""
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def write_checkpoints(root: Path) -> dict[str, str]:
    """The same random Llama as a sharded safetensors checkpoint (index + several files) and as .bin only, and a
    tied-embedding Llama in one model.safetensors; each with the tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    base = ensure_random_model(**SHAPE)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    dirs = {name: root / name for name in ("sharded", "bin", "tied")}
    model.save_pretrained(dirs["sharded"], max_shard_size="100KB")
    model.config.save_pretrained(dirs["bin"])
    torch.save(model.state_dict(), dirs["bin"] / "pytorch_model.bin")
    config = LlamaConfig.from_pretrained(base)
    config.tie_word_embeddings = True
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(dirs["tied"])
    tokenizer = load_tokenizer(str(base))
    for d in dirs.values():
        tokenizer.save_pretrained(d)
    return {name: str(d) for name, d in dirs.items()}
