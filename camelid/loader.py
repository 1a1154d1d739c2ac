"""Checkpoint -> Transformer: build on the meta device, then assign each tensor as it is read."""

from __future__ import annotations

import torch

from .errors import FormatError
from .formats import Checkpoint
from .model import Transformer


def build_model(ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Transformer:
    """The model with the checkpoint's weights, in `dtype` on `device`, in eval mode."""
    cfg = ckpt.config
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("output.weight", None)
    missing = sorted(set(expected) - set(ckpt.tensors))
    unexpected = sorted(set(ckpt.tensors) - set(expected))
    if missing:
        raise FormatError(f"{ckpt.path}: missing tensors {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if unexpected:
        raise FormatError(f"{ckpt.path}: unexpected tensors {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
    state = {}
    for name, shape in expected.items():
        lazy = ckpt.tensors[name]
        if tuple(lazy.shape) != shape:
            raise FormatError(f"{ckpt.path}: tensor {name} has shape {tuple(lazy.shape)}, the config needs {shape}")
        t = lazy.load()
        if tuple(t.shape) != shape:
            raise FormatError(f"{ckpt.path}: tensor {name} holds {tuple(t.shape)}, expected {shape}")
        state[name] = t.to(device=device, dtype=dtype)
    if cfg.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.reset_buffers()
    return model.eval().requires_grad_(False)
