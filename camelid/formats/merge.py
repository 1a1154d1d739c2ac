"""Merging a LoRA adapter into a checkpoint: W' = W + scale * B @ A, computed in float32 when a tensor is loaded.

The result is an ordinary Checkpoint, so every writer (GGUF, Hugging Face folders) takes it as it takes a model
read from a file; tensors the adapter does not touch are the source's LazyTensors, unchanged (a quantized source
keeps its raw blocks there). Adapted weights are dequantized, merged and reported as "F32".
"""

from __future__ import annotations

from dataclasses import replace

import torch

from . import Checkpoint, LazyTensor
from .peft import Adapter


def linear_shapes(ckpt: Checkpoint) -> dict[str, tuple[int, int]]:
    """module -> (out, in) of every 2-D block weight, e.g. "layers.0.attention.wq" -> (576, 576)."""
    return {name.removesuffix(".weight"): (t.shape[0], t.shape[1]) for name, t in ckpt.tensors.items()
            if name.startswith("layers.") and name.endswith(".weight") and len(t.shape) == 2}


def check_adapter(ckpt: Checkpoint, adapter: Adapter) -> None:
    """FormatError (one line, naming the module and both shapes) when the adapter does not fit the checkpoint."""
    adapter.check_shapes(linear_shapes(ckpt), where=f"the base model {ckpt.path.name}")


def _merged(t: LazyTensor, adapter: Adapter, module: str) -> LazyTensor:
    def load() -> torch.Tensor:
        return t.load().float() + adapter.delta(module)

    return LazyTensor(shape=tuple(t.shape), dtype="F32", load=load)


def merge(ckpt: Checkpoint, adapter: Adapter) -> Checkpoint:
    """A Checkpoint whose adapted weights load as W + adapter.delta(module), in float32; the rest as it was.

    The adapter's shapes are checked first (FormatError naming the module otherwise); `ckpt` is not changed.
    """
    check_adapter(ckpt, adapter)
    tensors = dict(ckpt.tensors)
    for module in adapter.pairs:
        tensors[module + ".weight"] = _merged(ckpt.tensors[module + ".weight"], adapter, module)
    info = {**ckpt.info, "merged_adapter": {"r": adapter.r, "alpha": adapter.alpha, "modules": len(adapter.pairs)}}
    return replace(ckpt, tensors=tensors, info=info)
