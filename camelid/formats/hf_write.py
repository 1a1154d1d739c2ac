"""Hugging Face folders written by camelid: float (f32 / f16 / bf16) Llama folders that transformers loads,
and camelid-quantized folders with weight-only int8 / int4 linears in safetensors.

Float folders (write_hf_folder, write_float_folder): config.json (LlamaForCausalLM), generation_config.json,
tokenizer.json + tokenizer_config.json, model.safetensors in HF tensor names; a tied output layer is not stored.

Quantized folders (write_quantized_folder):

The folder is an ordinary Llama folder (config.json, tokenizer files, model.safetensors in HF tensor names)
in which each linear layer's `X.weight` is replaced by:

  int8: X.qweight int8 [N, K], X.scales float32 [N, 1]            w = q * scale  (symmetric, per output row)
  int4: X.qweight uint8 [N, K/2], X.scales, X.zeros float32 [N, K/G]
        w = (q - 8) * scale + zero, q in 0..15, groups of G along K; element 2j in the low nibble of byte j,
        element 2j+1 in the high nibble (hf.unpack_int4 is the inverse)

and config.json carries `"quantization_config": {"quant_method": "camelid", "bits": 8 | 4, "group_size": G}`
(-1 for int8: one group per row, G = K). Embedding and norms stay float in the source's precision (float32 for a quantized source);
a linear whose K is not a multiple of the group stays float too. Q/K rows are in rotate-half order, as HF's are.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import ModelConfig
from ..tokenizer import Tokenizer
from . import Checkpoint, LazyTensor
from .hf import NAMES, QUANT_METHOD

TYPES = ("int8", "int4")
FLOAT_TYPES = {"f32": torch.float32, "float32": torch.float32, "f16": torch.float16, "float16": torch.float16,
               "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
INT4_GROUP = 32
SHARD_BYTES = 4 << 30  # float folders: safetensors shards of about this size (transformers' own default is 5 GB)
_HF_NAME = {c: h for h, c in NAMES.items()}
_FLOAT = {"BF16": torch.bfloat16, "bfloat16": torch.bfloat16, "F16": torch.float16, "float16": torch.float16}


def hf_name(canonical: str) -> str:
    parts = canonical.split(".")
    if parts[0] == "layers":
        return _HF_NAME[".".join(["layers", "{i}", *parts[2:]])].replace("{i}", parts[1])
    return _HF_NAME[canonical]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] of values 0..15 -> uint8 [N, K/2]: element 2j low nibble, 2j+1 high nibble."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def quantize_linear(w: torch.Tensor, bits: int) -> dict[str, torch.Tensor] | None:
    """{"qweight", "scales"[, "zeros"]} for one weight [N, K]; None when K does not split into groups."""
    from ..quant import int4_from_float, int8_from_float

    if bits == 8:
        q = int8_from_float(w)
        return {"qweight": q.q.contiguous(), "scales": q.scale.float()[:, None].contiguous()}
    if w.shape[1] % INT4_GROUP:
        return None
    q = int4_from_float(w, INT4_GROUP)
    return {"qweight": pack_int4(q.q).contiguous(), "scales": q.scale.float().contiguous(),
            "zeros": q.zero.float().contiguous()}


def config_dict(cfg: ModelConfig, tok: Tokenizer, float_dtype: torch.dtype) -> dict:
    """config.json of a Llama folder (LlamaForCausalLM) for `cfg`, without quantization_config."""
    rs = cfg.rope_scaling
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None if rs is None else {
            "rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor, "original_max_position_embeddings": rs.original_max_position_embeddings},
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
        "torch_dtype": str(float_dtype).removeprefix("torch."),
    }


def _config_json(ckpt: Checkpoint, bits: int, float_dtype: torch.dtype) -> dict:
    out = config_dict(ckpt.config, ckpt.tokenizer, float_dtype)
    out["quantization_config"] = {"quant_method": QUANT_METHOD, "bits": bits,
                                  "group_size": INT4_GROUP if bits == 4 else -1}  # -1: per row
    return out


def _tokenizer_files(ckpt: Checkpoint, folder: Path) -> None:
    tokenizer_files(ckpt.tokenizer, ckpt.config.max_seq_len, folder)


def tokenizer_files(tok: Tokenizer, max_seq_len: int, folder: Path) -> None:
    """tokenizer.json (the camelid tokenizer's own backend), tokenizer_config.json, generation_config.json."""
    spec = json.loads(tok.backend.to_str())
    decoder = json.dumps(spec.get("decoder"))
    if tok.strip_leading_space and '"Strip"' not in decoder and '"Metaspace"' not in decoder:
        # SentencePiece drops the space it prepends to the first word; say so the way HF's Llama files do
        strip = {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        d = spec.get("decoder")
        spec["decoder"] = {"type": "Sequence", "decoders": [*(d["decoders"] if d and d.get("type") == "Sequence"
                                                              else [d] if d else []), strip]}
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    name = lambda i: tok.backend.id_to_token(i) if i is not None else None  # noqa: E731
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": bool(tok.add_bos),
                  "add_eos_token": False, "bos_token": name(tok.bos_id), "eos_token": name(tok.eos_id),
                  "clean_up_tokenization_spaces": False, "model_max_length": max_seq_len}
    if tok.chat_template:
        tok_config["chat_template"] = tok.chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=1, ensure_ascii=False), encoding="utf-8")
    eos = [tok.eos_id] if tok.eos_id is not None else []
    eos += sorted(i for i in tok.stop_ids if i != tok.eos_id)
    gen = {"bos_token_id": tok.bos_id, "eos_token_id": eos[0] if len(eos) == 1 else eos}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=1), encoding="utf-8")


def _float_dtype(ckpt: Checkpoint) -> torch.dtype:
    """The source's float precision: bf16/f16 when its embedding is stored so, else float32."""
    return _FLOAT.get(ckpt.tensors["tok_embeddings.weight"].dtype, torch.float32)


def write_quantized_folder(ckpt: Checkpoint, out: str | os.PathLike, kind: str,
                           progress: Callable[[str, int, int], None] | None = None, overwrite: bool = False) -> dict:
    """Write `ckpt` as a camelid int8/int4 folder at `out`; a summary dict. overwrite=True replaces an existing `out`."""
    from safetensors.torch import save_file

    if kind not in TYPES:
        raise ValueError(f"kind must be int8 or int4, got {kind!r}")
    bits = 8 if kind == "int8" else 4
    out = Path(out)
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        float_dtype = _float_dtype(ckpt)
        state: dict[str, torch.Tensor] = {}
        kept_float = 0
        names = list(ckpt.tensors)
        for i, name in enumerate(names):
            w = ckpt.tensors[name].load()
            hf = hf_name(name)
            q = quantize_linear(w, bits) if w.ndim == 2 and name != "tok_embeddings.weight" else None
            if q is not None:
                base = hf.removesuffix(".weight")
                state.update({f"{base}.{k}": v for k, v in q.items()})
            else:
                kept_float += w.ndim == 2 and name != "tok_embeddings.weight"
                state[hf] = w.to(float_dtype).contiguous()
            if progress:
                progress(name, i + 1, len(names))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(_config_json(ckpt, bits, float_dtype), indent=1), encoding="utf-8")
        _tokenizer_files(ckpt, tmp)
        if overwrite and out.is_dir():
            shutil.rmtree(out)
        elif overwrite and out.exists():
            out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in out.iterdir())
    return {"path": str(out), "format": "hf", "type": kind, "group_size": INT4_GROUP if bits == 4 else "row",
            "linears_kept_float": kept_float, "bytes": size}


def parse_float_type(name: str | torch.dtype) -> torch.dtype:
    """torch dtype for "f32" | "f16" | "bf16" (or their long names, or a torch dtype); ValueError otherwise."""
    if isinstance(name, torch.dtype) and name in FLOAT_TYPES.values():
        return name
    if name not in FLOAT_TYPES:
        raise ValueError(f"float type must be one of f32, f16, bf16, got {name!r}")
    return FLOAT_TYPES[name]


WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.", "module.")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def _plain_name(name: str) -> str:
    """A parameter name without the prefixes activation checkpointing, torch.compile or DDP add to modules."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def write_hf_folder(base: Checkpoint, tensors: dict[str, torch.Tensor | LazyTensor] | None, out: str | os.PathLike,
                    dtype: str | torch.dtype | None = None, progress: Callable[[str, int, int], None] | None = None,
                    shard_bytes: int = SHARD_BYTES) -> dict:
    """Write a float Hugging Face Llama folder that transformers' AutoModelForCausalLM and AutoTokenizer load.

    base: the checkpoint whose config and tokenizer (tokenizer.json, chat template, BOS/EOS, stop ids) are written.
    tensors: float weights in camelid's canonical names (rotate-half Q/K rows), e.g. a fully fine-tuned model's
        state_dict() or named parameters (wrapper prefixes such as activation checkpointing's are dropped); a
        weight not given is the base's. None: the base's own weights.
    dtype: f32, f16 or bf16; None: the base's float precision (bf16 / f16 when its embedding is stored so, else f32).

    `out` is created if needed; config.json, generation_config.json, tokenizer.json, tokenizer_config.json and
    model.safetensors (or, past shard_bytes, model-0000K-of-0000N.safetensors shards with
    model.safetensors.index.json, as transformers writes them, so memory holds one shard at a time) are each
    written to a temporary name and then renamed into place; other files in `out` (a run's checkpoint) are left
    alone, and weight files of an earlier write that are no longer used are removed. A summary dict.
    """
    from safetensors.torch import save_file

    dt = parse_float_type(dtype) if dtype is not None else _float_dtype(base)
    config = base.config
    given = {_plain_name(k): v for k, v in (tensors or {}).items()}
    unknown = sorted(set(given) - set(base.tensors) - {"output.weight"})
    if unknown:
        raise ValueError(f"tensor {unknown[0]!r} is not a weight of the base model (a Llama weight in camelid names)")
    for name, t in given.items():
        if name in base.tensors and tuple(t.shape) != tuple(base.tensors[name].shape):
            raise ValueError(f"{name} is {list(t.shape)}, the base's is {list(base.tensors[name].shape)}")
    source = {**base.tensors, **given}
    names = [n for n in base.tensors if not (config.tie_embeddings and n == "output.weight")]
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".camelid-hf.part"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        shards: list[list[str]] = []  # HF names per shard file; a shard is written when it reaches shard_bytes
        state: dict[str, torch.Tensor] = {}
        size = 0
        for i, name in enumerate(names):
            t = source[name]
            w = t.load() if isinstance(t, LazyTensor) else t.detach()
            state[hf_name(name)] = w.to(device="cpu", dtype=dt).contiguous()
            size += state[hf_name(name)].nbytes
            if size >= shard_bytes or i == len(names) - 1:
                shards.append(list(state))
                save_file(state, str(tmp / f"shard-{len(shards)}.safetensors"), metadata={"format": "pt"})
                state, size = {}, 0
            if progress:
                progress(name, i + 1, len(names))
        _name_shards(tmp, shards)
        (tmp / "config.json").write_text(json.dumps(config_dict(config, base.tokenizer, dt), indent=1), encoding="utf-8")
        tokenizer_files(base.tokenizer, config.max_seq_len, tmp)
        written = {f.name for f in tmp.iterdir()}
        for old in folder.glob("model*.safetensors*"):
            if old.name not in written and (old.name in _WEIGHT_FILES or old.name.startswith("model-")):
                old.unlink()
        for name in sorted(written):
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in folder.iterdir() if f.name in written)
    return {"path": str(folder), "format": "hf", "type": str(dt).removeprefix("torch."), "shards": len(shards),
            "bytes": size}


def _name_shards(folder: Path, shards: list[list[str]]) -> None:
    """shard-K.safetensors -> model.safetensors (one shard) or model-0000K-of-0000N.safetensors + the index."""
    if len(shards) == 1:
        os.replace(folder / "shard-1.safetensors", folder / "model.safetensors")
        return
    weight_map, total = {}, 0
    for k, keys in enumerate(shards, 1):
        final = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        os.replace(folder / f"shard-{k}.safetensors", folder / final)
        total += (folder / final).stat().st_size
        weight_map.update({key: final for key in keys})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")


def write_float_folder(ckpt: Checkpoint, out: str | os.PathLike, dtype: str | torch.dtype | None = None,
                       overwrite: bool = False, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """`ckpt` as a new float Hugging Face folder at `out` (see write_hf_folder for dtype), which appears only when
    complete; overwrite=True replaces an existing `out` (file or folder)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists")
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        summary = write_hf_folder(ckpt, None, tmp, dtype, progress)
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**summary, "path": str(out)}
