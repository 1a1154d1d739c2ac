"""Configs of the official Llama models by exact name, so a model's shape is known without its weights.

Each preset is Meta's params.json for that release (dim, layers, heads, `multiple_of` and
`ffn_dim_multiplier` giving the FFN size by Meta's rule) cross-checked with the Hugging Face config.json
that Meta published for it; RoPE scaling and context length are those of the HF config.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig, RopeScaling, ffn_hidden_dim
from .errors import ModelNotFoundError


@dataclass(frozen=True)
class Preset:
    config: ModelConfig
    source: str


_LLAMA1 = "Meta LLaMA (Feb 2023) params.json, {size}/ in the original download; paper arXiv:2302.13971 table 2"
_LLAMA2 = "Meta Llama 2 (Jul 2023) params.json, llama-2-{size}/; HF meta-llama/Llama-2-{size}-hf config.json"
_LLAMA3 = "Meta Llama 3 (Apr 2024) params.json; HF meta-llama/Meta-Llama-3-{size} config.json"
_LLAMA31 = "Meta Llama 3.1 (Jul 2024) params.json; HF meta-llama/Llama-3.1-{size} config.json (rope_type llama3, factor 8)"
_LLAMA32 = "Meta Llama 3.2 (Sep 2024) params.json; HF meta-llama/Llama-3.2-{size} config.json (rope_type llama3, factor 32, tied)"


def _llama(dim: int, layers: int, heads: int, multiple_of: int, eps: float, ctx: int, kv: int | None = None,
           multiplier: float | None = None, vocab: int = 32000, theta: float = 10000.0, scaling: float | None = None,
           tied: bool = False) -> ModelConfig:
    return ModelConfig(
        dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv or heads, vocab_size=vocab,
        hidden_dim=ffn_hidden_dim(dim, multiple_of, multiplier), norm_eps=eps, rope_theta=theta,
        rope_scaling=RopeScaling(factor=scaling) if scaling else None, max_seq_len=ctx, tie_embeddings=tied,
    )


def _llama3(dim: int, layers: int, heads: int, multiple_of: int, multiplier: float, **kw) -> ModelConfig:
    return _llama(dim, layers, heads, multiple_of, 1e-5, kv=8, multiplier=multiplier, vocab=128256, theta=500000.0, **kw)


_BASE: dict[str, Preset] = {
    "llama-7b": Preset(_llama(4096, 32, 32, 256, 1e-6, 2048), _LLAMA1.format(size="7B")),
    "llama-13b": Preset(_llama(5120, 40, 40, 256, 1e-6, 2048), _LLAMA1.format(size="13B")),
    "llama-30b": Preset(_llama(6656, 60, 52, 256, 1e-6, 2048), _LLAMA1.format(size="30B") + " (the paper's 33B)"),
    "llama-65b": Preset(_llama(8192, 80, 64, 256, 1e-5, 2048), _LLAMA1.format(size="65B")),
    "llama-2-7b": Preset(_llama(4096, 32, 32, 256, 1e-5, 4096), _LLAMA2.format(size="7b")),
    "llama-2-13b": Preset(_llama(5120, 40, 40, 256, 1e-5, 4096), _LLAMA2.format(size="13b")),
    "llama-2-70b": Preset(_llama(8192, 80, 64, 4096, 1e-5, 4096, kv=8, multiplier=1.3), _LLAMA2.format(size="70b")),
    "llama-3-8b": Preset(_llama3(4096, 32, 32, 1024, 1.3, ctx=8192), _LLAMA3.format(size="8B")),
    "llama-3-70b": Preset(_llama3(8192, 80, 64, 4096, 1.3, ctx=8192), _LLAMA3.format(size="70B")),
    "llama-3.1-8b": Preset(_llama3(4096, 32, 32, 1024, 1.3, ctx=131072, scaling=8.0), _LLAMA31.format(size="8B")),
    "llama-3.1-70b": Preset(_llama3(8192, 80, 64, 4096, 1.3, ctx=131072, scaling=8.0), _LLAMA31.format(size="70B")),
    "llama-3.1-405b": Preset(_llama3(16384, 126, 128, 4096, 1.2, ctx=131072, scaling=8.0), _LLAMA31.format(size="405B")),
    "llama-3.2-1b": Preset(_llama3(2048, 16, 32, 256, 1.5, ctx=131072, scaling=32.0, tied=True), _LLAMA32.format(size="1B")),
    "llama-3.2-3b": Preset(_llama3(3072, 28, 24, 256, 1.0, ctx=131072, scaling=32.0, tied=True), _LLAMA32.format(size="3B")),
}


def _tuned() -> dict[str, Preset]:
    """The chat / instruct releases: the same shapes under their own names."""
    out = {}
    for name, p in _BASE.items():
        if name.startswith("llama-2-"):
            out[name + "-chat"] = Preset(p.config, p.source + "; chat-tuned release, same shape")
        elif name.startswith("llama-3"):
            out[name + "-instruct"] = Preset(p.config, p.source + "; instruct release, same shape")
    return out


_SMALL_SOURCE = ("camelid preset for training from scratch ({what}); Llama architecture; vocab_size is the "
                 "tokenizer's at training time")


def _small(dim: int, layers: int, heads: int, kv: int, ctx: int, what: str) -> Preset:
    return Preset(_llama(dim, layers, heads, 32, 1e-5, ctx, kv=kv, vocab=4096, tied=True), _SMALL_SOURCE.format(what=what))


# small models that train in minutes on a laptop CPU (sizes with a 4096-token vocabulary)
SMALL: dict[str, Preset] = {
    "tiny": _small(128, 4, 4, 4, 256, "about 1.3 M parameters, minutes on a laptop CPU"),
    "small": _small(256, 6, 8, 4, 512, "about 5 M parameters"),
    "medium": _small(512, 8, 8, 4, 1024, "about 25 M parameters"),
}

PRESETS: dict[str, Preset] = {**_BASE, **_tuned(), **SMALL}

# bytes per parameter: float formats exactly; int8 / int4 as weight-only blocks of 32 with one fp16 scale
# (GGUF's Q8_0 = 8.5 bits, Q4_0 = 4.5 bits per weight)
BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 34 / 32, "int4": 18 / 32}


def get(name: str) -> Preset:
    """The preset of that exact name (ModelNotFoundError listing the names otherwise)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ModelNotFoundError(f"no preset named {name!r}; presets: {', '.join([*SMALL, *_BASE])} (+ -chat / -instruct)") from None


def memory(config: ModelConfig) -> dict[str, int]:
    """Bytes the weights take in each precision."""
    n = config.param_count()
    return {precision: int(n * b) for precision, b in BYTES_PER_PARAM.items()}


def kv_cache_bytes_per_token(config: ModelConfig, bytes_per_value: int = 2) -> int:
    """K and V for one token over all layers (bf16 by default)."""
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * bytes_per_value


def describe(name: str) -> dict:
    """Everything `camelid info PRESET` shows: the config, its source, parameter count, memory per precision."""
    preset = get(name)
    cfg = preset.config
    return {
        "name": name,
        "source": preset.source,
        "config": cfg.to_dict(),
        "params": cfg.param_count(),
        "memory_bytes": memory(cfg),
        "kv_cache_bytes_per_token_bf16": kv_cache_bytes_per_token(cfg),
        "kv_cache_bytes_full_context_bf16": kv_cache_bytes_per_token(cfg) * cfg.max_seq_len,
    }


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def format_description(info: dict) -> str:
    """describe()'s dict as the aligned lines `camelid info PRESET` prints."""
    c = info["config"]
    rs = c.get("rope_scaling")
    rope = f"theta {c['rope_theta']:g}"
    if rs:
        rope += f", llama3 scaling x{rs['factor']:g} (original {rs['original_max_position_embeddings']})"
    rows = [
        ("preset", info["name"]),
        ("source", info["source"]),
        ("parameters", f"{info['params'] / 1e9:.2f} B ({info['params']:,})"),
        ("layers", str(c["n_layers"])),
        ("model dim", str(c["dim"])),
        ("heads / kv heads", f"{c['n_heads']} / {c['n_kv_heads']}"),
        ("feed-forward dim", str(c["hidden_dim"])),
        ("vocabulary", str(c["vocab_size"])),
        ("context length", str(c["max_seq_len"])),
        ("rope", rope),
        ("norm eps", f"{c['norm_eps']:g}"),
        ("tied embeddings", "yes" if c["tie_embeddings"] else "no"),
        *((f"weights {p}", _size(b)) for p, b in info["memory_bytes"].items()),
        ("kv cache (bf16)", f"{_size(info['kv_cache_bytes_per_token_bf16'])} per token, "
                            f"{_size(info['kv_cache_bytes_full_context_bf16'])} at full context"),
    ]
    return "\n".join(f"{k:18} {v}" for k, v in rows)
