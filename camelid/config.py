"""Model configuration: plain data, serializable, with presets by exact name."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 style RoPE frequency scaling ("llama3" rope type)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a LLaMA-family transformer. Every field is a plain value."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    hidden_dim: int  # feed-forward (SwiGLU) inner size
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    head_dim_override: int | None = field(default=None)
    # Llama 4 (the defaults are plain Llama: no experts, RoPE and full attention everywhere)
    arch: str = "llama"
    moe_layers: tuple[int, ...] = ()  # layers whose feed-forward is routed experts + a shared expert
    n_experts: int = 0
    n_experts_used: int = 1  # top-k of the router
    expert_hidden_dim: int = 0  # inner size of each routed expert and of the shared expert
    nope_layers: tuple[int, ...] = ()  # layers without RoPE (full causal attention)
    chunked_layers: tuple[int, ...] = ()  # layers where a query sees only its own attention_chunk_size chunk
    attention_chunk_size: int = 0
    qk_norm: bool = False  # weightless RMS norm of q and k after RoPE, on RoPE layers only
    attn_temperature_tuning: bool = False  # NoPE layers scale q by log1p(floor((p+1)/floor_scale))*attn_scale+1
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    rope_factors: tuple[float, ...] = ()  # per-frequency divisors applied as given (a llama4 GGUF's rope_freqs)

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim_override is None and self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not a multiple of n_heads={self.n_heads}")

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.dim // self.n_heads

    def param_count(self, active: bool = False) -> int:
        """Number of parameters (embedding counted once when tied); active=True counts only the routed experts
        one token uses (n_experts_used of n_experts in each MoE layer)."""
        hd = self.head_dim
        attn = self.dim * hd * (self.n_heads * 2 + self.n_kv_heads * 2)
        per_layer = attn + 2 * self.dim
        n_moe = len(self.moe_layers)
        experts = self.n_experts_used if active else self.n_experts
        moe = self.dim * self.n_experts + 3 * self.dim * self.expert_hidden_dim * (experts + 1)
        ffn = (self.n_layers - n_moe) * 3 * self.dim * self.hidden_dim + n_moe * moe
        emb = self.vocab_size * self.dim
        return self.n_layers * per_layer + ffn + self.dim + emb * (1 if self.tie_embeddings else 2)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        for key in ("moe_layers", "nope_layers", "chunked_layers", "rope_factors"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's rule for the SwiGLU inner size (params.json `multiple_of`, `ffn_dim_multiplier`)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _layers(ids: tuple[int, ...], n: int) -> str:
    if not ids:
        return "none"
    if len(ids) == n:
        return "all"
    return ",".join(map(str, ids))


def llama4_summary(cfg: ModelConfig) -> list[tuple[str, str]]:
    """`camelid info` rows for a Llama 4 model: experts, active parameters, the layer pattern."""
    n = cfg.n_layers
    rows = []
    if cfg.moe_layers:
        rows.append(("experts", f"{cfg.n_experts} routed (top-{cfg.n_experts_used}, dim {cfg.expert_hidden_dim}) "
                                f"+ 1 shared, on layers {_layers(cfg.moe_layers, n)}"))
        rows.append(("active parameters", f"{cfg.param_count(active=True) / 1e6:.1f} M per token"))
    else:
        rows.append(("experts", "none (dense)"))
    pattern = "".join(("M" if i in cfg.moe_layers else "D") + ("c" if i in cfg.chunked_layers else "n" if i in
                      cfg.nope_layers else "f") for i in range(n))
    rows.append(("layer pattern", f"{pattern} (M MoE / D dense; c chunked RoPE, f full RoPE, n NoPE full)"))
    temp = f", temperature floor {cfg.floor_scale:g} scale {cfg.attn_scale:g}" if cfg.attn_temperature_tuning else ""
    rows.append(("attention", f"chunk {cfg.attention_chunk_size or '-'} on layers {_layers(cfg.chunked_layers, n)}; "
                              f"NoPE on {_layers(cfg.nope_layers, n)}{temp}; QK norm {'on' if cfg.qk_norm else 'off'}"))
    return rows
