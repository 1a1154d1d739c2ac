"""The LLaMA transformer, top to bottom: RMSNorm, RoPE, attention (GQA), SwiGLU, block, model.

Covers Llama 1/2/3/3.1/3.2 and Llama-architecture models (SmolLM2, TinyLlama), and Llama 4's text model
(routed top-k experts beside a shared expert, NoPE layers with attention temperature tuning, chunked
attention, QK norm), each Llama 4 feature switched on by the config alone. The model knows no
file format, tokenizer or device: it maps token ids and their positions to logits, reading and
writing an optional KV cache. Q and K rows use the "rotate-half" RoPE layout (Hugging Face's);
format readers convert other layouts once, in camelid/formats/layout.py.

Shapes: B batch, T new tokens, S cached positions, D model dim, H heads, K kv heads, E head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache, update_chunked
from .config import ModelConfig, RopeScaling
from .kernels import decode_attention
from .quant import DENSE_MIN_TOKENS


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 whatever the activation dtype, as the reference does
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies [E/2], with Llama 3.1 scaling of the low frequencies when given."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is not None:
        low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
        high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # low_freq_factor == high_freq_factor (Llama 4 Scout): no medium band, so the smoothing is never used
        span = (scaling.high_freq_factor - scaling.low_freq_factor) or 1.0
        smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / span
        smoothed = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(is_medium, smoothed, inv_freq)
    return inv_freq.float()


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin [B,T,1,E] for positions [B,T], laid out for apply_rope."""
    angles = positions[..., None].float() * inv_freq  # [B,T,E/2]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), -1)[:, :, None], torch.cat((-sin, sin), -1)[:, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B,T,H,E] rotated in float32. Rotate-half layout, pairs (i, i + E/2): with x = [x1, x2],
    out = [x1 cos - x2 sin, x2 cos + x1 sin] = x * [cos, cos] + [x2, x1] * [-sin, sin]."""
    xf = x.float()
    return (xf * cos + xf.roll(x.shape[-1] // 2, -1) * sin).to(x.dtype)


def chunk_visible(q_pos: torch.Tensor, k_pos: torch.Tensor, chunk: int) -> torch.Tensor:
    """Chunked causal attention [B,1,T,S] (boolean): key position k is visible to the query at position q when
    k <= q and both lie in the same `chunk`-long chunk. q_pos [B,T], k_pos [B,S] (or [S])."""
    if k_pos.dim() == 1:
        k_pos = k_pos.expand(q_pos.shape[0], -1)
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    return ((k <= q) & (k >= 0) & (k // chunk == q // chunk))[:, None]


def temperature_scale(positions: torch.Tensor, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """Llama 4's attention temperature on NoPE layers, per position [B,T]: log1p(floor((p+1)/floor_scale))*s + 1."""
    return torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        # Llama 4 options (all off for Llama): NoPE, QK norm (RoPE layers only), temperature (NoPE layers only),
        # chunked attention
        self.use_rope = layer not in cfg.nope_layers
        self.qk_norm_eps = cfg.norm_eps if cfg.qk_norm and self.use_rope else None
        self.temperature = (cfg.floor_scale, cfg.attn_scale) if cfg.attn_temperature_tuning and not self.use_rope else None
        self.chunk = cfg.attention_chunk_size if layer in cfg.chunked_layers else 0
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.wqkv: nn.Module | None = None  # the fast path's fused [wq; wk; wv] (camelid/loader.py), one product
        # the fast path with camelid's attention kernel built (camelid/loader.py, camelid/kernels.py): a cached
        # forward of fewer than quant.DENSE_MIN_TOKENS tokens per row attends each query on its own, as decode does
        # (the same bound below which the quantized layers multiply row by row: a prompt token's keys and values
        # then do not depend on the chunk that computes them)
        self.kernel = False

    def forward(self, x, cos, sin, positions, cache: KVCache | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, E = self.n_heads, self.n_kv_heads, self.head_dim
        if self.wqkv is not None:  # one product, and Q and K rotated together
            qk, v = self.wqkv(x).split([(H + K) * E, K * E], dim=-1)
            q, k = self._position(qk.view(B, T, H + K, E), cos, sin).split([H, K], dim=2)
        else:
            q = self._position(self.wq(x).view(B, T, H, E), cos, sin)
            k = self._position(self.wk(x).view(B, T, K, E), cos, sin)
            v = self.wv(x)
        v = v.view(B, T, K, E)
        if self.temperature is not None:
            q = q * temperature_scale(positions, *self.temperature)[..., None, None].to(q.dtype)

        if cache is None:  # whole sequences: causal, or the given mask [B,1,T,T] (packed samples)
            if self.chunk:
                chunked = chunk_visible(positions, positions, self.chunk)
                mask = chunked if mask is None else mask & chunked
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B,H|K,T,E]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        else:
            if self.chunk:  # Llama 4's chunked layers keep one chunk of slots
                k, v, mask = update_chunked(cache, self.layer, positions, k, v, self.chunk)
            else:
                k, v, mask = cache.update(self.layer, positions, k, v)  # [B,K,S,E], mask [B,1,T,S] or None: causal
            attend = getattr(cache, "attend", None)  # the compiled decode step's own kernel (camelid/compiled.py)
            if attend is None and self.kernel and T < DENSE_MIN_TOKENS:
                attend = decode_attention
            if attend is not None and not self.chunk:  # each query on its own: [B,T,H,E] out, no transposes
                if mask is None:  # a first chunk (plain causal): the kernel takes the mask, built once a forward
                    mask = cache.explicit_mask()
                return self.wo(attend(q, k, v, mask).reshape(B, T, -1))  # reads a float16 cache as it is
            k, v = k.to(q.dtype), v.to(q.dtype)  # a float16 cache (kv_dtype) read by torch's attention: long prompts
            if cache.query_by_query and T > 1 and not self.chunk:  # speculative verification, one row (B=1):
                # query t over slots 0..p_t, as decode computes it alone
                out = torch.cat([F.scaled_dot_product_attention(
                    q[:, t : t + 1].transpose(1, 2), k[:, :, : p + 1], v[:, :, : p + 1],
                    attn_mask=torch.zeros(1, 1, 1, p + 1, dtype=q.dtype, device=k.device), enable_gqa=True)
                    for t, p in enumerate(positions[0].tolist())], dim=2)
            else:
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, is_causal=mask is None,
                                                     enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))

    def _position(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on x [B,T,heads,E] (not on NoPE layers), then the weightless QK norm where the layer has it."""
        if self.use_rope:
            x = apply_rope(x, cos, sin)
        if self.qk_norm_eps is not None:
            x = F.rms_norm(x.float(), (x.shape[-1],), eps=self.qk_norm_eps).to(x.dtype)
        return x


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). w1 is the gate, w3 the up, w2 the down projection."""

    def __init__(self, cfg: ModelConfig, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden_dim = hidden_dim or cfg.hidden_dim
        self.w1 = nn.Linear(cfg.dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, hidden_dim, bias=False)
        self.w13: nn.Module | None = None  # the fast path's fused [w1; w3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, dim=-1)
            return self.w2(F.silu(gate) * up)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Experts(nn.Module):
    """The routed SwiGLU experts as stacked weights: w1, w3 [X,F,D] (gate, up) and w2 [X,D,F] (down).
    The fast path swaps in camelid.quant.QuantExperts, which has the same forward."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        X, Fh, D = cfg.n_experts, cfg.expert_hidden_dim, cfg.dim
        self.w1 = nn.Parameter(torch.empty(X, Fh, D))
        self.w2 = nn.Parameter(torch.empty(X, D, Fh))
        self.w3 = nn.Parameter(torch.empty(X, Fh, D))

    def forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its tokens x [N,D] -> [N,D]."""
        return F.linear(F.silu(F.linear(x, self.w1[e])) * F.linear(x, self.w3[e]), self.w2[e])


class MoEFeedForward(nn.Module):
    """Llama 4's feed-forward: a shared expert on every token plus top-k routed experts. The router's top-k
    logits pass through a sigmoid and the score multiplies the expert's *input*. Routing is a gather: each
    expert runs only on the tokens routed to it."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.n_experts_used
        self.router = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.experts = Experts(cfg)
        self.shared = FeedForward(cfg, cfg.expert_hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N,D]
        top, chosen = self.router(x).topk(self.top_k, dim=-1)  # [N,k]
        scores = torch.sigmoid(top.float()).to(x.dtype).reshape(-1)
        flat = chosen.reshape(-1)
        order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert
        token = order // self.top_k
        routed_in = x[token] * scores[order, None]  # [N*k,D]
        counts = torch.bincount(flat, minlength=self.router.out_features).tolist()
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n:
                outs.append(self.experts(e, routed_in[start:start + n]))
                start += n
        out = self.shared(x)
        out = out.index_add(0, token, torch.cat(outs).to(out.dtype))
        return out.view(shape)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = MoEFeedForward(cfg) if layer in cfg.moe_layers else FeedForward(cfg)

    def forward(self, x, cos, sin, positions, cache, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, positions, cache, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        # weights come from a checkpoint (camelid/loader.py builds on the meta device): no random init, which on
        # the meta device would import torch's compiler stack (over a second of start-up)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim, _weight=torch.empty(cfg.vocab_size, cfg.dim))
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # the KV cache's type where it differs from the activations' (camelid/cache.py): the fast path with camelid's
        # attention kernel keeps keys and values in float16, as llama.cpp does, which halves what decode reads
        self.kv_dtype: torch.dtype | None = None
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)  # RoPE
        self.reset_buffers()

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' type (the KV cache's too, unless kv_dtype says otherwise)."""
        return self.norm.weight.dtype

    def reset_buffers(self) -> None:
        """(Re)compute derived buffers; call after building on the meta device and loading."""
        cfg = self.config
        device = self.device
        if device.type != "meta":  # on the meta device there is nothing to compute yet
            inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
            if cfg.rope_factors:  # divisors as a file gives them (llama4 GGUF rope_freqs)
                inv_freq = inv_freq / torch.tensor(cfg.rope_factors, dtype=torch.float32)
            self.inv_freq = inv_freq.to(device)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_at: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        hidden: bool = False,
    ) -> torch.Tensor:
        """tokens [B,T] -> logits [B,T,V], or [B,1,V] at index logits_at[b] of each row ([B,K,V] at logits_at[b, k]);
        a boolean logits_at [B,T] gives the logits of its True positions only, [N,V] in row-major order (training:
        the positions that have a target, so the output layer never runs where the loss ignores it).

        positions [B,T] give each token's position (default 0..T-1); with a cache, keys and values are
        written at those positions and each token attends to every cached position up to its own.
        segments [B,T] (training on packed rows, no cache): each token's sample id within its row; a token
        attends only to earlier tokens of its own sample (positions then restart at 0 at each sample).
        hidden: return the final norm's output [B,T,D] (the embeddings' source) instead of the output head's logits.
        """
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        cos, sin = rope_tables(positions, self.inv_freq)  # [B,T,1,E]
        mask = None
        if segments is not None and cache is not None:
            raise ValueError("segments (packed samples) need whole sequences, not a KV cache")
        if segments is not None and bool((segments == segments[:, :1]).all()):
            segments = None  # one sample per row: plain causal attention (the fused kernel, no T x T mask)
        if segments is not None:  # block-diagonal causal: same sample and key index <= query index
            causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()  # [T,T]
            mask = ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]  # [B,1,T,T]

        x = self.tok_embeddings(tokens)  # [B,T,D]
        for layer in self.layers:
            x = layer(x, cos, sin, positions, cache, mask)
        selected = logits_at is not None and logits_at.dtype == torch.bool
        if selected:  # [B,T] -> the selected positions as one row [1,N,D] (a long row: the dense product when quantized)
            x = x[logits_at][None]
        elif logits_at is not None:  # [B]: one position per row -> [B,1,V]; [B,K]: K positions per row -> [B,K,V]
            rows = torch.arange(B, device=x.device)
            x = x[rows, logits_at][:, None] if logits_at.dim() == 1 else x[rows[:, None], logits_at]
        x = self.norm(x)
        out = x if hidden else self.output(x).float()
        return out[0] if selected else out
