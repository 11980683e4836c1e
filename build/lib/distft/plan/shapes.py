"""Model shapes for planning, without the hub or the weights: a local config.json, the random-init shape in the
config, or a table of the Llama-2 shapes. Parameter counts are exact for Llama-architecture models (checked in
tests/unit/test_plan.py against transformers models built on the meta device)."""

import json
from dataclasses import dataclass
from pathlib import Path

from distft.errors import ConfigError

# The embedded tokenizer (SmolLM2's), which random-init models use unless model.vocab_size is set.
EMBEDDED_VOCAB = 49152


@dataclass(frozen=True)
class ModelShape:
    """A Llama-architecture decoder: embeddings, `layers` x (attention + SwiGLU MLP + 2 RMSNorms), norm, LM head."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    head_dim: int | None = None  # None: hidden // heads
    checkpoint_bytes: int = 2  # bytes per parameter in the weights file (hub Llama checkpoints: bf16/fp16)

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.hd

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, in_features, out_features) of one decoder layer's linear modules, as transformers names them."""
        d, q = self.hidden, self.heads * self.hd
        return [("q_proj", d, q), ("k_proj", d, self.kv_dim), ("v_proj", d, self.kv_dim), ("o_proj", q, d),
                ("gate_proj", d, self.intermediate), ("up_proj", d, self.intermediate),
                ("down_proj", self.intermediate, d)]

    def layer_linear_params(self) -> int:
        return sum(i * o for _, i, o in self.linears())

    def layer_params(self) -> int:
        return self.layer_linear_params() + 2 * self.hidden  # + input and post-attention RMSNorm weights

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    def root_params(self) -> int:
        """Parameters outside the decoder layers: embeddings, final norm, untied LM head."""
        return self.embedding_params() + self.hidden + self.head_params()

    def total_params(self) -> int:
        return self.root_params() + self.layers * self.layer_params()

    def quantized_params(self) -> int:
        """Weights bitsandbytes stores in 4 bits: every linear layer in the decoder blocks (not the LM head)."""
        return self.layers * self.layer_linear_params()

    def lora_params(self, r: int, target_modules: list[str] | str) -> int:
        """Exact number of LoRA parameters (A: r x in, B: out x r) that peft adds for `target_modules`."""
        return sum(r * (i + o) for i, o in self.lora_targets(target_modules))

    def layer_lora_targets(self, target_modules: list[str] | str) -> list[tuple[int, int]]:
        """(in, out) of the linear layers LoRA wraps in one decoder layer."""
        targets = self.lora_targets(target_modules)  # layer by layer, then lm_head if targeted
        return targets[: len(targets) // max(self.layers, 1)]

    def lora_targets(self, target_modules: list[str] | str) -> list[tuple[int, int]]:
        """(in, out) of every linear layer LoRA wraps. peft's "all-linear" is every linear layer except the LM head."""
        targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
        names = {n for n, _, _ in self.linears()}
        if targets == ["all-linear"]:
            chosen = names
        else:
            unknown = sorted(set(targets) - names - {"lm_head"})
            if unknown:
                raise ConfigError([f"method.target_modules={targets}: {unknown} are not linear layers of a Llama "
                                   f"model; use names from {sorted(names | {'lm_head'})} or [all-linear]"])
            chosen = set(targets)
        out = [(i, o) for n, i, o in self.linears() if n in chosen] * self.layers
        if "lm_head" in targets:  # listed last, so the first entries repeat per layer
            out.append((self.hidden, self.vocab))
        return out


# Llama-2 shapes from the models' config.json on the Hugging Face hub (meta-llama/Llama-2-{7b,13b,70b}-hf) and
# SmolLM2-135M-Instruct's (HuggingFaceTB/SmolLM2-135M-Instruct, also inside the embedded GGUF).
SHAPES = {
    "llama2_7b": ModelShape("llama2_7b", 4096, 11008, 32, 32, 32, 32000),
    "llama2_13b": ModelShape("llama2_13b", 5120, 13824, 40, 40, 40, 32000),
    "llama2_70b": ModelShape("llama2_70b", 8192, 28672, 80, 64, 8, 32000),
    "smollm2_135m": ModelShape("smollm2_135m", 576, 1536, 30, 9, 3, 49152, tied=True,
                               checkpoint_bytes=4),  # distft converts the embedded GGUF to fp32 safetensors
}
HUB_IDS = {
    "meta-llama/Llama-2-7b-hf": "llama2_7b", "meta-llama/Llama-2-7b-chat-hf": "llama2_7b",
    "meta-llama/Llama-2-13b-hf": "llama2_13b", "meta-llama/Llama-2-13b-chat-hf": "llama2_13b",
    "meta-llama/Llama-2-70b-hf": "llama2_70b", "meta-llama/Llama-2-70b-chat-hf": "llama2_70b",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2_135m",
}


def shape_from_config_json(path: Path, name: str) -> ModelShape:
    c = json.loads(Path(path).read_text())
    if c.get("model_type") not in (None, "llama", "mistral", "qwen2"):
        raise ConfigError([f"{path}: model_type={c.get('model_type')} is not a Llama-architecture model; the "
                           "planner's formulas cover Llama-style decoders only"])
    heads = c["num_attention_heads"]
    return ModelShape(name=name, hidden=c["hidden_size"], intermediate=c["intermediate_size"],
                      layers=c["num_hidden_layers"], heads=heads, kv_heads=c.get("num_key_value_heads") or heads,
                      vocab=c["vocab_size"], tied=bool(c.get("tie_word_embeddings", False)),
                      head_dim=c.get("head_dim"),
                      checkpoint_bytes=4 if (c.get("dtype") or c.get("torch_dtype")) == "float32" else 2)


def model_shape(model_cfg, model_dir: str | None = None) -> ModelShape:
    """The shape of `model.*` without downloading anything.

    Order: a prepared/local directory's config.json; the random-init shape in the config; the table above (by
    model.name or hub id). A hub model outside the table needs its config.json in a local directory.
    """
    for candidate in (model_dir, model_cfg.get("path")):
        if candidate and (Path(candidate) / "config.json").exists():
            return shape_from_config_json(Path(candidate) / "config.json", model_cfg.name)
    if model_cfg.source == "random":
        vocab = model_cfg.vocab_size
        if vocab is None:
            if model_cfg.tokenizer not in (None, "embedded"):
                raise ConfigError([f"model.tokenizer={model_cfg.tokenizer}: the planner cannot know its vocabulary "
                                   "size offline; set model.vocab_size"])
            vocab = EMBEDDED_VOCAB
        return ModelShape(model_cfg.name, model_cfg.hidden_size, model_cfg.intermediate_size, model_cfg.num_layers,
                          model_cfg.num_heads, model_cfg.num_kv_heads, vocab, tied=False,
                          checkpoint_bytes=4)  # distft.model.ensure_random_model saves fp32
    if model_cfg.source == "embedded":
        return SHAPES["smollm2_135m"]
    key = HUB_IDS.get(model_cfg.get("path") or "", model_cfg.name)
    if key in SHAPES:
        return SHAPES[key]
    raise ConfigError([f"model.path={model_cfg.get('path')}: no local config.json and not one of the known shapes "
                       f"({', '.join(sorted(SHAPES))}); download the model's config.json into a directory and set "
                       "model.path=DIR (the weights are not needed)"])
