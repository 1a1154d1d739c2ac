"""KV cache: preallocated per layer, written at explicit positions (one position list per row)."""

from __future__ import annotations

import torch


def attention_mask(positions: torch.Tensor, span: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B,1,T,S]: 0 where slot s is visible to the query at position p (s <= p), -inf elsewhere.
    Additive in the activations' type, so attention uses it as it is (a boolean one is converted in every layer)."""
    slots = torch.arange(span, device=positions.device)
    hidden = slots[None, None, :] > positions[:, :, None]
    return torch.zeros(hidden.shape, dtype=dtype, device=positions.device).masked_fill_(hidden, float("-inf"))[:, None]


class KVCache:
    """Keys and values for `batch` rows of up to `max_len` positions.

    Row b's token at position p lives in slot p. A query at position p attends to slots 0..p, so
    stale values beyond a row's length (left by padding) are never seen and are overwritten later.
    """

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], mask_dtype: torch.dtype | None = None) -> None:
        self.k, self.v = k, v  # per layer [B,K,S,E] (S = the chunk size on Llama 4's chunked layers)
        # the additive mask's type: the activations' (float32 over the fast path's float16 cache)
        self.mask_dtype = mask_dtype or k[0].dtype
        self.max_len = max(t.shape[2] for t in k)
        self._mask_for: tuple[torch.Tensor, int] | None = None  # (positions, span) of the cached mask
        self._mask: torch.Tensor | None = None
        # speculative verification (camelid/speculate.py, one row): several queries, each attended exactly as decode
        # attends one query alone, so their logits are bit-equal to plain decoding's
        self.query_by_query = False

    @classmethod
    def allocate(cls, n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> KVCache:
        shape = (batch, n_kv_heads, max_len, head_dim)  # [B,K,S,E]
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)])

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch: int, max_len: int) -> KVCache:
        """The cache of `model` in its KV type (model.kv_dtype: float16 on the fast path with camelid's kernel, else
        the activations' type)."""
        cfg = model.config
        kv_dtype = getattr(model, "kv_dtype", None) or model.dtype
        cache = cls.allocate(cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim, kv_dtype, model.device)
        cache.mask_dtype = model.dtype
        chunk = getattr(cfg, "attention_chunk_size", 0)
        for i in getattr(cfg, "chunked_layers", ()):  # Llama 4: a chunked layer keeps at most one chunk
            if chunk < max_len:
                cache.k[i], cache.v[i] = cache.k[i][:, :, :chunk].clone(), cache.v[i][:, :, :chunk].clone()
        return cache

    def view(self, start: int, stop: int) -> KVCache:
        """Rows start..stop-1 as a cache of their own (the same memory)."""
        return KVCache([t[start:stop] for t in self.k], [t[start:stop] for t in self.v], self.mask_dtype)

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B,T,K,E] at positions [B,T]; return keys, values [B,K,S,E] and the additive mask [B,1,T,S],
        or None when plain causal attention is right (positions 0..T-1 in every row)."""
        B = k.shape[0]
        rows = torch.arange(B, device=k.device)[:, None]
        kc, vc = self.k[layer], self.v[layer]
        # advanced indices on dims 0 and 2 put the [B,T] index dims first: kc[rows,:,pos] is [B,T,K,E]
        kc[rows, :, positions] = k.to(kc.dtype)
        vc[rows, :, positions] = v.to(vc.dtype)
        span = int(positions.max()) + 1
        # computed once per forward (all layers share it). A first chunk (positions 0..T-1 in every row) needs
        # no mask: plain causal attention, which skips the hidden half instead of reading a T x T mask.
        if self._mask_for is None or self._mask_for[0] is not positions or self._mask_for[1] != span:
            first_chunk = span == positions.shape[1] and bool((positions[:, 0] == 0).all())
            self._mask = None if first_chunk else attention_mask(positions, span, self.mask_dtype)
            self._mask_for = (positions, span)
        return kc[:, :, :span], vc[:, :, :span], self._mask

    def explicit_mask(self) -> torch.Tensor:
        """This forward's additive mask [B,1,T,S], also for a first chunk (where update() gives None for plain causal
        attention): for attention that takes no is_causal (camelid's kernel). Built once a forward, as update()'s."""
        if self._mask is None:
            positions, span = self._mask_for
            self._mask = attention_mask(positions, span, self.mask_dtype)
        return self._mask


def update_chunked(cache: KVCache, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   chunk: int):
    """A chunked-attention layer's step (Llama 4): a query sees only the keys of its own `chunk`-long chunk, so
    the layer keeps at most `chunk` slots; position p lives in slot p % chunk (rows are written contiguously
    from position 0, as for every layer). Returns keys, values [B,K,S',E] and a boolean mask [B,1,T,S'].

    One new token per row (decode) is written first and attends to slots 0 .. p % chunk. Several new tokens may
    cross a chunk boundary and overwrite slots that earlier queries of the same call still need, so they attend
    to the cached slots as they were plus the new keys, and only then is each slot's latest position written."""
    from .model import chunk_visible

    kc, vc = cache.k[layer], cache.v[layer]
    B, T = positions.shape
    S = kc.shape[2]
    rows = torch.arange(B, device=k.device)[:, None]
    slots = torch.arange(S, device=k.device)
    if T == 1:
        kc[rows, :, positions % S] = k.to(kc.dtype)
        vc[rows, :, positions % S] = v.to(vc.dtype)
        q = positions[:, :, None]  # [B,1,1]
        stored = q - (q - slots) % S  # the position slot s holds: the latest one <= q with that residue
        return kc, vc, chunk_visible(positions, stored[:, 0], chunk)
    first = positions.min(dim=1, keepdim=True).values  # [B,1]
    held = first - 1 - (first - 1 - slots) % S  # [B,S] positions the slots hold before this call (< 0: none)
    keys = torch.cat([kc, k.transpose(1, 2).to(kc.dtype)], dim=2)
    values = torch.cat([vc, v.transpose(1, 2).to(vc.dtype)], dim=2)
    mask = chunk_visible(positions, torch.cat([held, positions], dim=1), chunk)
    last = positions > positions.max(dim=1, keepdim=True).values - S  # only each slot's newest position
    b, t = last.nonzero(as_tuple=True)
    kc[b, :, positions[b, t] % S] = k[b, t].to(kc.dtype)
    vc[b, :, positions[b, t] % S] = v[b, t].to(vc.dtype)
    return keys, values, mask
