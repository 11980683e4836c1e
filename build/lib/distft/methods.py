"""Fine-tuning methods: which parameters train. Full fine-tuning, LoRA (peft) and QLoRA (peft on a bitsandbytes
NF4 base)."""

import torch

from distft.dtypes import torch_dtype
from distft.errors import UserError

METHODS = ("full", "lora", "qlora")  # the `method` group's choices, in the order comparisons and plans list them


def quantization_config(*, quant_type: str, double_quant: bool, compute_dtype: str, quant_storage: str | None):
    """bitsandbytes 4-bit config for QLoRA."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise UserError("method=qlora needs bitsandbytes: `pip install 'distft[qlora]'`.") from e
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch_dtype(compute_dtype),
        bnb_4bit_quant_storage=torch_dtype(quant_storage) if quant_storage else torch.uint8,
    )


def apply_method(
    model,
    *,
    name: str,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    target_modules: list[str] | str = "all-linear",
    gradient_checkpointing: bool = False,
):
    """Mark trainable parameters (and wrap in peft for LoRA/QLoRA). Returns the model to train."""
    gc_kwargs = {"use_reentrant": False}  # non-reentrant checkpointing works with frozen inputs and DDP
    if name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        return model

    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if name == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=gc_kwargs
        )
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    targets = target_modules
    if isinstance(targets, (list, tuple)) and list(targets) == ["all-linear"]:
        targets = "all-linear"
    config = LoraConfig(
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=list(targets) if isinstance(targets, (list, tuple)) else targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)
