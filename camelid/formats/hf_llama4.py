"""Llama 4 Hugging Face folders: `Llama4ForCausalLM` (model_type `llama4_text`) and `Llama4ForConditionalGeneration`
(model_type `llama4`, the text model under `text_config` and its tensors under `language_model.`).

Every architecture knob is read from config.json; a key the file lacks takes transformers' Llama4TextConfig
default. The rules, as transformers applies them:
- MoE layers: `moe_layers` when given, else every `interleave_moe_layer_step`-th layer (layers step-1, 2*step-1,
  ...); step 0 or `moe_layers: []` means a dense model. Dense layers are SwiGLU of `intermediate_size_mlp`; the
  routed experts and the shared expert have `intermediate_size`.
- RoPE: `no_rope_layers[i] == 1` means layer i *has* RoPE; an empty or missing list means NoPE on every
  `no_rope_layer_interval`-th layer (layers interval-1, 2*interval-1, ...).
- Chunked attention: `layer_types` when given ("chunked_attention" / "full_attention"), else the RoPE layers
  when `attention_chunk_size` is set.
- `attn_temperature_tuning` is taken as truthy/falsy (Meta's configs write 4).
- Q/K rows are stored for interleaved-pair RoPE (transformers' Llama 4 rotates complex pairs 2i, 2i+1), unlike
  HF Llama's rotate-half rows, so they are permuted into camelid's layout here.
- Experts: `experts.gate_up_proj` [E, D, 2F] (gate half first) becomes experts.w1 / w3 [E, F, D];
  `experts.down_proj` [E, F, D] becomes experts.w2 [E, D, F].
The vision tower (`vision_model.*`, `multi_modal_projector.*`) is skipped and named in Checkpoint.info.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..config import ModelConfig
from ..errors import FormatError, UnsupportedModelError, first_line
from . import Checkpoint, LazyTensor
from .layout import interleaved_to_half

MODEL_TYPES = ("llama4", "llama4_text")
ARCHITECTURES = ("Llama4ForCausalLM", "Llama4ForConditionalGeneration")
TEXT_PREFIXES = ("language_model.model.", "model.language_model.", "model.")
HEAD_NAMES = ("language_model.lm_head.weight", "lm_head.weight")
VISION_PREFIXES = ("vision_model.", "multi_modal_projector.", "model.vision_model.", "model.multi_modal_projector.")

# per-layer names after the text prefix (layers.{i}.) -> canonical names after layers.{i}.
LAYER_NAMES = {
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "feed_forward.gate_proj.weight": "feed_forward.w1.weight",
    "feed_forward.up_proj.weight": "feed_forward.w3.weight",
    "feed_forward.down_proj.weight": "feed_forward.w2.weight",
    "feed_forward.router.weight": "feed_forward.router.weight",
    "feed_forward.shared_expert.gate_proj.weight": "feed_forward.shared.w1.weight",
    "feed_forward.shared_expert.up_proj.weight": "feed_forward.shared.w3.weight",
    "feed_forward.shared_expert.down_proj.weight": "feed_forward.shared.w2.weight",
}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def is_llama4(cfg: dict) -> bool:
    return cfg.get("model_type") in MODEL_TYPES or any(a in ARCHITECTURES for a in cfg.get("architectures") or [])


def text_config(cfg: dict) -> dict:
    """The text model's keys: `text_config` of a ConditionalGeneration config, else the config itself."""
    text = cfg.get("text_config")
    return text if isinstance(text, dict) else cfg


def layer_plan(text: dict, n_layers: int, where: Path) -> dict:
    """moe_layers, nope_layers, chunked_layers (tuples of layer indices) by transformers' rules (module doc)."""
    moe = text.get("moe_layers")
    if moe is None:
        step = int(text.get("interleave_moe_layer_step", 1))
        moe = list(range(step - 1, n_layers, step)) if step > 0 else []
    no_rope = text.get("no_rope_layers")
    if not no_rope:
        interval = int(text.get("no_rope_layer_interval", 4))
        no_rope = [int((i + 1) % interval != 0) if interval > 0 else 1 for i in range(n_layers)]
    if len(no_rope) < n_layers:
        raise FormatError(f"{where}: no_rope_layers has {len(no_rope)} entries for {n_layers} layers")
    nope = [i for i in range(n_layers) if not no_rope[i]]
    types = text.get("layer_types")
    chunk = text.get("attention_chunk_size", 8192)
    if types is not None:
        if len(types) < n_layers or any(t not in ("chunked_attention", "full_attention") for t in types[:n_layers]):
            raise FormatError(f"{where}: layer_types must give 'chunked_attention' or 'full_attention' for each layer")
        chunked = [i for i in range(n_layers) if types[i] == "chunked_attention"]
    else:
        chunked = [i for i in range(n_layers) if no_rope[i]] if chunk is not None else []
    if chunked and not chunk:
        raise FormatError(f"{where}: chunked attention layers without an attention_chunk_size")
    bad = [i for i in moe if not 0 <= int(i) < n_layers]
    if bad:
        raise FormatError(f"{where}: moe_layers names layer {bad[0]} of {n_layers}")
    return {"moe_layers": tuple(sorted(int(i) for i in moe)), "nope_layers": tuple(nope),
            "chunked_layers": tuple(chunked), "attention_chunk_size": int(chunk or 0)}


def read_config(cfg: dict, where: Path) -> tuple[ModelConfig, str]:
    """A ModelConfig from a Llama 4 config.json dict (either class), and which RoPE key style it used."""
    from .hf import _rope

    text = text_config(cfg)
    if text.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{where}: activation {text['hidden_act']!r} is not supported (Llama 4 uses 'silu')")
    if text.get("attention_bias"):
        raise UnsupportedModelError(f"{where}: attention_bias=true is not supported")
    try:
        dim, n_heads = int(text["hidden_size"]), int(text["num_attention_heads"])
        n_layers = int(text["num_hidden_layers"])
        head_dim = int(text.get("head_dim") or dim // n_heads)
        rope = dict(text)
        rope.setdefault("rope_theta", 500000.0)
        theta, scaling, style = _rope(rope, where)
        plan = layer_plan(text, n_layers, where)
        n_experts = int(text.get("num_local_experts", 16)) if plan["moe_layers"] else 0
        config = ModelConfig(
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=int(text.get("num_key_value_heads") or n_heads),
            vocab_size=int(text["vocab_size"]),
            hidden_dim=int(text.get("intermediate_size_mlp", 16384)),
            norm_eps=float(text.get("rms_norm_eps", 1e-5)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=int(text.get("max_position_embeddings", 131072)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            head_dim_override=head_dim if head_dim != dim // n_heads else None,
            arch="llama4",
            n_experts=n_experts,
            n_experts_used=int(text.get("num_experts_per_tok", 1)),
            expert_hidden_dim=int(text.get("intermediate_size", 8192)) if n_experts else 0,
            qk_norm=bool(text.get("use_qk_norm", True)),
            attn_temperature_tuning=bool(text.get("attn_temperature_tuning", True)),
            floor_scale=float(text.get("floor_scale", 8192)),
            attn_scale=float(text.get("attn_scale", 0.1)),
            **plan,
        )
    except KeyError as e:
        raise FormatError(f"{where}: missing key {e}") from None
    except (TypeError, ValueError) as e:
        raise FormatError(f"{where}: {e}") from None
    if config.moe_layers and not 1 <= config.n_experts_used <= config.n_experts:
        raise FormatError(f"{where}: num_experts_per_tok={config.n_experts_used} with {config.n_experts} experts")
    return config, style


def _permuted(lazy: LazyTensor, heads: int) -> LazyTensor:
    return LazyTensor(lazy.shape, lazy.dtype, lambda: interleaved_to_half(lazy.load(), heads))


def _expert_part(lazy: LazyTensor, part: str) -> LazyTensor:
    """One canonical expert tensor from HF's stacked ones: w1 / w3 the gate / up half of gate_up_proj [E,D,2F]
    (as [E,F,D]), w2 from down_proj [E,F,D] (as [E,D,F])."""
    e, a, b = lazy.shape
    if part == "w2":
        return LazyTensor((e, b, a), lazy.dtype, lambda: lazy.load().transpose(1, 2).contiguous())
    half = b // 2
    lo = 0 if part == "w1" else half
    return LazyTensor((e, half, a), lazy.dtype, lambda: lazy.load()[:, :, lo:lo + half].transpose(1, 2).contiguous())


def canonical_tensors(stored: dict[str, LazyTensor], config: ModelConfig, where: Path) -> tuple[dict[str, LazyTensor], dict]:
    """Canonical lazy tensors from a folder's stored ones (names as saved by transformers), and what was skipped."""
    tensors: dict[str, LazyTensor] = {}
    vision: list[LazyTensor] = []
    for name, lazy in stored.items():
        if name.startswith(VISION_PREFIXES):
            vision.append(lazy)
            continue
        if name in HEAD_NAMES:
            tensors["output.weight"] = lazy
            continue
        prefix = next((p for p in TEXT_PREFIXES if name.startswith(p)), None)
        rest = name[len(prefix):] if prefix else None
        canon = None
        if rest == "embed_tokens.weight":
            canon = "tok_embeddings.weight"
        elif rest == "norm.weight":
            canon = "norm.weight"
        elif rest is not None and (m := _LAYER.match(rest)):
            i, part = m.group(1), m.group(2)
            if part == "feed_forward.experts.gate_up_proj":
                tensors[f"layers.{i}.feed_forward.experts.w1"] = _expert_part(lazy, "w1")
                tensors[f"layers.{i}.feed_forward.experts.w3"] = _expert_part(lazy, "w3")
                continue
            if part == "feed_forward.experts.down_proj":
                tensors[f"layers.{i}.feed_forward.experts.w2"] = _expert_part(lazy, "w2")
                continue
            if part in LAYER_NAMES:
                canon = f"layers.{i}.{LAYER_NAMES[part]}"
                if part == "self_attn.q_proj.weight":
                    lazy = _permuted(lazy, config.n_heads)
                elif part == "self_attn.k_proj.weight":
                    lazy = _permuted(lazy, config.n_kv_heads)
        if canon is None:
            raise UnsupportedModelError(f"{where}: unexpected tensor {name!r} for a Llama 4 model")
        if canon in tensors:
            raise FormatError(f"{where}: tensor {canon} is stored twice")
        tensors[canon] = lazy
    if config.tie_embeddings:
        tensors.pop("output.weight", None)
    skipped = {}
    if vision:
        n = sum(_numel(t.shape) for t in vision)
        skipped["vision_tower"] = f"skipped: {len(vision)} tensors, {n / 1e6:.1f} M parameters (camelid runs the text model)"
    return tensors, skipped


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def read(folder: Path, raw_config: dict) -> Checkpoint:
    """Read a Llama 4 Hugging Face folder (text model; the vision tower is skipped)."""
    from safetensors import safe_open

    from .hf import _loader, _quantization, read_tokenizer, weight_files

    config, style = read_config(raw_config, folder / "config.json")
    if _quantization(raw_config, folder / "config.json") is not None:
        raise UnsupportedModelError(f"{folder}: quantized Llama 4 folders are not supported (use a float folder or GGUF)")
    stored: dict[str, LazyTensor] = {}
    for file in weight_files(folder):
        try:
            handle = safe_open(str(file), framework="pt")
        except Exception as e:
            raise FormatError(f"{file}: not a safetensors file ({first_line(e)})") from None
        for name in handle.keys():
            if name in stored:
                raise FormatError(f"{folder}: tensor {name} is stored twice (second time in {file.name})")
            info = handle.get_slice(name)
            stored[name] = LazyTensor(tuple(info.get_shape()), info.get_dtype(), _loader(handle, name))
    tensors, skipped = canonical_tensors(stored, config, folder)
    tokenizer = read_tokenizer(folder, config.vocab_size)
    if tokenizer.vocab_size > config.vocab_size:
        raise FormatError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens, the model only {config.vocab_size}")
    info = {"name": folder.name, "config_style": style, "tensor_types": sorted({t.dtype for t in tensors.values()}),
            "shards": len(weight_files(folder)), "tokenizer": tokenizer.kind,
            "architecture": (raw_config.get("architectures") or ["Llama4ForCausalLM"])[0], **skipped}
    return Checkpoint(config, tensors, tokenizer, "hf", folder, info)
