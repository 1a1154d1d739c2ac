"""`camelid export` and camelid.export(): a model (optionally with a LoRA adapter merged in) as a GGUF file or a
Hugging Face folder, or the adapter alone as a GGUF LoRA file for llama.cpp's `--lora`.

    to="gguf"       merged model -> GGUF (llama.cpp loads it); type f16 (default), f32, q8_0, q4_0, q4_1
    to="hf"         merged model -> float Hugging Face folder (transformers loads it); type f32, f16, bf16
                    (default: the source's float precision: bf16/f16 when stored so, else f32)
    to="gguf-lora"  the adapter alone -> GGUF LoRA file; type f32 (default) or f16; the model is needed to check
                    that the adapter fits it and for the Q/K row order

f16 is the GGUF default because it keeps the merged adapter's small changes, which requantizing to 4 bits would
mostly round away (as llama.cpp's own converter, whose default is f16 too); ask for q4_1 or q8_0 for a small file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .errors import CamelidError
from .formats import Checkpoint
from .formats.peft import Adapter

TARGETS = ("gguf", "hf", "gguf-lora")
TYPES = {"gguf": ("f16", "f32", "q8_0", "q4_0", "q4_1"), "hf": ("f32", "f16", "bf16"), "gguf-lora": ("f32", "f16")}


def check_options(to: str, type: str | None) -> str | None:
    """The weight type to write (None: the target's default); CamelidError for an unknown target or type."""
    if to not in TARGETS:
        raise CamelidError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    if type is None:
        return None if to == "hf" else TYPES[to][0]
    kind = type.lower()
    if kind not in TYPES[to]:
        raise CamelidError(f"--type for {to} must be one of {', '.join(TYPES[to])}, got {type!r}")
    return kind


def export(model: str | os.PathLike | Checkpoint | None = None, adapter: str | os.PathLike | Adapter | None = None,
           to: str = "gguf", out: str | os.PathLike | None = None, type: str | None = None, force: bool = False,
           progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Write `model` (a store name, a path, a Checkpoint; None: the default model), with `adapter` (a peft folder
    or an Adapter) merged in when given, to `out` as `to` ("gguf", "hf" or "gguf-lora": the adapter alone).

    `type` is the weight type (see the module docstring for each target's choices and default); force=True
    replaces an existing `out`. progress(name, done, total) is called after each tensor. Returns a summary dict
    (path, format, type, bytes, ...). User mistakes raise CamelidError (FormatError for an adapter made for
    another base, naming the module and both shapes) before anything is written.
    """
    from .formats import read
    from .formats.merge import check_adapter, merge
    from .formats.peft import read_adapter
    from .store import resolve

    kind = check_options(to, type)
    if out is None:
        raise CamelidError("no output path given (--out)")
    out = Path(out)
    if out.exists() and not force:
        raise CamelidError(f"{out} exists (use --force to replace it)")
    if not out.parent.is_dir():
        raise CamelidError(f"--out {out}: no such folder {out.parent}")
    if to == "gguf-lora" and adapter is None:
        raise CamelidError("--to gguf-lora writes an adapter: give it with --adapter DIR")
    ckpt = model if isinstance(model, Checkpoint) else read(resolve(model))
    if out.resolve() == Path(ckpt.path).resolve():
        raise CamelidError(f"--out {out} is the source model itself")
    lora = adapter if isinstance(adapter, Adapter) or adapter is None else read_adapter(adapter)
    source = {"source": str(ckpt.path)}
    if lora is not None:
        source["adapter"] = str(adapter) if not isinstance(adapter, Adapter) else "(in memory)"
    try:
        if to == "gguf-lora":
            from .formats.gguf_lora import write_gguf_lora

            check_adapter(ckpt, lora)
            return {**source, **write_gguf_lora(lora, ckpt.config, out, kind, overwrite=force, progress=progress)}
        merged = merge(ckpt, lora) if lora is not None else ckpt
        if to == "gguf":
            from .formats.gguf_write import write_gguf

            return {**source, **write_gguf(merged, out, kind, progress, overwrite=force)}
        from .formats.hf_write import write_float_folder

        return {**source, **write_float_folder(merged, out, kind, overwrite=force, progress=progress)}
    except OSError as e:
        raise CamelidError(f"cannot write {out}: {e.strerror or e}") from None
