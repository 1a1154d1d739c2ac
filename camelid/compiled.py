"""The compiled decode step: one forward of one token per row, built ahead of time with AOTInductor.

`camelid compile [MODEL]` exports the fast-path model's decode step with torch.export (batch, cache capacity and
filled prefix all dynamic) and compiles it to a `.pt2` package in the model store:

    $CAMELID_HOME/compiled/<key>.pt2     key = the model file (path, size, mtime), torch version, CPU features,
                                         the quant mode, the activation type, the KV cache's type
                                         (float16 where camelid's kernel attends) and STEP_VERSION

The package holds the generated code and the few constants Inductor made itself, not the weights: at load the
model's own tensors are bound to it (`load_constants(..., user_managed=True)`), so the step reads the same tensors as
the eager model, and the package is a few MB that load in milliseconds (the C++ loader directly, without importing
torch._inductor, which takes a second of the GIL on 2 cores).
Prefill, adapters and the reference path stay eager; `attach(model, path)` finds a package built for this
model and machine and, when there is one, `step_for(model)` gives generate and the server's engine the
compiled step (eager serves when there is none: compilation never slows a `camelid run`).

The step attends over the filled prefix only: the additive mask [B,1,1,S] it is given (S = the longest row's
filled length + 1) sets how many cache slots the attention reads, whatever the cache's capacity. It attends with
camelid's own kernel (camelid/kernels.py, built beside the package) where that covers the model: torch's attention
reads the cache of one query at a third of the memory's speed, which made decode at position 2,000 twice as slow as
at 100.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import weakref
from pathlib import Path

from .cpu import cpu_features  # part of the package key
from .errors import first_line

STEP_VERSION = 4  # bump when the step's inputs or the model's decode graph change
_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> CompiledStep


class _StepCache:
    """The KV cache as the exported step sees it (duck-typed like camelid.cache.KVCache.update): per-layer
    [B,K,C,E] tensors written in place at the rows' positions, attention over the first S slots, S given by
    the mask's last dimension."""

    query_by_query = False  # KVCache's speculative-verification switch: a decode step is one query per row

    def __init__(self, k: list, v: list, mask, attend=None) -> None:
        self.k, self.v, self.mask = k, v, mask
        self.attend = attend  # the attention of one query per row (camelid/kernels.py), or None: torch's

    def update(self, layer: int, positions, k, v):
        import torch

        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        kc, vc = self.k[layer], self.v[layer]
        kc[rows, :, positions] = k.to(kc.dtype)
        vc[rows, :, positions] = v.to(vc.dtype)
        span = self.mask.shape[-1]
        return kc[:, :, :span], vc[:, :, :span], self.mask


def decode_step(model, attend=None):
    """The module that is exported: tokens [B,1], positions [B,1], mask [B,1,1,S], k and v (tuples of
    [B,K,C,E]) -> last logits [B,V]; `attend` the decode attention kernel or None (torch's attention).
    (Built here so that importing this module does not import torch.)"""
    from torch import nn

    class DecodeStep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, tokens, positions, mask, k, v):
            return self.model(tokens, positions, _StepCache(list(k), list(v), mask, attend))[:, -1]

    return DecodeStep().eval()


def package_path(model_path: str | os.PathLike, quant: str | None, dtype: str = "torch.float32",
                 kv_dtype: str = "torch.float16") -> Path:
    """Where the package for this model file, torch, CPU, quant mode, activation type and KV cache type lives in the
    store (package_for gives a loaded model's)."""
    import torch

    from .store import home

    p = Path(model_path).resolve()
    st = p.stat()
    key = "|".join(map(str, (p, st.st_size, st.st_mtime_ns, torch.__version__, cpu_features(), quant, dtype, kv_dtype,
                                STEP_VERSION)))
    return home() / "compiled" / f"{p.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt2"


def package_for(model, model_path: str | os.PathLike, quant: str | None) -> Path:
    """The package for this loaded model: its activation type and its KV cache's (model.kv_dtype)."""
    return package_path(model_path, quant, str(model.dtype), str(getattr(model, "kv_dtype", None) or model.dtype))


def _example(model, batch: int = 2, capacity: int = 64):
    import torch

    from .cache import KVCache, attention_mask

    cache = KVCache.for_model(model, batch, capacity)
    positions = torch.arange(batch)[:, None] + 3  # [B,1]
    mask = attention_mask(positions, int(positions.max()) + 1, model.dtype)
    tokens = torch.full((batch, 1), 5, dtype=torch.long)
    return tokens, positions, mask, tuple(cache.k), tuple(cache.v)


def build(model, out: Path) -> Path:
    """Export and compile model's decode step into the package `out` (minutes); written whole or not at all."""
    import torch
    from torch._inductor import aoti_compile_and_package
    from torch.export import Dim, export

    n = model.config.n_layers
    attend = decode_kernel(model, build_missing=True)
    batch, span, cap = Dim("batch", min=1, max=256), Dim("span", min=2, max=1 << 20), Dim("cap", min=2, max=1 << 20)
    kv = tuple({0: batch, 2: cap} for _ in range(n))
    shapes = ({0: batch}, {0: batch}, {0: batch, 3: span}, kv, kv)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        program = export(decode_step(model, attend), _example(model), dynamic_shapes=shapes)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, whole = out.with_suffix(f".tmp{os.getpid()}.pt2"), out.with_suffix(f".whole{os.getpid()}.pt2")
    # the weights beside the code, each on its own (not inside the .so), so that _strip_weights can leave them out
    configs = {"aot_inductor.package_constants_in_so": False, "aot_inductor.package_constants_on_disk_format": "pickle_weights"}
    try:
        with warnings.catch_warnings():  # torch's own deprecation notices from inside its export machinery
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)  # "No complete tensor found in the group": views of one buffer
            aoti_compile_and_package(program, package_path=str(whole), inductor_configs=configs)
        _strip_weights(whole, tmp, model_tensors(model))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        whole.unlink(missing_ok=True)
    return out


def decode_kernel(model, build_missing: bool = False):
    """camelid's decode attention kernel (camelid/kernels.py) when it covers this model and its library is built
    (or, with build_missing, could be built now); else None, and the step uses torch's attention."""
    from . import kernels

    cfg = model.config
    if not kernels.supports(cfg.head_dim, cfg.n_heads // cfg.n_kv_heads, model.dtype):
        return None
    try:
        return kernels.decode_attention if kernels.load(build_missing) else None
    except kernels.KernelError as e:  # the step still builds, on torch's attention
        import sys

        print(f"camelid: warning: {e}; the decode step uses torch's attention", file=sys.stderr)
        return None


def model_tensors(model) -> dict:
    """The model's parameters and buffers under the names the exported step gives them."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {f"model.{k}": t for k, t in named}


def _weights_config(archive) -> tuple[str, dict]:
    """(the folder of the pickled constants, {fqn: [file, shape, stride, offset]}) of an opened package zip."""
    name = next(n for n in archive.namelist() if n.endswith("/data/aotinductor/model/weights_config.json"))
    return name.split("/data/")[0] + "/data/weights/", json.loads(archive.read(name))


def _strip_weights(src: Path, dst: Path, own: dict) -> None:
    """Copy the package without the pickled copies of the model's own tensors (bound at load instead)."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        folder, config = _weights_config(zin)
        dropped = {folder + f for fqn, (f, *_) in config.items() if fqn in own}
        for info in zin.infolist():
            if info.filename not in dropped:
                zout.writestr(info, zin.read(info.filename))


class CompiledStep:
    """A loaded package bound to the model whose tensors it uses."""

    def __init__(self, model, path: Path) -> None:
        import io
        import zipfile

        import torch
        from torch.utils import _pytree as pytree

        with zipfile.ZipFile(path) as archive:  # a step that calls camelid's kernel needs its library loaded first
            wrapper = [n for n in archive.namelist() if n.endswith(".wrapper.json")]
            if any(b"camelid::decode_attention" in archive.read(n) for n in wrapper) and decode_kernel(model) is None:
                raise FileNotFoundError("its attention kernel is not built here (camelid compile --force builds both)")
        self.loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        own = model_tensors(model)
        constants = {}
        with zipfile.ZipFile(path) as archive:
            folder, config = _weights_config(archive)
            for fqn in self.loader.get_constant_fqns():
                if fqn in own:
                    constants[fqn] = own[fqn]
                else:  # a constant Inductor made itself (a few scalars)
                    file, shape, stride, offset = config[fqn]
                    t = torch.load(io.BytesIO(archive.read(folder + file)), weights_only=True)
                    constants[fqn] = t.as_strided(shape, stride, offset)
        self.loader.load_constants(constants, False, True, True)  # (map, use_inactive, check_full_update, user_managed)
        self.dtype = model.dtype
        self.kv_dtype = getattr(model, "kv_dtype", None) or model.dtype  # what it was exported with (the key)
        leaves = pytree.treespec_loads(self.loader.get_call_spec()[0]).num_leaves
        if leaves != 3 + 2 * model.config.n_layers:
            raise ValueError(f"the package takes {leaves} inputs, the model {3 + 2 * model.config.n_layers}")

    def __call__(self, tokens, positions, cache):
        """Logits [B,V] of one new token per row: tokens, positions [B,1]; cache a camelid.cache.KVCache."""
        from .cache import attention_mask

        if cache.k[0].dtype != self.kv_dtype:  # the package reads raw memory: a cache of another type is garbage
            raise ValueError(f"the compiled step takes a {self.kv_dtype} KV cache, got {cache.k[0].dtype}")
        mask = attention_mask(positions, int(positions.max()) + 1, self.dtype)
        return self.loader.run([tokens, positions, mask, *cache.k, *cache.v])[0]  # the flat inputs, as exported


def attach(model, model_path: str | os.PathLike, quant: str | None, wait: bool = False) -> bool:
    """Bind the package built for this model and machine, if there is one (the fast path only, no adapters):
    loaded in a background thread, so the first token (prefill, eager) does not wait for it; decode steps run
    eagerly until it is ready. True when a package was found. wait=True loads it before returning.
    CAMELID_COMPILED=0 turns it off."""
    if quant is None or os.environ.get("CAMELID_COMPILED") == "0" or getattr(model, "lora_state", None) is not None:
        return False
    if getattr(getattr(model, "config", None), "chunked_layers", ()):  # Llama 4's ring-buffer layers: eager only
        return False
    try:
        path = package_for(model, model_path, quant)
    except OSError:
        return False
    if not path.is_file():
        return False

    def load() -> None:
        try:
            _STEPS[model] = CompiledStep(model, path)
        except Exception as e:  # a stale or damaged package: say so once and decode eagerly
            import sys

            print(f"camelid: warning: compiled decode step {path.name} not used ({type(e).__name__}: {e})", file=sys.stderr)

    if wait:
        load()
    else:
        import threading

        threading.Thread(target=load, name="camelid-load-compiled", daemon=True).start()
    return True


def step_for(model) -> CompiledStep | None:
    """The compiled decode step bound to this model, or None (decode eagerly)."""
    return _STEPS.get(model) if _STEPS else None


def add_parser(sub) -> None:
    """`camelid compile [MODEL]` (cli.build_parser calls this)."""
    p = sub.add_parser("compile", help="build the compiled decode step for a model (AOTInductor; minutes, once)")
    p.add_argument("model", nargs="?", default=None, help="store name or path (default: the default model)")
    p.add_argument("--quant", choices=("auto", "int8", "int4"), default="auto", help="the fast path to compile (default auto)")
    p.add_argument("--force", action="store_true", help="build again even if a package exists")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: torch's)")
    p.set_defaults(func=command)


def command(args) -> None:
    import sys
    import time

    import torch

    from . import kernels
    from .errors import CamelidError
    from .formats import read
    from .loader import build_model
    from .store import resolve

    if args.threads is not None:
        if args.threads < 1:
            raise CamelidError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    path = resolve(args.model)
    kernels.available(build_missing=True)  # the kernel first: the model then keeps the KV cache the step will read
    model = build_model(read(path), quant=args.quant)
    out = package_for(model, path, args.quant)
    if out.is_file() and not args.force:
        print(f"{out} (already built; --force to rebuild)")
        return
    if model.config.chunked_layers:
        raise CamelidError("the compiled decode step does not cover chunked attention (Llama 4) yet; it decodes eagerly")
    print(f"camelid: compiling the decode step of {path.name} (a few minutes) ...", file=sys.stderr, flush=True)
    t = time.perf_counter()
    try:
        build(model, out)
    except Exception as e:  # export or the C++ compiler refused: one line, the eager path still serves
        raise CamelidError(f"could not compile the decode step ({type(e).__name__}: {first_line(e)}); decoding stays eager") from None
    print(f"camelid: built in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    print(out)
