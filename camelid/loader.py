"""Checkpoint -> Transformer: build on the meta device, then assign each tensor as it is read.

Two ways to build:
- the reference path (quant=None): every tensor dequantized to float in `dtype` (float32 by default), the model
  exactly as written in camelid/model.py; the fixtures are checked against it.
- the fast path (quant="auto" | "int8" | "int4"): linear layers kept quantized (camelid/quant.py) with fused
  Q/K/V and gate/up projections (unfused where their stored types differ), the products in bfloat16
  (activations between them float32). "auto" keeps each GGUF type of camelid/ggml_blocks.py as it is stored
  (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K: the integers unchanged), requantizes the others (Q2_K, Q3_K,
  IQ*) to int4 or int8 and leaves float weights in float; "int8" / "int4" quantize every linear layer to that
  (a 4-bit GGUF type stays as stored under "int4"). The output layer makes each position's leading logits exact
  (quant.QuantOutput).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from . import quant as Q
from .errors import CamelidError, FormatError
from .formats import Checkpoint, LazyTensor
from .model import MoEFeedForward, Transformer
from .quant_experts import quant_experts

QUANT_MODES = ("auto", "int8", "int4")
# GGUF types requantized under "auto": 6 and 8 bits to int8, fewer to int4
_TO_INT8 = {"Q6_K", "Q8_1", "Q8_K"}


def _check(ckpt: Checkpoint, model: Transformer) -> dict[str, tuple[int, ...]]:
    cfg = ckpt.config
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("output.weight", None)
    missing = sorted(set(expected) - set(ckpt.tensors))
    unexpected = sorted(set(ckpt.tensors) - set(expected))
    if missing:
        raise FormatError(f"{ckpt.path}: missing tensors {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if unexpected:
        raise FormatError(f"{ckpt.path}: unexpected tensors {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
    for name, shape in expected.items():
        if tuple(ckpt.tensors[name].shape) != shape:
            raise FormatError(f"{ckpt.path}: tensor {name} has shape {tuple(ckpt.tensors[name].shape)}, the config needs {shape}")
    return expected


def _load(ckpt: Checkpoint, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    t = ckpt.tensors[name].load()
    if tuple(t.shape) != shape:
        raise FormatError(f"{ckpt.path}: tensor {name} holds {tuple(t.shape)}, expected {shape}")
    return t


def build_model(ckpt: Checkpoint, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                quant: str | None = None, reuse: bool = False) -> Transformer:
    """The model with the checkpoint's weights on `device`, in eval mode (see the module doc for `quant`).

    dtype: the float type of weights and activations (default float32; the quantized layers compute in bfloat16
    inside and return this type).
    reuse: on the fast path, map the converted model kept in the store from an earlier load of the same GGUF file
    instead of converting again, and keep this one there (camelid/converted.py).
    """
    if quant is not None and quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {', '.join(QUANT_MODES)} or None, got {quant!r}")
    dtype = dtype or torch.float32
    kept = None
    if reuse and ckpt.path is not None:
        from . import converted

        kept = converted.converted_path(ckpt.path, quant, dtype, device)
        model = converted.load(kept) if kept is not None else None
        if model is not None:
            return _bind_kernel(model, quant)
    model = _build(ckpt, dtype, device, quant)
    if kept is not None:
        converted.save(model, kept)
    return _bind_kernel(model, quant)


def _bind_kernel(model: Transformer, quant: str | None) -> Transformer:
    """The fast path on the CPU attends with camelid's kernel where it is built (camelid/kernels.py): decode, and
    prompt chunks each token of which then attends as it would alone. The float32 reference keeps torch's attention."""
    from . import kernels

    cfg = model.config
    on = (quant is not None and model.device.type == "cpu" and not cfg.chunked_layers
          and kernels.supports(cfg.head_dim, cfg.n_heads // cfg.n_kv_heads, model.dtype) and kernels.available())
    for layer in model.layers:
        layer.attention.kernel = on
    # the kernel reads keys and values stored in float16 (half the bytes a decode step reads at a long context, as
    # llama.cpp's default cache); CAMELID_KV=float32 keeps them in the activations' type
    kv = os.environ.get("CAMELID_KV", "float16")
    if kv not in ("float16", "float32"):
        raise CamelidError(f"CAMELID_KV must be float16 or float32, got {kv!r}")
    model.kv_dtype = torch.float16 if on and kv == "float16" else None
    return model


def _build(ckpt: Checkpoint, dtype: torch.dtype, device: str | torch.device, quant: str | None) -> Transformer:
    cfg = ckpt.config
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = _check(ckpt, model)
    quantized = _quantize_into(model, ckpt, quant, device, dtype) if quant is not None else set()
    state = {name: _load(ckpt, name, shape).to(device=device, dtype=dtype)
             for name, shape in expected.items() if name not in quantized}
    tie = cfg.tie_embeddings and "tok_embeddings.weight" in state and isinstance(model.output, nn.Linear)
    if tie:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, assign=True, strict=False)
    if tie:
        model.output.weight = model.tok_embeddings.weight
    model.reset_buffers()
    if quant is not None and ckpt.drop_pages is not None:  # the quantized layers hold their own copies now
        ckpt.drop_pages()
    leftover = [n for n, t in model.state_dict().items() if t.is_meta]
    if leftover:  # a bug here, not in the file
        raise RuntimeError(f"not loaded: {leftover[:3]}")
    _return_freed_heap()
    return model.eval().requires_grad_(False)


def _return_freed_heap() -> None:
    """Hand the heap pages that the conversion's temporaries freed back to the system. glibc keeps them in its
    arenas otherwise: on the default model 100-300 MB of a loaded process's RSS (a server holding several models
    counts them in its memory budget). No-op where the C library has no malloc_trim (musl, macOS, Windows)."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def _quant_weight(t: LazyTensor, mode: str, shape: tuple[int, int]) -> Q.QuantWeight | None:
    """The tensor as an int4/int8 weight for `mode`, or None to keep it float."""
    if t.raw is not None:
        kind, data = t.raw()
        if kind in ("int4", "int8"):  # camelid-quantized folders
            if kind == "int4":
                return Q.Int4Weight(data["q"], data["scale"].float(), data["zero"].float(), int(data["group"]))
            return Q.Int8Weight(data["q"], data["scale"].float().reshape(-1))
        if mode == "auto" or (mode == "int4" and kind in ("Q4_0", "Q4_1", "Q4_K")):
            w = Q.from_gguf(kind, data, shape)
            if w is not None and (mode == "auto" or not w.doubled_input):
                return w
        if mode == "auto":
            mode = "int8" if kind in _TO_INT8 else "int4"
    elif mode == "auto":
        return None
    w = t.load()
    if mode == "int4" and w.shape[1] % Q.GROUP == 0:
        return Q.int4_from_float(w)
    return Q.int8_from_float(w)


def _quantize_into(model: Transformer, ckpt: Checkpoint, mode: str, device, dtype: torch.dtype) -> set[str]:
    """Put quantized (and fused) linear layers into `model`; the names of the tensors they took."""
    taken: set[str] = set()

    def fused(names: list[str]) -> nn.Module | list[nn.Module] | None:
        """One layer for the group, or one per name where their stored layouts differ (mixed K-quant files)."""
        shapes = [tuple(ckpt.tensors[n].shape) for n in names]
        weights = [_quant_weight(ckpt.tensors[n], mode, s) for n, s in zip(names, shapes)]
        if any(w is None for w in weights):
            if all(w is None for w in weights):
                return None  # float weights stay float (and unfused: the reference modules)
            weights = [w or Q.int8_from_float(ckpt.tensors[n].load()) for w, n in zip(weights, names)]
        taken.update(names)
        try:
            return Q.linear_for(Q.concat(weights) if len(weights) > 1 else weights[0], device)
        except ValueError:  # mixed layouts cannot share one product: a layer each, every weight as stored
            return [Q.linear_for(w, device) for w in weights]

    for i, layer in enumerate(model.layers):
        p = f"layers.{i}."
        attn, ffn = layer.attention, layer.feed_forward
        m = fused([p + "attention.wq.weight", p + "attention.wk.weight", p + "attention.wv.weight"])
        if isinstance(m, list):
            attn.wq, attn.wk, attn.wv = m
        elif m is not None:
            attn.wqkv, attn.wq, attn.wk, attn.wv = m, None, None, None
        if (m := fused([p + "attention.wo.weight"])) is not None:
            attn.wo = m
        if isinstance(ffn, MoEFeedForward):  # Llama 4: the shared expert as a dense FFN, the routed ones lazily
            names = [p + f"feed_forward.experts.w{j}" for j in (1, 2, 3)]
            experts = quant_experts(*(ckpt.tensors[n] for n in names), mode, device)
            if experts is not None:
                ffn.experts = experts
                taken.update(names)
            p, ffn = p + "feed_forward.shared.", ffn.shared
        else:
            p += "feed_forward."
        m = fused([p + "w1.weight", p + "w3.weight"])
        if isinstance(m, list):
            ffn.w1, ffn.w3 = m
        elif m is not None:
            ffn.w13, ffn.w1, ffn.w3 = m, None, None
        if (m := fused([p + "w2.weight"])) is not None:
            ffn.w2 = m
    if ckpt.drop_pages is not None:  # the blocks' pages, before the embedding and output layer's conversion peaks
        ckpt.drop_pages()

    emb = ckpt.tensors["tok_embeddings.weight"]
    out_name = "tok_embeddings.weight" if ckpt.config.tie_embeddings else "output.weight"
    out = ckpt.tensors[out_name]
    out_w = _quant_weight(out, mode, tuple(out.shape))
    table = None  # exact rows of the output weight, for QuantOutput
    if emb.raw is not None:  # keep a quantized embedding quantized; a float one stays float
        emb_w = out_w if ckpt.config.tie_embeddings and out_w is not None else _quant_weight(emb, "auto", tuple(emb.shape))
        if emb_w is not None:
            model.tok_embeddings = Q.QuantEmbedding(emb_w, dtype, device)
            taken.add("tok_embeddings.weight")
            if emb_w is out_w:
                table = model.tok_embeddings  # tied: one table serves both
    if out_w is not None:
        table = table or Q.QuantEmbedding(out_w, dtype, device)
        model.output = Q.QuantOutput(Q.linear_for(out_w, device, dense_prefill=False), table)
        taken.add(out_name)
    return taken
