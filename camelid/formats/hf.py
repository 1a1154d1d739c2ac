"""Hugging Face model folders: config.json + *.safetensors (single or sharded) + tokenizer files.

HF Llama checkpoints already order Q/K rows for rotate-half RoPE, camelid's canonical layout, so no
tensor is permuted here. Both config.json styles are read: the classic `rope_theta` + `rope_scaling`
keys and the newer `rope_parameters`.

camelid's own quantized folders (`quantization_config.quant_method == "camelid"`, written by hf_write.py)
store linears as `X.qweight` + `X.scales` (+ `X.zeros` for 4 bits); each becomes one LazyTensor `X.weight`
of dtype "int8"/"int4" whose load() dequantizes and whose raw() gives the integers.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..config import ModelConfig, RopeScaling
from ..errors import FormatError, UnsupportedModelError, first_line
from ..tokenizer import Tokenizer
from . import Checkpoint, LazyTensor
from .tokenizers_io import chat_template_of, from_sentencepiece, from_tokenizer_json, read_json

# HF tensor name -> canonical name ({i} is the layer)
NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
}
_PATTERNS = [(re.compile("^" + re.escape(h).replace(r"\{i\}", r"(\d+)") + "$"), c) for h, c in NAMES.items()]
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer some older checkpoints saved
QUANT_METHOD = "camelid"
QUANT_PARTS = (".qweight", ".scales", ".zeros")


def canonical_name(hf_name: str) -> str | None:
    for pattern, canon in _PATTERNS:
        m = pattern.match(hf_name)
        if m:
            return canon.replace("{i}", m.group(1)) if m.groups() else canon
    return None


def _rope(cfg: dict, where: Path) -> tuple[float, RopeScaling | None, str]:
    """(theta, llama3 scaling or None, which config style) from either config.json style."""
    if isinstance(cfg.get("rope_parameters"), dict):
        params, style = cfg["rope_parameters"], "rope_parameters"
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    else:
        params, style = cfg.get("rope_scaling") or {}, "rope_theta/rope_scaling"
        theta = cfg.get("rope_theta", 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return float(theta), None, style
    if kind != "llama3":
        raise UnsupportedModelError(f"{where}: RoPE type {kind!r} is not supported (camelid runs 'default' and 'llama3')")
    try:
        scaling = RopeScaling(factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
                              high_freq_factor=float(params["high_freq_factor"]),
                              original_max_position_embeddings=int(params["original_max_position_embeddings"]))
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{where}: llama3 RoPE scaling without a valid {e}") from None
    return float(theta), scaling, style


def read_config(cfg: dict, where: Path) -> tuple[ModelConfig, str]:
    """A ModelConfig from a config.json dict, and which RoPE key style it used."""
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type != "llama" and "LlamaForCausalLM" not in archs:
        raise UnsupportedModelError(f"{where}: model_type {model_type!r} is not supported (camelid runs 'llama')")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{where}: activation {cfg['hidden_act']!r} is not supported (Llama uses 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise UnsupportedModelError(f"{where}: {key}=true is not supported")
    try:
        dim, n_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or dim // n_heads)
        theta, scaling, style = _rope(cfg, where)
        config = ModelConfig(
            dim=dim,
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            vocab_size=int(cfg["vocab_size"]),
            hidden_dim=int(cfg["intermediate_size"]),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            head_dim_override=head_dim if head_dim != dim // n_heads else None,
        )
    except KeyError as e:
        raise FormatError(f"{where}: missing key {e}") from None
    except (TypeError, ValueError) as e:
        raise FormatError(f"{where}: {e}") from None
    return config, style


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: those the index names (all must exist), else every *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise FormatError(f"{index}: no weight_map")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FormatError(f"{folder}: shard {missing[0]} named in {index.name} is missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FormatError(f"{folder}: no *.safetensors weights")
    return files


def _loader(handle, name: str):
    return lambda: handle.get_tensor(name)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> values 0..15 [N, K]: element 2j is the low nibble of byte j, element 2j+1 the high one."""
    n, half = packed.shape
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(n, 2 * half)


def _quant_parts(handles: dict, base: str) -> dict:
    """{"q": unpacked integers [N, K], "scale", "zero" (or None), "group", "bits"} of one quantized linear."""
    packed = handles[base + ".qweight"].get_tensor(base + ".qweight")
    scale = handles[base + ".scales"].get_tensor(base + ".scales").float()
    zero = handles[base + ".zeros"].get_tensor(base + ".zeros").float() if base + ".zeros" in handles else None
    bits = 8 if packed.dtype == torch.int8 else 4
    q = packed if bits == 8 else unpack_int4(packed)
    return {"q": q, "scale": scale, "zero": zero, "group": q.shape[1] // scale.shape[1], "bits": bits}


def _dequantize(parts: dict) -> torch.Tensor:
    q, scale, group = parts["q"], parts["scale"], parts["group"]
    n, k = q.shape
    g = q.reshape(n, k // group, group).float()
    if parts["bits"] == 8:
        return (g * scale[..., None]).reshape(n, k)
    return ((g - 8) * scale[..., None] + parts["zero"][..., None]).reshape(n, k)


def _quant_tensor(handles: dict, base: str, where: Path) -> LazyTensor:
    for part in (".qweight", ".scales"):
        if base + part not in handles:
            raise FormatError(f"{where}: quantized tensor {base} has no {part[1:]}")
    q = handles[base + ".qweight"].get_slice(base + ".qweight")
    s = handles[base + ".scales"].get_slice(base + ".scales")
    (n, kq), (ns, groups) = q.get_shape(), s.get_shape()
    bits = 8 if q.get_dtype() == "I8" else 4 if q.get_dtype() == "U8" else None
    k = kq if bits == 8 else 2 * kq
    if bits is None or ns != n or not groups or k % groups or (bits == 4 and base + ".zeros" not in handles):
        raise FormatError(f"{where}: quantized tensor {base} is inconsistent (qweight {q.get_dtype()} {[n, kq]}, "
                          f"scales {[ns, groups]})")
    kind = f"int{bits}"

    def raw():
        parts = _quant_parts(handles, base)
        return kind, {k_: parts[k_] for k_ in ("q", "scale", "zero", "group")}

    return LazyTensor((n, k), kind, lambda: _dequantize(_quant_parts(handles, base)), raw)


def read_tensors(folder: Path, tie_embeddings: bool, quantized: bool = False) -> dict[str, LazyTensor]:
    """Lazy canonical tensors from a folder's safetensors files (memory-mapped, read one at a time)."""
    from safetensors import safe_open

    handles: dict[str, object] = {}  # stored name -> the open file that holds it
    for file in weight_files(folder):
        try:
            handle = safe_open(str(file), framework="pt")
        except Exception as e:  # safetensors raises its own error type for bad headers
            raise FormatError(f"{file}: not a safetensors file ({first_line(e)})") from None
        for name in handle.keys():
            if name in handles:
                raise FormatError(f"{folder}: tensor {name} is stored twice (second time in {file.name})")
            handles[name] = handle
    tensors: dict[str, LazyTensor] = {}
    for name, handle in handles.items():
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if quantized and name.endswith(QUANT_PARTS):
            if not name.endswith(".qweight"):
                continue
            base = name.removesuffix(".qweight")
            canon = canonical_name(base + ".weight")
            lazy = _quant_tensor(handles, base, folder) if canon else None
        else:
            canon = canonical_name(name)
            if canon:
                info = handle.get_slice(name)
                lazy = LazyTensor(tuple(info.get_shape()), info.get_dtype(), _loader(handle, name))
        if canon is None:
            raise UnsupportedModelError(f"{folder}: unexpected tensor {name!r} for a llama model")
        if canon in tensors:
            raise FormatError(f"{folder}: tensor {canon} is stored twice")
        tensors[canon] = lazy
    if tie_embeddings:  # the output layer is the embedding; a stored copy is ignored, as transformers does
        tensors.pop("output.weight", None)
    return tensors


def _quantization(cfg: dict, where: Path) -> dict | None:
    """A camelid quantization_config, None for a float folder; other methods (GPTQ, AWQ, ...) are refused."""
    qc = cfg.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method != QUANT_METHOD:
        raise UnsupportedModelError(f"{where}: quantization method {method!r} is not supported "
                                    f"(camelid reads float folders and its own {QUANT_METHOD!r} int8/int4 folders)")
    return qc


def read_tokenizer(folder: Path, vocab_size: int) -> Tokenizer:
    """The folder's tokenizer: tokenizer.json, else a SentencePiece tokenizer.model."""
    tok_config = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    gen_config = read_json(folder / "generation_config.json") if (folder / "generation_config.json").is_file() else {}
    template = chat_template_of(folder, tok_config)
    if (folder / "tokenizer.json").is_file():
        return from_tokenizer_json(folder / "tokenizer.json", tok_config, gen_config, template, min_vocab=vocab_size)
    if (folder / "tokenizer.model").is_file():
        eos = gen_config.get("eos_token_id")
        extra = eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
        return from_sentencepiece(folder / "tokenizer.model", template, extra)
    raise FormatError(f"{folder}: no tokenizer (expected tokenizer.json or tokenizer.model)")


def read(folder: Path) -> Checkpoint:
    """Read a Hugging Face Llama (or Llama 4) folder."""
    raw_config = read_json(folder / "config.json")
    from . import hf_llama4

    if hf_llama4.is_llama4(raw_config):
        return hf_llama4.read(folder, raw_config)
    config, style = read_config(raw_config, folder / "config.json")
    quant = _quantization(raw_config, folder / "config.json")
    tensors = read_tensors(folder, config.tie_embeddings, quantized=quant is not None)
    tokenizer = read_tokenizer(folder, config.vocab_size)
    if tokenizer.vocab_size > config.vocab_size:
        raise FormatError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens, the model only {config.vocab_size}")
    dtypes = sorted({t.dtype for t in tensors.values()})
    info = {"name": folder.name, "config_style": style, "tensor_types": dtypes,
            "shards": len(weight_files(folder)), "tokenizer": tokenizer.kind}
    if quant is not None:
        group = quant.get("group_size")
        info["quantization"] = f"int{quant.get('bits')} (camelid, " + (
            f"groups of {group})" if isinstance(group, int) and group > 0 else "per row)")
    return Checkpoint(config, tensors, tokenizer, "hf", folder, info)
