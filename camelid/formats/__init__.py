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
    # the stored encoding for quantized types, for runtimes that keep weights quantized: (kind, data).
    # GGUF: (ggml type name, uint8 array [rows, bytes per row] of its blocks, rows in canonical order);
    # camelid int8/int4 folders: ("int8" | "int4", dict of tensors). None for float tensors.
    raw: Callable[[], tuple[str, object]] | None = None


@dataclass
class Checkpoint:
    config: ModelConfig
    tensors: dict[str, LazyTensor]
    tokenizer: Tokenizer
    format: str  # "gguf", "hf", "meta"
    path: Path
    info: dict = field(default_factory=dict)  # format-specific facts for `camelid info`
    # hands back the resident pages of a memory-mapped file once its weights are converted (None: nothing to do)
    drop_pages: Callable[[], None] | None = None


def detect(folder: Path) -> tuple[str, Path, str]:
    """(format, path to read, why) for a model folder; FormatError when it holds no model."""
    has = lambda name: (folder / name).is_file()
    safetensors = sorted(folder.glob("*.safetensors"))
    shards = sorted(folder.glob("consolidated.*.pth"))
    if has("config.json") and (safetensors or has("model.safetensors.index.json")):
        what = f"{len(safetensors)} safetensors file{'s' if len(safetensors) != 1 else ''}"
        if has("model.safetensors.index.json"):
            what += " and model.safetensors.index.json"
        return "hf", folder, f"found config.json and {what}"
    if has("params.json") and shards:
        return "meta", folder, f"found params.json and {len(shards)} consolidated.*.pth shard{'s' if len(shards) != 1 else ''}"
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0], f"found one GGUF file, {ggufs[0].name}"
    if (folder / "original" / "params.json").is_file() and not has("config.json"):
        fmt, path, why = detect(folder / "original")
        return fmt, path, f"{why} in original/"
    if len(ggufs) > 1:
        raise FormatError(f"{folder}: {len(ggufs)} .gguf files; give the path of the one to use")
    if has("config.json"):
        if list(folder.glob("pytorch_model*.bin")):
            raise FormatError(f"{folder}: weights are pytorch_model*.bin; camelid reads Hugging Face folders with *.safetensors")
        raise FormatError(f"{folder}: config.json but no *.safetensors weights")
    if has("params.json"):
        raise FormatError(f"{folder}: params.json but no consolidated.NN.pth weights")
    if shards:
        raise FormatError(f"{folder}: consolidated.*.pth weights but no params.json")
    raise FormatError(f"{folder}: no model weights (expected config.json + *.safetensors, params.json + "
                      "consolidated.NN.pth, or a .gguf file)")


def read(path: str | os.PathLike) -> Checkpoint:
    """Read a model file or folder, choosing the format from what is there (Checkpoint.info["format_reason"] says why)."""
    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"no such file or folder: {p}")
    if p.is_dir():
        fmt, p, reason = detect(p)
    else:
        with open(p, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise FormatError(f"{p}: not a GGUF file (it starts with {magic!r}, not b'GGUF'); "
                              "for Hugging Face or Meta checkpoints give the folder")
        fmt, reason = "gguf", "the file starts with the GGUF magic"
    if fmt == "hf":
        from . import hf as reader
    elif fmt == "meta":
        from . import meta as reader
    else:
        from . import gguf as reader
    ckpt = reader.read(p)
    ckpt.info["format_reason"] = reason
    return ckpt


WRITE_TYPES = ("q8_0", "q4_0", "q4_1", "f16", "int8", "int4")


def write(ckpt: Checkpoint, out: str | os.PathLike, to: str, overwrite: bool = False,
          progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Write `ckpt` quantized to `to`: a GGUF file (q8_0, q4_0, q4_1, f16) or a camelid int8/int4 Hugging Face
    folder; a summary dict. The output appears only when complete; an existing `out` needs overwrite=True."""
    if to not in WRITE_TYPES:
        raise ValueError(f"unknown output type {to!r} (expected one of {', '.join(WRITE_TYPES)})")
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} exists")
    if to in ("int8", "int4"):
        if ckpt.config.arch != "llama":
            from ..errors import UnsupportedModelError

            raise UnsupportedModelError(f"{ckpt.config.arch} models are written as GGUF only (q8_0, q4_0, q4_1, f16), "
                                        f"not as a camelid {to} folder")
        from .hf_write import write_quantized_folder

        return write_quantized_folder(ckpt, out, to, progress, overwrite)
    from .gguf_write import write_gguf

    return write_gguf(ckpt, out, to, progress, overwrite)
