"""What the export tests compare: every tensor of an export directory."""

from pathlib import Path

import torch
from safetensors.torch import load_file


def weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in `directory`, by name."""
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out
