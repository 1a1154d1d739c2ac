"""The fast path's converted model, kept in the store so that a later load maps it instead of converting again.

    $CAMELID_HOME/converted/<file stem>-<hash of its path>/<quant>-<dtype>-<key>.pt

Converting a GGUF file's blocks into the fast path's layers (repacking 4-bit weights for PyTorch's int4 kernel,
fusing Q/K/V and gate/up, the quantized embedding and output layer) takes about half a second on 2 cores for the
default model, a quarter of the time from command start to first token. The converted model is saved once
(torch.save of the whole module, atomically) and later loads are torch.load(mmap=True): a few milliseconds, the
tensors mapped from the file and read in as they are used (the RSS grows as decoding touches them, never with
conversion temporaries).

key = the model file (resolved path, size, modification time), the quant mode, activation type and device, the
torch version, the CPU's instruction-set flags, and a hash of the source of every module that shapes the
converted model (model.py, quant.py, loader.py, ...): a change to any of them converts again. Writing an entry
removes the older ones of the same file, quant mode and type. The file is a pickle that camelid wrote itself
into the user's own store (like the compiled decode step's package); CAMELID_CONVERTED=0 turns the cache off.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import torch

# every module whose code decides what a converted model holds (or how its classes unpickle)
_SOURCES = ("model.py", "quant.py", "quant_experts.py", "loader.py", "ggml_blocks.py", "config.py", "cache.py",
            "converted.py", "formats/gguf.py", "formats/gguf_llama4.py", "formats/layout.py", "formats/__init__.py")


@lru_cache(maxsize=1)
def _code_hash() -> str:
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in _SOURCES:
        try:
            h.update((here / name).read_bytes())
        except OSError:
            h.update(name.encode())
    return h.hexdigest()[:16]


def entry_dir(model_path: Path) -> Path:
    """The folder of one model file's converted entries."""
    from .store import home

    p = Path(model_path).resolve()
    return home() / "converted" / f"{p.stem}-{hashlib.sha256(str(p).encode()).hexdigest()[:12]}"


def converted_path(model_path: Path, quant: str | None, dtype: torch.dtype, device) -> Path | None:
    """Where this model file's converted model for these settings lives, or None where there is no cache: the
    reference path (nothing is converted), a device other than the CPU, a folder rather than a GGUF file,
    CAMELID_CONVERTED=0."""
    from .cpu import cpu_features

    p = Path(model_path)
    if (quant is None or torch.device(device).type != "cpu" or p.suffix.lower() != ".gguf" or not p.is_file()
            or os.environ.get("CAMELID_CONVERTED", "1") == "0"):
        return None
    st = p.resolve().stat()
    kind = f"{quant}-{str(dtype).removeprefix('torch.')}"
    key = "|".join(map(str, (p.resolve(), st.st_size, st.st_mtime_ns, kind, device, torch.__version__, cpu_features(),
                             _code_hash())))
    return entry_dir(p) / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def load(path: Path):
    """The converted model saved at `path`, or None when there is none or it cannot be read (then convert)."""
    from .model import Transformer

    if not path.is_file():
        return None
    try:
        model = torch.load(path, mmap=True, weights_only=False)
    except Exception:  # a damaged, cut or foreign file: convert again (and overwrite it)
        return None
    return model if isinstance(model, Transformer) else None


def save(model, path: Path) -> None:
    """Save the converted model at `path` (whole or not at all) and drop the older entries it replaces. A full disk
    or a read-only store only costs the next load its conversion. A model with routed experts on the fast path
    (Llama 4) is not kept: its experts are built from the file's own memory map as tokens reach them
    (camelid/quant_experts.py), so there is nothing converted to keep, and they do not pickle."""
    from .quant_experts import QuantExperts

    if any(isinstance(m, QuantExperts) for m in model.modules()):
        return
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model, tmp)
        os.replace(tmp, path)
    except Exception:  # OSError (full disk, read-only store), or a module that does not pickle: convert next time
        tmp.unlink(missing_ok=True)
        return
    kind = path.name.rsplit("-", 1)[0]
    for old in path.parent.glob(f"{kind}-*.pt"):
        if old != path:
            old.unlink(missing_ok=True)
