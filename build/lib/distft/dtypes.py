"""The dtype names configs use (`trainer.precision`, `method.compute_dtype`, `method.quant_storage`) and their torch
dtypes: the one place that maps between them."""

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The config name of a torch dtype ("bf16"), or its torch spelling when configs have no name for it."""
    return _NAMES.get(dtype, str(dtype))
