"""Model file formats. Each module reads one format into a Checkpoint: (config, lazy tensors, tokenizer).

Tensor names are camelid's canonical ones (those of camelid.model.Transformer's state dict), and Q/K
rows are already in rotate-half order, so the model never knows which format it came from.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import FormatError, ModelNotFoundError
from ..tokenizer import Tokenizer


@dataclass
class LazyTensor:
    """A tensor that is read (and dequantized) from its file only when `load()` is called."""

    shape: tuple[int, ...]
    dtype: str  # the stored type, e.g. "F32", "Q4_1", "bfloat16"
    load: Callable[[], torch.Tensor]


@dataclass
class Checkpoint:
    config: ModelConfig
    tensors: dict[str, LazyTensor]
    tokenizer: Tokenizer
    format: str  # "gguf", "hf", "meta"
    path: Path
    info: dict = field(default_factory=dict)  # format-specific facts for `camelid info`


def read(path: str | os.PathLike) -> Checkpoint:
    """Read a model file or folder, choosing the format from what is there."""
    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"no such file or folder: {p}")
    if p.is_file():
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            from . import gguf

            return gguf.read(p)
        raise FormatError(f"{p}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    raise FormatError(f"{p}: a folder with no model camelid can read (expected a .gguf file)")
