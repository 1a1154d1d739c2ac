"""A LoRA adapter as a GGUF LoRA file, the kind llama.cpp applies with `--lora FILE` (unmerged, over any base).

What llama.cpp reads (src/llama-adapter.cpp; its convert_lora_to_gguf.py writes the same):
  general.type = "adapter", general.architecture = "llama" (the base's), adapter.type = "lora",
  adapter.lora.alpha (f32; llama.cpp's scale is alpha / r, r read from B);
  tensors `<base GGUF tensor name>.lora_a` and `.lora_b`, e.g. `blk.0.attn_q.weight.lora_a`, A [r, in] and
  B [out, r] in torch terms (numpy arrays of that shape: gguf-py reverses them into ggml's ne order itself).

camelid's Q/K rows are in rotate-half order, GGUF's in interleaved order: the rows of lora_B of attn_q / attn_k
are permuted as the base's Q/K rows are (A is untouched). rsLoRA (scale alpha / sqrt(r)) is written as
alpha * sqrt(r), since llama.cpp always divides by r.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from .gguf import gguf_name
from .layout import half_to_interleaved
from .peft import Adapter

TYPES = ("f32", "f16")


def gguf_alpha(adapter: Adapter) -> float:
    """The alpha that makes llama.cpp's alpha / r equal the adapter's scale."""
    return adapter.scale * adapter.r


def lora_tensors(adapter: Adapter, config: ModelConfig) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every A and B, in GGUF row order."""
    out = []
    for module, (a, b) in adapter.pairs.items():
        base = gguf_name(module + ".weight")
        b = b.detach().float()
        if module.endswith("attention.wq"):
            b = half_to_interleaved(b, config.n_heads)
        elif module.endswith("attention.wk"):
            b = half_to_interleaved(b, config.n_kv_heads)
        out.append((base + ".lora_a", a.detach().float().contiguous().numpy()))
        out.append((base + ".lora_b", b.contiguous().numpy()))
    return out


def write_gguf_lora(adapter: Adapter, config: ModelConfig, out: str | os.PathLike, kind: str = "f32",
                    name: str | None = None, overwrite: bool = False,
                    progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Write `adapter` (made for a base with `config`) as a GGUF LoRA file of type f32 or f16; a summary dict.

    The file appears at `out` only when complete; an existing `out` needs overwrite=True.
    """
    import gguf

    if kind not in TYPES:
        raise ValueError(f"GGUF LoRA type must be one of {', '.join(TYPES)}, got {kind!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists")
    tensors = lora_tensors(adapter, config)
    dtype = np.float32 if kind == "f32" else np.float16
    tmp = out.with_name(out.name + ".part")
    w = gguf.GGUFWriter(str(tmp), "llama")
    try:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_name(name or out.stem)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, gguf_alpha(adapter))
        for tname, arr in tensors:
            w.add_tensor_info(tname, arr.shape, np.dtype(dtype), arr.size * np.dtype(dtype).itemsize)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, (tname, arr) in enumerate(tensors):
            w.write_tensor_data(arr.astype(dtype, copy=False))
            if progress:
                progress(tname, i + 1, len(tensors))
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return {"path": str(out), "format": "gguf-lora", "type": kind.upper(), "r": adapter.r,
            "alpha": gguf_alpha(adapter), "tensors": len(tensors), "bytes": out.stat().st_size}
