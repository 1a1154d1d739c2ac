"""Kernels camelid compiles itself: C++ that no library provides, built with this machine's compiler on first need.
Every source in camelid/csrc/ goes into one library:

- `camelid::decode_attention` (csrc/decode_attention.cpp): each query over the filled prefix of the KV cache on its
  own, split over slots so that both cores work on one row, each key and value read once for the query heads that
  share it. torch's attention serves one query poorly: at 2,000 cached positions it reads the cache at a third of
  the speed the memory gives (docs/performance.md). The compiled decode step (camelid/compiled.py) calls it, and so
  does the eager fast path (decode, and prefill chunks of fewer than 128 tokens) in a process where the library is
  already built (`available()`): a token's attention is then the same whichever prompt chunk computes it, which
  lets the prompt cache reuse any prefix, not only whole chunks (camelid/prompt_cache.py).
- `camelid::dequantize_int4` (csrc/dequantize.cpp): rows of a 4-bit weight to float32 or bfloat16 in one pass, bit
  for bit what camelid/quant.py computes in torch in six. The dense prefill and QLoRA's forward and backward
  dequantize every layer at every chunk; quant.py calls it wherever the library is loaded (`loaded()`).

The library lives in the model store, keyed by the sources, torch's version, the CPU's flags and the compiler's:

    $CAMELID_HOME/kernels/camelid-kernels-<key>.so

It is built with the compiler the compiled step already needs (`$CXX`, else `c++`), once, in about 30 s; written
whole or not at all, so processes building at once do not see each other's half-written files.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from pathlib import Path

from .cpu import cpu_features, cpu_flags
from .errors import CamelidError

SOURCES = tuple(sorted((Path(__file__).parent / "csrc").glob("*.cpp")))
HEAD_SIZES = (16, 32, 64, 128, 96)  # what the C++ instantiates: head size, and 1..8 query heads per key head
MAX_GROUP = 8
_ready = False  # the op is registered in this process
_available: bool | None = None  # available()'s answer, fixed at its first call


class KernelError(CamelidError):
    """The C++ compiler could not build a kernel (one line: the compiler's first error)."""


def _flags() -> list[str]:
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-w"]
    if platform.machine() in ("x86_64", "AMD64") and "avx512f" in cpu_flags():
        flags.append("-mprefer-vector-width=512")  # gcc keeps to 256-bit vectors otherwise
    return flags


def library_path() -> Path:
    """Where the library built from the current source for this torch and CPU lives."""
    import torch

    from .store import home

    compiler = os.environ.get("CXX", "c++")
    # every flag the CPU reports, not only those the packages key on: -march=native may use any of them
    sources = hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in SOURCES)).hexdigest()
    key = "|".join((sources, torch.__version__, cpu_features(),
                    ",".join(sorted(cpu_flags())), compiler, " ".join(_flags())))
    return home() / "kernels" / f"camelid-kernels-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def build(out: Path) -> Path:
    """Compile the library into `out` (seconds: each source in a compiler of its own, at once, then one link);
    raises KernelError with the compiler's first error."""
    import tempfile

    import torch
    from torch.utils.cpp_extension import include_paths

    lib = Path(torch.__file__).parent / "lib"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}.so")
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory(dir=out.parent) as objects:
        commands = [[cxx, *_flags(), *(f"-I{p}" for p in include_paths()), "-c", str(src), "-o",
                     str(Path(objects) / f"{src.stem}.o")] for src in SOURCES]
        commands.append([cxx, *_flags(), *(c[-1] for c in commands), f"-L{lib}", "-ltorch", "-ltorch_cpu", "-lc10",
                         f"-Wl,-rpath,{lib}", "-o", str(tmp)])
        try:
            try:
                compiles = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                            for c in commands[:-1]]
                results = []
                for p in compiles:  # communicate() drains the pipe: a long error message cannot block the compiler
                    stderr = p.communicate()[1]
                    results.append((p.returncode, stderr))
                if all(code == 0 for code, _ in results):
                    r = subprocess.run(commands[-1], capture_output=True, text=True)
                    results.append((r.returncode, r.stderr))
            except OSError as e:
                raise KernelError(f"no C++ compiler ({cxx}: {e.strerror})") from None
            for code, stderr in results:
                if code != 0:
                    errors = [line for line in stderr.splitlines() if "error" in line] or stderr.splitlines() or ["failed"]
                    raise KernelError(f"{cxx} could not build camelid's kernels: {errors[0].strip()}")
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    return out


def load(build_missing: bool = False) -> bool:
    """Make camelid's ops (torch.ops.camelid.*) available in this process: True when they are. Builds the library
    first when it is missing and build_missing is set (KernelError when that fails)."""
    global _ready
    import torch

    if _ready:
        return True
    path = library_path()
    if not path.is_file():
        if not build_missing:
            return False
        import sys

        print("camelid: building camelid's kernels (C++, about 30 s, once) ...", file=sys.stderr, flush=True)
        build(path)
    torch.ops.load_library(str(path))

    @torch.library.register_fake("camelid::decode_attention")
    def _(q, k, v, mask, scale):  # what torch.export traces: the output's shape
        return q.new_empty(q.shape)

    @torch.library.register_fake("camelid::dequantize_int4")
    def _(nibbles, scale_zero, start, end, group, dtype):  # what torch.compile traces (QLoRA's compiled blocks)
        return nibbles.new_empty((end - start, nibbles.shape[1] * 2), dtype=dtype)

    _ready = True
    return True


def loaded() -> bool:
    """Whether the library is loaded in this process (by available(), load() or the compiled step's loading)."""
    return _ready


def dequantize_int4(nibbles, scale_zero, start: int, end: int, group: int, dtype):
    """Rows start..end of a 4-bit weight (camelid/quant.py's Int4Linear layout) in dtype; needs load() first."""
    import torch

    return torch.ops.camelid.dequantize_int4(nibbles, scale_zero, start, end, group, dtype)


def available(build_missing: bool = False) -> bool:
    """Whether the eager fast path attends with the kernel in this process: when the library is built (by
    `camelid compile`, `camelid serve` or the tests). Decided once per process, at the first call, so that every
    model of a process computes its attention one way from start to end (a library built later in the process, by a
    background compile, is used from the next process on). build_missing (the server, at start): build it first when
    it is missing, or say in one line why it cannot be. CAMELID_KERNELS=0 turns it off."""
    global _available
    if _available is None:
        try:
            _available = os.environ.get("CAMELID_KERNELS") != "0" and load(build_missing=build_missing)
        except KernelError as e:
            import sys

            print(f"camelid: warning: {e}; attention and dequantization stay torch's (slower) and the prompt cache "
                  "reuses whole chunks",
                  file=sys.stderr, flush=True)
            _available = False
        except (OSError, RuntimeError):  # a library that does not load (another torch's): torch's attention
            _available = False
    return _available


def supports(head_dim: int, group: int, dtype) -> bool:
    """Whether the kernel covers a model: float32 activations, a built head size, 1..8 query heads per key head."""
    import torch

    return dtype == torch.float32 and head_dim in HEAD_SIZES and 1 <= group <= MAX_GROUP


def decode_attention(q, k, v, mask):
    """q [B,T,H,E] over k, v [B,K,S,E] with the additive mask [B,1,T,S] -> [B,T,H,E] (scale 1/sqrt(E)), as
    torch's scaled_dot_product_attention computes it (within float32 rounding), each query on its own. Needs load()
    first."""
    import torch

    return torch.ops.camelid.decode_attention(q, k, v, mask, q.shape[-1] ** -0.5)
